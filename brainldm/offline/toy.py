"""``toy``: the offline world's trained latent diffusion model, and how it is trained.

A Stable-Diffusion-shaped model small enough to train in minutes on a GPU (a CPU-sized run takes 45 minutes on 2
cores and scores lower), on the offline world's pictures and captions
(:func:`brainldm.offline.synthetic.draw_picture`). Its
parts are the ones SD has, in the classes diffusers and transformers use for SD, so every code path of brainldm
runs on it unchanged:

- a CLIP pair (``CLIPModel``) trained contrastively on (picture, caption) pairs; its text tower
  (``text_encoder``, last hidden states = c) conditions the U-Net, its vision tower with projection
  (``image_encoder``) is the offline stand-in for the CLIP ViT-L/14 metric;
- a VAE (``AutoencoderKL``, downsampling by 8) with ``scaling_factor`` set so scaled latents have unit variance;
- a ``UNet2DConditionModel`` trained with the noise-prediction loss on VAE latents, conditioned on the frozen
  text tower, with 10% empty captions so classifier-free guidance works; SD's DDIM scheduler, every timestep's
  signal-to-noise ratio multiplied by ``snr_shift`` (written into the saved scheduler's ``trained_betas``).

Sizes keep the paper's proportions at 128 px output: z from the picture at 80 px (SD: 320 of 512). They travel
with the model (the U-Net's ``sample_size`` times the VAE's factor, see :func:`brainldm.ldm.loading.ldm_sizes`).

Training is four phases (:func:`train_clip`, :func:`train_vae`, :func:`encode_latents`, :func:`train_unet`),
each a pure loop over models passed in, checkpointed by the caller (``scripts/train_toy_ldm.py``). Every step's
randomness comes from ``(seed, phase, step)``, so a resumed run continues exactly where a killed one stopped.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from brainldm.analysis.evaluate import clip_extractor
from brainldm.images import pictures_to_tensor
from brainldm.ldm.features import encode_c, encode_z
from brainldm.ldm.loading import byte_level_clip_tokenizer, ddim_scheduler, load_ldm, signal_to_noise
from brainldm.ldm.reconstruct import Reconstructor
from brainldm.metrics import pixcorr, two_way_identification
from brainldm.offline.synthetic import draw_picture
from brainldm.offline.toy_card import toy_card, toy_reproduce
from brainldm.paths import atomic_path
from brainldm.presets import TAKAGI2023, Sampling
from brainldm.torch_utils import default_device
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


# --- training phases ---------------------------------------------------------------------------------------
# Each takes its model and optimizer, runs steps [start, stop) and calls ``checkpoint(step)`` every
# ``every`` steps; the caller owns saving, so the loops stay free of file handling.


def _descend(optimizer, loss: torch.Tensor, lr: float, clip_params=None) -> None:
    """One optimiser step on ``loss`` at learning rate ``lr``; gradients of ``clip_params`` clipped to norm 1."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    optimizer.step()


@dataclass
class Stage:
    """One training stage's bookkeeping: its optimizer, the step it starts (or resumes) from, the device, and what it
    calls on the way: ``checkpoint(step, loss)`` every ``every`` steps and after the last, and a progress bar."""

    optimizer: torch.optim.Optimizer
    config: ToyConfig
    device: torch.device
    start: int = 0
    checkpoint: Callable[[int, float], None] = lambda step, loss: None
    every: int = 250
    progress: Any = None

    def report(self, step: int, steps: int, loss: float, digits: int = 4) -> None:
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{loss:.{digits}f}")
        if (step + 1) % self.every == 0 or step + 1 == steps:
            self.checkpoint(step + 1, loss)


def _caption_index(caption_owner, n_pictures: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(captions per picture, index of each picture's first caption): captions are stored picture by picture."""
    counts = torch.bincount(torch.as_tensor(caption_owner), minlength=n_pictures)
    return counts, torch.cumsum(counts, 0) - counts


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def train_clip(clip, token_ids, caption_owner, pictures, stage: Stage) -> None:
    """Contrastive (InfoNCE) training on (picture, one of its captions). ``token_ids``: (n_captions, 77);
    ``caption_owner``: (n_captions,) picture index of each; ``pictures``: uint8 at the vision tower's size."""
    config, device = stage.config, stage.device
    counts, first = _caption_index(caption_owner, len(pictures))
    clip.train()
    for step in range(stage.start, config.clip_steps):
        g = step_generator(config.seed, "clip", step)
        items = torch.randperm(len(pictures), generator=g)[: config.clip_batch]
        captions = first[items] + torch.randint(0, 1 << 30, (len(items),), generator=g) % counts[items]
        out = clip(
            input_ids=token_ids[captions].to(device),
            pixel_values=pictures_to_tensor(torch.from_numpy(pictures[items.numpy()]), "clip").to(device),
            return_loss=True,
        )
        _descend(stage.optimizer, out.loss, lr_at(step, config.clip_steps, config.clip_lr))
        stage.report(step, config.clip_steps, out.loss.item(), digits=3)
    clip.eval()


def _vae_crops(pictures: np.ndarray, small: np.ndarray, config: ToyConfig, g: torch.Generator, step: int):
    """A batch of ``vae_crop`` crops in [-1, 1], from the pictures at the output size on even steps and at z's size on
    odd ones."""
    source = small if step % 2 else pictures
    items = torch.randint(0, len(source), (config.vae_batch,), generator=g).numpy()
    y0, x0 = torch.randint(0, source.shape[1] - config.vae_crop + 1, (2,), generator=g).tolist()
    return to_unit(source[items, y0 : y0 + config.vae_crop, x0 : x0 + config.vae_crop])


def _vae_loss(vae, x: torch.Tensor, config: ToyConfig, g: torch.Generator):
    """(L1 + MSE of a round trip through a posterior sample + ``vae_kl`` x KL, the posterior) for a batch ``x``."""
    posterior = vae.encode(x).latent_dist
    eps = torch.randn(posterior.mean.shape, generator=g).to(x.device)
    recon = vae.decode(posterior.mean + posterior.std * eps).sample
    return F.l1_loss(recon, x) + F.mse_loss(recon, x) + config.vae_kl * posterior.kl().mean(), posterior


def train_vae(vae, pictures, stage: Stage) -> None:
    """Reconstruction training on random crops of the pictures at the output size and at z's size (5/8 of it),
    so the VAE serves both Xz (decoded from z at 5/8) and img2img (at the output size).
    Loss: L1 + MSE on pixels in [-1, 1], plus a small KL term."""
    config, device = stage.config, stage.device
    small = resize(pictures, config.image_size * 5 // 8)
    vae.train()
    for step in range(stage.start, config.vae_steps):
        g = step_generator(config.seed, "vae", step)
        x = _vae_crops(pictures, small, config, g, step).to(device)
        loss, _ = _vae_loss(vae, x, config, g)
        _descend(stage.optimizer, loss, lr_at(step, config.vae_steps, config.vae_lr), vae.parameters())
        stage.report(step, config.vae_steps, loss.item())
    vae.eval()


REFINE_ANCHOR = 0.1  # train_vae_refine: weight of the pull towards the unrefined latents (MSE over their variance)


def train_vae_refine(vae, anchor, pictures, stage: Stage) -> None:
    """:func:`train_vae` again, at ``vae_lr`` / 4, on crops mirrored left-right half the time, plus a pull of the
    latent means towards ``anchor``'s (a frozen copy of the unrefined VAE: ``REFINE_ANCHOR`` x their MSE over their
    variance), so that z, and a U-Net trained on the old latents, move little.

    Why mirrored: the world's snakes' stripes run one diagonal, giraffes' chequerboards both (a chequerboard is two
    crossed diagonal gratings), so a VAE trained on the pictures alone saw the other diagonal only inside
    chequerboards, and did not keep it: a lone grating along it came back from toy's first VAE nearly blank, and
    giraffes as snakes. Mirrored snakes run the other diagonal."""
    config, device = stage.config, stage.device
    small = resize(pictures, config.image_size * 5 // 8)
    vae.train()
    for step in range(stage.start, config.vae_refine_steps):
        g = step_generator(config.seed, "vae_refine", step)
        x = _vae_crops(pictures, small, config, g, step).to(device)
        mirrored = (torch.rand(len(x), generator=g) < 0.5).to(device)[:, None, None, None]
        x = torch.where(mirrored, x.flip(-1), x)
        loss, posterior = _vae_loss(vae, x, config, g)
        with torch.no_grad():
            target = anchor.encode(x).latent_dist.mean
        loss = loss + REFINE_ANCHOR * F.mse_loss(posterior.mean, target) / target.var()
        _descend(stage.optimizer, loss, lr_at(step, config.vae_refine_steps, config.vae_lr / 4), vae.parameters())
        stage.report(step, config.vae_refine_steps, loss.item())
    vae.eval()


@torch.no_grad()
def encode_latents(vae, pictures: np.ndarray, device, batch: int = 64, progress=None) -> torch.Tensor:
    """Unscaled VAE latent means of the pictures at their own size -> (n, 4, size / 8, size / 8) float32 CPU."""
    out = []
    for start in range(0, len(pictures), batch):
        x = to_unit(pictures[start : start + batch]).to(device)
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
        if progress is not None:
            progress.update(len(x))
    return torch.cat(out)


@torch.no_grad()
def encode_text(text_encoder, token_ids: torch.Tensor, device, batch: int = 256, progress=None) -> torch.Tensor:
    """Last hidden states of the text tower for each token row -> (n, 77, hidden), float16 on the CPU."""
    out = []
    for start in range(0, len(token_ids), batch):
        out.append(text_encoder(token_ids[start : start + batch].to(device))[0].half().cpu())
        if progress is not None:
            progress.update(len(out[-1]))
    return torch.cat(out)


def train_unet(unet, ema, latents, caption_states, caption_owner, empty_state, scheduler, stage: Stage) -> None:
    """Noise prediction (epsilon, MSE) on scaled latents (n, 4, h, w), conditioned on the frozen text tower's
    states of the captions (``caption_states``: (n_captions, 77, hidden), computed once; ``caption_owner``: the
    picture of each caption; ``empty_state``: (77, hidden) for "").

    Per item, the condition is the mean over all its captions (what c is) or one of them, each half the time,
    or the empty caption with probability ``caption_dropout`` (so classifier-free guidance works).

    With ``caption_mix`` > 0, each kept condition also moves by lam x (mean_j - mean_k) for two random pictures j and
    k, lam uniform in [0, caption_mix]: a condition off by other pictures' meaning, as a decoded c is (its ridge
    error lies in the span of the training pictures' c), must still draw its own picture.
    """
    config, device = stage.config, stage.device
    owner = torch.as_tensor(caption_owner)
    counts, first = _caption_index(owner, len(latents))
    mean_states = torch.zeros((len(latents), *caption_states.shape[1:]), device=caption_states.device)
    mean_states.index_add_(0, owner.to(caption_states.device), caption_states.float())
    mean_states = (mean_states / counts.to(mean_states.device)[:, None, None]).to(caption_states.dtype)
    empty_state = empty_state.to(device, torch.float32)
    unet.train()
    for step in range(stage.start, config.unet_steps):
        g = step_generator(config.seed, "unet", step)
        items = torch.randint(0, len(latents), (config.unet_batch,), generator=g)
        mode = torch.rand(len(items), generator=g)
        one = first[items] + torch.randint(0, 1 << 30, (len(items),), generator=g) % counts[items]
        single = caption_states[one.to(caption_states.device)].to(device, torch.float32)
        mean = mean_states[items.to(mean_states.device)].to(device, torch.float32)
        use_mean = (mode < 0.5 + config.caption_dropout / 2).to(device)[:, None, None]
        drop = (mode < config.caption_dropout).to(device)[:, None, None]
        cond = torch.where(use_mean, mean, single)
        if config.caption_mix > 0:  # drawn only when on: a run without it draws what earlier toys drew
            j, k = (torch.randint(0, len(latents), (len(items),), generator=g) for _ in range(2))
            lam = (torch.rand(len(items), generator=g) * config.caption_mix).to(device)[:, None, None]
            offset = mean_states[j.to(mean_states.device)] - mean_states[k.to(mean_states.device)]
            cond = cond + lam * offset.to(device, torch.float32)
        cond = torch.where(drop, empty_state, cond)
        x0 = latents[items].to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(items),), generator=g).to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
        _descend(stage.optimizer, loss, lr_at(step, config.unet_steps, config.unet_lr), unet.parameters())
        ema.update(unet)
        stage.report(step, config.unet_steps, loss.item())
    unet.eval()


# --- scores ------------------------------------------------------------------------------------------------


def score_toy(
    ldm,
    image_encoder,
    pictures: np.ndarray,
    captions: list[list[str]],
    steps: int = TAKAGI2023.sampling.num_inference_steps,
    guidance_scale: float = TAKAGI2023.sampling.guidance_scale,
    seed: int = 0,
) -> dict[str, float]:
    """The model card's figures on held-out pairs (uint8 pictures at the output size and their captions):

    - ``vae_pixcorr``: mean PixCorr of VAE round trips at the output size (and ``vae_pixcorr_z`` at z's size);
    - ``t2i_clip_id`` / ``t2i_pixel_id``: 2-way identification of text-to-image generations from the mean
      caption embedding (c), in the toy vision tower's space and in pixel space (chance 0.5);
    - ``t2i_steps`` / ``t2i_guidance``: the sampling settings of those generations.
    """

    recon = Reconstructor(ldm)
    size, z_size = recon.output_size, recon.z_image_size
    scores = {}
    for key, s in (("vae_pixcorr", size), ("vae_pixcorr_z", z_size)):
        originals = resize(pictures, s) if s != pictures.shape[1] else pictures
        vae = ldm.vae
        with torch.no_grad():
            z = encode_z(ldm, list(originals), image_size=s)
            out = vae.decode(z.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
        back = ((out.float().clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(0, 2, 3, 1).cpu().numpy()
        scores[key] = float(np.mean([pixcorr(a, b) for a, b in zip(back, originals)]))
    c = encode_c(ldm, captions)
    z = encode_z(ldm, list(pictures), image_size=z_size)
    generated = recon(z, c, Sampling(guidance_scale=guidance_scale, num_inference_steps=steps, seed=seed)).Xc[:, 0]
    scores["t2i_steps"], scores["t2i_guidance"] = steps, guidance_scale

    extract = clip_extractor(image_encoder)
    scores["t2i_clip_id"] = float(two_way_identification(extract(list(generated)), extract(list(pictures))).mean())
    scores["t2i_pixel_id"] = float(
        two_way_identification(generated.reshape(len(generated), -1), pictures.reshape(len(pictures), -1)).mean()
    )
    return scores


def config_dict(config: ToyConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


# --- training: every phase, checkpointed and resumable ----------------------------------------------------------


def _save_checkpoint(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load_checkpoint(path: Path):
    return torch.load(path, weights_only=True) if path.exists() else None


def grow_unet(saved, config: ToyConfig):
    """``saved`` (a toy U-Net) with cross-attention at ``config.unet_attention_levels`` levels, more than it has: the
    new attention blocks are built seeded and their output projections zeroed, so the grown U-Net computes exactly
    what ``saved`` does until training teaches them something."""

    n, levels = len(config.unet_channels), config.unet_attention_levels
    had = sum(t.startswith("CrossAttn") for t in saved.config.down_block_types)
    torch.manual_seed(config.seed + 2)
    unet = build_unet(config)
    # levels run coarsest first in the up blocks and last in the down blocks
    new = [f"down_blocks.{i}" for i in range(n - levels, n - had)] + [f"up_blocks.{i}" for i in range(had, levels)]
    missing, unexpected = unet.load_state_dict(saved.state_dict(), strict=False)
    if not new or unexpected or not all(k.startswith(tuple(f"{b}.attentions." for b in new)) for k in missing):
        raise InputError(
            f"cannot grow a U-Net with cross-attention at {had} levels into one with {levels}: "
            f"{len(unexpected)} unexpected and {len(missing)} missing weights (other channels or blocks?)"
        )
    for name in new:
        for attention in unet.get_submodule(name).attentions:
            torch.nn.init.zeros_(attention.proj_out.weight)
            torch.nn.init.zeros_(attention.proj_out.bias)
    return unet


def retime_unet(unet, old, new, steps: int = 3000) -> None:
    """Refit ``unet``'s time embedding in place so that it reads ``new``'s timesteps as ``old`` read the ones with the
    same signal-to-noise ratio (``old`` and ``new``: diffusers schedulers with ``alphas_cumprod``).

    The U-Net sees the timestep only through that embedding, and its input x_t at a given SNR is the same under
    either schedule, so the refitted U-Net computes what the old one did (to the fit's error, about 0.2% of the
    embedding's size), with no training. ``steps``: full-batch Adam steps over the 1000 timesteps, deterministic.
    """

    old_snr, new_snr = (torch.log(signal_to_noise(scheduler)).numpy() for scheduler in (old, new))
    timesteps = np.arange(len(new_snr))
    # log SNR falls with t: interpolate t over -log SNR; SNRs beyond the old schedule's range take its ends
    matched = np.interp(-new_snr, -old_snr, np.arange(len(old_snr)))
    embed, project = unet.time_embedding, unet.time_proj
    dtype = next(embed.parameters()).dtype
    with torch.no_grad():
        target = embed(project(torch.as_tensor(matched, dtype=torch.float32)).to(dtype))
    x = project(torch.as_tensor(timesteps, dtype=torch.float32)).to(dtype)
    opt = torch.optim.Adam(embed.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = F.mse_loss(embed(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()


def seed_work_from_model(model_dir: str | Path, work: str | Path, config: ToyConfig) -> None:
    """Fill an empty ``work`` with checkpoints taken from a saved toy, so that :func:`train_toy` with ``config`` (its
    recipe with a longer ``unet_steps``, or with more ``unet_attention_levels``, or another ``caption_mix`` or
    ``snr_shift``, or a ``vae_refine_steps``) continues that toy's U-Net rather than training from scratch.

    The CLIP pair and the VAE count as trained. A continuation resumes the U-Net at its saved step from its saved
    (EMA, float16) weights; a grown U-Net (:func:`grow_unet`), or one fine-tuned with another ``caption_mix`` or
    ``snr_shift`` or on the latents of a refined VAE (:func:`train_vae_refine`, which a VAE gets once), and
    ``unet_lr``, if given, starts a schedule of its own, ``unet_steps`` long; with another ``snr_shift``, from the
    saved U-Net retimed to it (:func:`retime_unet`).
    Either way the optimizer is fresh and the EMA starts from the weights; the training minutes, and a
    continuation's earlier history, carry over. The text projection, which a saved toy does not keep and training
    no longer uses, stays as built. A ``work`` seeded earlier is left as it is, so that a killed run resumes.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    model_dir, work = Path(model_dir), Path(work)
    if (work / "init.json").exists():
        return
    record_path = model_dir / "training.json"
    if not record_path.is_file():
        raise InputError(f"{model_dir} has no training.json: --init takes a folder written by train_toy_ldm.py")
    record = json.loads(record_path.read_text())
    # toys saved before these settings had 2 levels, no mixing, SD's schedule and an unrefined VAE
    saved = {"unet_attention_levels": 2, "caption_mix": 0.0, "snr_shift": 1.0, "vae_refine_steps": 0}
    saved.update(record["config"])
    settings = config_dict(config)
    grown = settings["unet_attention_levels"] > saved["unet_attention_levels"]
    retimed = settings["snr_shift"] != saved["snr_shift"]
    refined = settings["vae_refine_steps"] != saved["vae_refine_steps"]
    # a U-Net with a schedule of its own: grown, or fine-tuned with another caption_mix or snr_shift or on a refined
    # VAE's latents (at its own unet_lr)
    own = grown or retimed or refined or settings["caption_mix"] != saved["caption_mix"]
    free = ("unet_steps", "n_heldout", "unet_attention_levels", "caption_mix", "snr_shift", "vae_refine_steps")
    free += ("unet_lr",) if own else ()
    changed = sorted(k for k in settings if k not in free and saved.get(k) != settings[k])
    if settings["unet_attention_levels"] < saved["unet_attention_levels"]:  # a U-Net can grow, not shrink
        changed.append("unet_attention_levels")
    if refined and saved["vae_refine_steps"]:  # a VAE is refined once
        changed.append("vae_refine_steps")
    if changed:
        raise InputError(
            f"--init {model_dir}: a continuation takes the saved recipe with a longer --unet-steps (saved "
            f"{saved['unet_steps']}), or with more --unet-attention-levels (saved {saved['unet_attention_levels']}), "
            f"or with another --caption-mix (saved {saved['caption_mix']}) or --snr-shift (saved "
            f"{saved['snr_shift']}), or with a --vae-refine-steps (saved {saved['vae_refine_steps']}; once), and then "
            "any --unet-lr; these differ: "
            + ", ".join(f"--{k.replace('_', '-')} {settings[k]} (saved {saved.get(k)})" for k in changed)
        )
    if not own and settings["unet_steps"] <= saved["unet_steps"]:
        already = (
            f"its VAE is already refined ({saved['vae_refine_steps']} steps, as --vae-refine-steps asks), so "
            if saved["vae_refine_steps"]
            else ""
        )
        raise InputError(
            f"--init {model_dir}: {already}nothing would train: --unet-steps {settings['unet_steps']} is not past the "
            f"saved {saved['unet_steps']}; continue its U-Net with a longer --unet-steps"
        )
    if any(work.glob("*.pt")):
        raise InputError(f"--init needs an empty --work folder; {work} holds checkpoints")
    work.mkdir(parents=True, exist_ok=True)

    def state(model, step: int, **extra) -> dict:  # no optimizer state: train_toy's own starts fresh
        return {"model": model.state_dict(), "optimizer": None, "step": step, "loss": float("nan"), **extra}

    clip = build_clip(CLIPTokenizer.from_pretrained(model_dir / "tokenizer"), config)
    clip.text_model.load_state_dict(CLIPTextModel.from_pretrained(model_dir / "text_encoder").float().state_dict())
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(model_dir / "image_encoder").float()
    clip.vision_model.load_state_dict(image_encoder.vision_model.state_dict())
    clip.visual_projection.load_state_dict(image_encoder.visual_projection.state_dict())
    _save_checkpoint(state(clip, config.clip_steps), work / "clip.pt")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae").float()
    _save_checkpoint(state(vae, config.vae_steps), work / "vae.pt")
    if saved["vae_refine_steps"] and not refined:  # refined already: train_toy's refinement is done
        _save_checkpoint(state(vae, config.vae_refine_steps), work / "vae_refine.pt")
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").float()
    init = {"from": str(model_dir), "unet_steps": saved["unet_steps"]}
    if own:
        if grown:
            unet = grow_unet(unet, config)
        if retimed:
            retime_unet(unet, ddim_scheduler(saved["snr_shift"]), ddim_scheduler(config.snr_shift))
        saved_config = ToyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        # how the saved toy was made, for this one's card: its U-Net is where this run's starts
        init.update(
            grown_from_levels=saved["unet_attention_levels"],
            snr_shift_from=saved["snr_shift"],
            vae_refine_from=saved["vae_refine_steps"],
            runs=toy_reproduce(saved_config, record.get("unet_continued_from", []), record.get("init")),
        )
    ema = EMA(unet, config.ema_decay).state_dict()
    start = 0 if own else saved["unet_steps"]
    _save_checkpoint(state(unet, start, ema=ema), work / "unet.pt")
    # a continuation's stamp says where the saved U-Net stopped, so train_toy continues it; a new schedule's is its own
    stamp = settings if own else {**settings, "unet_steps": start}
    (work / "config.json").write_text(json.dumps(stamp, indent=1))
    (work / "unet_history.json").write_text(json.dumps([] if own else record.get("unet_continued_from", [])))
    (work / "minutes.json").write_text(json.dumps({"minutes": record["train_minutes"]}))
    (work / "init.json").write_text(json.dumps(init))


def train_toy(
    config: ToyConfig,
    out: str | Path,
    work: str | Path,
    device: str | None = None,
    eval_steps: int = TAKAGI2023.sampling.num_inference_steps,
) -> None:
    """Train toy with ``config`` into the diffusers folder ``out``, checkpointing every phase into ``work``.

    Phases: draw pictures and captions -> CLIP pair (contrastive) -> VAE (and its refinement, if
    ``vae_refine_steps``) -> encode latents -> U-Net (noise
    prediction, conditioned on the frozen text tower, EMA) -> save in diffusers format (fp16 safetensors) -> score on
    held-out pairs (``eval_steps`` DDIM steps) -> model card. Seeded and resumable: a rerun continues where a killed
    run stopped; a rerun with other settings into the same ``work`` is refused, naming them. A ``work`` seeded by
    :func:`seed_work_from_model` continues a saved toy's U-Net.
    """
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    t0 = time.time()
    device = default_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    stamp = work / "config.json"
    stored, settings = (json.loads(stamp.read_text()) if stamp.exists() else None), config_dict(config)
    history_path = work / "unet_history.json"  # the U-Net step counts earlier runs in ``work`` were continued from
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    if stored is not None and {k for k in settings if stored.get(k) != settings.get(k)} == {"unet_steps"}:
        if settings["unet_steps"] > stored["unet_steps"]:  # a longer U-Net: every earlier phase is reused
            print(f"continuing the U-Net from {stored['unet_steps']} steps to {config.unet_steps}")
            history.append(stored["unet_steps"])
            history_path.write_text(json.dumps(history))
            stored = settings
    if stored is not None and stored != settings:
        changed = ", ".join(
            f"--{k.replace('_', '-')} {settings.get(k)} (the checkpoints': {stored.get(k)})"
            for k in sorted(set(stored) | set(settings))
            if stored.get(k) != settings.get(k)
        )
        raise InputError(
            f"{work} holds checkpoints of a run with other settings: {changed}; resume with the same settings, or "
            "delete it or pass another --work to start again"
        )
    stamp.write_text(json.dumps(config_dict(config), indent=1))
    print(f"training toy on {device}; checkpoints in {work}")

    # 1. pictures and captions
    data = work / "pairs.npz"
    if not data.exists():
        train_pics, train_caps = draw_pairs(config.n_train, config.seed, config.image_size)
        held_pics, held_caps = draw_pairs(config.n_heldout, config.seed + 1_000_000, config.image_size)
        tmp = work / "pairs.tmp.npz"
        np.savez(
            tmp, train=train_pics, heldout=held_pics, captions=json.dumps({"train": train_caps, "heldout": held_caps})
        )
        tmp.replace(data)
    with np.load(data) as f:
        pictures, heldout = f["train"], f["heldout"]
        captions = json.loads(str(f["captions"]))
    print(f"{len(pictures)} training and {len(heldout)} held-out pictures ({time.time() - t0:.0f} s)")

    tokenizer = caption_tokenizer(captions["train"])
    owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(captions["train"])])
    token_ids = tokenize(tokenizer, [c for caps in captions["train"] for c in caps])

    # 2. CLIP pair
    torch.manual_seed(config.seed)
    clip = build_clip(tokenizer, config).to(device)
    opt = torch.optim.AdamW(clip.parameters(), lr=config.clip_lr, weight_decay=0.1)
    start = _resume(work / "clip.pt", clip, opt)
    vision_pics = resize(pictures, config.vision_size)
    with tqdm(total=config.clip_steps, initial=start, desc="CLIP pair") as bar:
        stage = Stage(opt, config, device, start, _checkpointer(work / "clip.pt", clip, opt), progress=bar)
        train_clip(clip, token_ids, owner, vision_pics, stage)
    text_encoder, image_encoder = (m.to(device) for m in split_clip(clip.cpu()))

    # 3. VAE
    torch.manual_seed(config.seed + 1)
    vae = build_vae(config).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start = _resume(work / "vae.pt", vae, opt)
    with tqdm(total=config.vae_steps, initial=start, desc="VAE") as bar:
        stage = Stage(opt, config, device, start, _checkpointer(work / "vae.pt", vae, opt), progress=bar)
        train_vae(vae, pictures, stage)
    if config.vae_refine_steps:
        anchor = copy.deepcopy(vae).requires_grad_(False)  # the VAE as its own phase left it
        opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr / 4, weight_decay=0.0)
        start = _resume(work / "vae_refine.pt", vae, opt)
        with tqdm(total=config.vae_refine_steps, initial=start, desc="VAE refinement") as bar:
            stage = Stage(opt, config, device, start, _checkpointer(work / "vae_refine.pt", vae, opt), progress=bar)
            train_vae_refine(vae, anchor, pictures, stage)

    # 4. latents of the training pictures, and the scaling factor that gives them unit variance
    latents_path = work / "latents.pt"
    if not latents_path.exists():
        with tqdm(total=len(pictures), desc="latents") as bar:
            _save_checkpoint(encode_latents(vae, pictures, device, progress=bar), latents_path)
    latents = _load_checkpoint(latents_path)
    scaling_factor = float(1.0 / latents.std())
    latents = latents * scaling_factor

    # 5. U-Net
    torch.manual_seed(config.seed + 2)
    unet = build_unet(config).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.01)
    ema = EMA(unet, config.ema_decay)
    start = _resume(work / "unet.pt", unet, opt, ema)
    with tqdm(total=len(token_ids), desc="caption states") as bar:
        states = encode_text(text_encoder, token_ids, device, progress=bar)
    empty = encode_text(text_encoder, tokenize(tokenizer, [""]), device)[0]
    if device.type == "cuda":
        states = states.to(device)
    with tqdm(total=config.unet_steps, initial=start, desc="U-Net") as bar:
        stage = Stage(opt, config, device, start, _checkpointer(work / "unet.pt", unet, opt, ema), progress=bar)
        train_unet(unet, ema, latents, states, owner, empty, ddim_scheduler(config.snr_shift), stage)
    ema.copy_to(unet)
    minutes_path = work / "minutes.json"  # training time of earlier runs in ``work`` that finished the U-Net
    init_path = work / "init.json"  # written by seed_work_from_model: the saved toy this run continued
    init = json.loads(init_path.read_text()) if init_path.exists() else None
    carried = minutes_path.exists() and (history or init and "runs" in init)
    earlier = json.loads(minutes_path.read_text())["minutes"] if carried else 0.0
    minutes = earlier + (time.time() - t0) / 60
    minutes_path.write_text(json.dumps({"minutes": minutes}))

    # 6. save (fp16), reload as any diffusers model is loaded, score, write the card
    from diffusers import StableDiffusionImg2ImgPipeline

    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim_scheduler(config.snr_shift),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    ).to(dtype=torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)

    ldm = load_ldm(str(tmp), device=device, dtype=torch.float32)
    print("scoring on held-out pairs ...")
    scores = score_toy(ldm, ldm.image_encoder, heldout, captions["heldout"], steps=eval_steps, seed=config.seed)
    for k, v in scores.items():
        print(f"  {k}: {v:.3f}")
    size_mb = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 1e6
    (tmp / "README.md").write_text(toy_card(config, scores, minutes, str(device), size_mb, history, init))
    (tmp / "training.json").write_text(
        json.dumps(
            {
                "config": config_dict(config),
                "scores": scores,
                "train_minutes": minutes,
                "device": str(device),
                "unet_continued_from": history,
                "init": init,
            },
            indent=1,
        )  # fmt: skip
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    print(f"wrote {out} ({size_mb:.1f} MB) in {(time.time() - t0) / 60:.1f} min")


def _resume(path: Path, model, optimizer, ema=None) -> int:
    state = _load_checkpoint(path)
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    if state["optimizer"] is not None:  # None: seeded from a saved model (seed_work_from_model)
        optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return int(state["step"])


def _checkpointer(path: Path, model, optimizer, ema=None):
    def checkpoint(step: int, loss: float) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "loss": loss}
        if ema is not None:
            state["ema"] = ema.state_dict()
        _save_checkpoint(state, path)

    return checkpoint
