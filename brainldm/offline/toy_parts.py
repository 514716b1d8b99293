"""toy's parts, in the classes diffusers and transformers use for Stable Diffusion: its configuration, the offline
world's (picture, caption) pairs it learns from, the CLIP pair, the VAE and the U-Net built from config, the EMA of a
model's weights, and the seeded randomness of every training step. :mod:`brainldm.offline.toy` trains them.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from brainldm.offline.synthetic import draw_picture
from brainldm.offline.twins import byte_level_clip_tokenizer
from brainldm.paths import atomic_path
from brainldm.validation import InputError


@dataclass(frozen=True)
class ToyConfig:
    """Everything that defines a toy training run (written to the model card)."""

    seed: int = 0
    image_size: int = 128  # output size; z is encoded at 5/8 of it, as SD's 320 of 512
    n_train: int = 20_000
    n_heldout: int = 128
    # CLIP pair
    text_hidden: int = 128
    vision_size: int = 64
    clip_steps: int = 1500
    clip_batch: int = 256
    clip_lr: float = 1e-3
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_crop: int = 64
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    # then the whole VAE again on mirrored crops too, its latents held near the unrefined encoder's (train_vae_refine)
    vae_refine_steps: int = 0
    # U-Net
    unet_channels: tuple[int, ...] = (32, 64, 128)
    # how many of the U-Net's levels, coarsest first, cross-attend to c: SD-1.x's do at all but its coarsest; 2 is
    # the first toys' (none at the finest, 16 x 16, where the world's coats are drawn)
    unet_attention_levels: int = 2
    unet_steps: int = 4500
    unet_batch: int = 256
    unet_lr: float = 5e-4
    caption_dropout: float = 0.1
    # the most of another picture's meaning mixed into each condition (see train_unet); 0: none, as SD is trained
    caption_mix: float = 0.0
    # every timestep's signal-to-noise ratio x this (1: SD's schedule). SD's U-Net runs on 64 x 64 latents, toy's on
    # 16 x 16: at one timestep the same noise hides far more of toy's layout (averaged over 16 x fewer latent
    # pixels), so img2img at the paper's strength keeps less of Xz than SD's does (README: "What limits")
    snr_shift: float = 1.0
    ema_decay: float = 0.999


# --- the offline world's pictures and captions ---------------------------------------------------------------


def _draw_range(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[list[str]]]:

    seed, start, stop, size = args
    pictures, captions = [], []
    for i in range(start, stop):
        picture, caps = draw_picture(np.random.default_rng([seed, i]), size)
        pictures.append(picture)
        captions.append([cap.strip() for cap in caps])
    return np.stack(pictures), captions


def draw_pairs(n: int, seed: int, size: int, workers: int | None = None) -> tuple[np.ndarray, list[list[str]]]:
    """``n`` offline-world pictures (n, size, size, 3) uint8 and their captions; picture i depends on (seed, i) only."""
    workers = workers or os.cpu_count() or 1
    chunk = max(1, math.ceil(n / (4 * workers)))
    jobs = [(seed, start, min(start + chunk, n), size) for start in range(0, n, chunk)]
    if workers == 1 or len(jobs) == 1:
        parts = [_draw_range(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_draw_range, jobs))
    return np.concatenate([p for p, _ in parts]), [c for _, caps in parts for c in caps]


def resize(pictures: np.ndarray, size: int) -> np.ndarray:
    """Bicubic resize of uint8 pictures (n, H, W, 3): how toy was trained (the features' pictures are resized with
    Lanczos, as the reference code does; on the world's 128 px pictures at toy's 80 px the two differ by 0.3 grey
    levels on average)."""
    return np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC)) for p in pictures])


def to_unit(pictures: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.as_tensor(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --- the parts ---------------------------------------------------------------------------------------------


def caption_tokenizer(captions: list[list[str]], model_max_length: int = 77):
    """A CLIP tokenizer whose BPE merges are learnt from the captions, so each caption word is one token.

    Every byte symbol stays in the vocabulary (with and without CLIP's ``</w>``), so any text tokenizes.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    symbols = sorted(ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=4000, end_of_word_suffix="</w>", initial_alphabet=symbols, show_progress=False
    )
    bpe.train_from_iterator((cap for caps in captions for cap in caps), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return byte_level_clip_tokenizer(model_max_length, merges)


def build_clip(tokenizer, config: ToyConfig):
    """The CLIP pair: a text tower (c = its last hidden states) and a ViT vision tower, both with projections."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=2 * config.text_hidden,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_hidden_layers=3,
        image_size=config.vision_size,
        patch_size=8,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def split_clip(clip):
    """(text_encoder, image_encoder): the towers as SD's ``CLIPTextModel`` and a ``CLIPVisionModelWithProjection``."""
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5's CLIPTextModel is the text transformer itself (no ``text_model`` wrapper)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    vision_config = clip.config.vision_config
    vision_config.projection_dim = clip.config.projection_dim
    image_encoder = CLIPVisionModelWithProjection(vision_config)
    image_encoder.vision_model.load_state_dict(clip.vision_model.state_dict())
    image_encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return text_encoder.eval(), image_encoder.eval()


def build_vae(config: ToyConfig):
    from diffusers import AutoencoderKL

    n = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=config.image_size,
    )


def build_unet(config: ToyConfig):
    from diffusers import UNet2DConditionModel

    factor = 2 ** (len(config.vae_channels) - 1)
    n, attending = len(config.unet_channels), config.unet_attention_levels
    if not 1 <= attending <= n:
        raise InputError(f"--unet-attention-levels must be 1..{n} (the U-Net's levels), got {attending}")
    down = ("DownBlock2D",) * (n - attending) + ("CrossAttnDownBlock2D",) * attending
    return UNet2DConditionModel(
        sample_size=config.image_size // factor,
        in_channels=4,
        out_channels=4,
        block_out_channels=config.unet_channels,
        layers_per_block=1,
        down_block_types=down,
        up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down)),
        cross_attention_dim=config.text_hidden,
        attention_head_dim=8,
        norm_num_groups=32,
    )


class EMA:
    """Exponential moving average of a model's parameters (what gets shipped: it samples better than the last step)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # one fused call rather than a kernel per parameter (what torch.optim.swa_utils does too)
        torch._foreach_lerp_(self.shadow, [p.detach() for p in model.parameters()], 1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, model.parameters()):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = [s.to(p.device) for s, p in zip(state["shadow"], self.shadow)]


def step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    """The randomness of one training step: a function of (seed, phase, step) only, so resumes are exact."""
    offset = {"clip": 1, "vae": 2, "unet": 3, "vae_refine": 4}[phase]
    return torch.Generator().manual_seed(((seed * 7919 + offset) * 1_000_003 + step) % 2**63)


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def config_dict(config: ToyConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def save_checkpoint(obj, path: Path) -> None:
    """Save a training checkpoint atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path):
    """A saved training checkpoint (tensors only), or None."""
    return torch.load(path, weights_only=True) if path.exists() else None
