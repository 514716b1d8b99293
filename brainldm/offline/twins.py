"""The offline wing's models, built from config with seeded random weights, and their registration.

Two families, each registered in :mod:`brainldm.ldm.registry` by :func:`register` (the ``brainldm.models`` entry point
in ``pyproject.toml``), so the product's loaders build them by name and never import this module:

- ``tiny``: Stable-Diffusion-shaped models small enough to build in a second on CPU (the LDM, SD-2-depth's LDM, a BLIP
  captioner, a DPT depth model), for tests;
- ``random-*``: the real models' architectures (SD-1.4, SD-2-depth, BLIP ViT-B, DPT-large, CLIP ViT-L/14) with
  random weights, for speed benchmarks and the rehearsal: compute and memory are the real models', outputs are not;

and ``toy``, the trained offline LDM (a diffusers folder, :data:`TOY_DIR`; :mod:`brainldm.offline.toy` trains it), with
its CLIP vision tower as the stand-in that scores its reconstructions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from brainldm.ldm import registry
from brainldm.ldm.captioner import BLIP_IMAGE_SIZE, TAKAGI_CAPTIONS, Captioner
from brainldm.ldm.loading import load_ldm
from brainldm.presets import TAKAGI2023

T = TypeVar("T")
TOY_DIR = Path(__file__).parents[1] / "models" / "toy"  # the trained offline LDM, made by scripts/train_toy_ldm.py
TINY_LATENT_GAIN = 24.0
# CLIP ViT-L/14's vision tower (openai/clip-vit-large-patch14), the metric's network
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, projection_dim=768)  # fmt: skip


def seeded(seed: int, build: Callable[[], T]) -> T:
    """``build()`` with torch's global RNG seeded, and that RNG left as it was: building a model must not move the
    caller's."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def ddim_scheduler(snr_shift: float = 1.0) -> DDIMScheduler:
    """The DDIM scheduler of Stable Diffusion v1 (``scaled_linear`` betas, eta 0 at call time).

    ``snr_shift`` multiplies every timestep's signal-to-noise ratio alpha_bar / (1 - alpha_bar), written out as the
    scheduler's ``trained_betas``; 1 is SD's own schedule. A model on a smaller latent grid needs a larger one to
    keep as much of an image's layout at the same timestep (toy's: :class:`~brainldm.offline.toy_parts.ToyConfig`).
    """
    settings = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    scheduler = DDIMScheduler(**settings)
    if snr_shift == 1:
        return scheduler
    snr = snr_shift * signal_to_noise(scheduler)
    shifted = snr / (1 + snr)
    betas = 1 - shifted / torch.cat([torch.ones(1, dtype=shifted.dtype), shifted[:-1]])
    return DDIMScheduler(**settings, trained_betas=betas.tolist())


def signal_to_noise(scheduler) -> torch.Tensor:
    """Every timestep's signal-to-noise ratio alpha_bar / (1 - alpha_bar) of a diffusers scheduler (float64)."""
    alpha_bar = scheduler.alphas_cumprod.double()
    return alpha_bar / (1 - alpha_bar)


def byte_level_clip_tokenizer(model_max_length: int = 77, merges: Sequence[tuple[str, str]] = ()) -> CLIPTokenizer:
    """A CLIP tokenizer over the 256 byte symbols (with and without CLIP's ``</w>``) and the given BPE ``merges``,
    built without any Hub file, so any text tokenizes.

    It tokenizes like CLIP's (lower-casing, BOS/EOS, padding to 77); with no merges, one token per character.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


def _components(unet_config: dict, vae_config: dict, text_config: dict, seed: int) -> dict:
    """The components of a Stable Diffusion pipeline built from configs with seeded random weights."""
    tokenizer = byte_level_clip_tokenizer()
    text_config = dict(
        text_config,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    unet, vae, text_encoder = seeded(seed, lambda: (
        UNet2DConditionModel(**unet_config),
        AutoencoderKL(**vae_config, scaling_factor=TAKAGI2023.vae_scaling_factor),
        CLIPTextModel(CLIPTextConfig(**text_config)),
    ))  # fmt: skip
    return dict(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=ddim_scheduler(),
    )


def _assemble(unet_config: dict, vae_config: dict, text_config: dict, seed: int) -> StableDiffusionImg2ImgPipeline:
    components = _components(unet_config, vae_config, text_config, seed)
    pipe = StableDiffusionImg2ImgPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The Stable Diffusion v1.4 architecture (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M), as diffusers and
# transformers configs; the smaller models here are these with a few entries changed.
SD14_UNET = dict(
    sample_size=64,  # SD-1.x's 512 px output (the weights do not depend on it)
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
SD14_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=512,
)  # fmt: skip
SD14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
    projection_dim=768, hidden_act="quick_gelu",
)  # fmt: skip


# Stable Diffusion 2 depth (stabilityai/stable-diffusion-2-depth): SD-1.4's U-Net and VAE with the depth map as a
# fifth input channel, linear attention projections and per-level head dims, conditioned on OpenCLIP ViT-H's text
# tower (hidden size 1024, 23 layers as SD-2 uses it)
SD2_DEPTH_UNET = dict(SD14_UNET, in_channels=5, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                      use_linear_projection=True)  # fmt: skip
SD2_TEXT = dict(SD14_TEXT, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                projection_dim=512, hidden_act="gelu")  # fmt: skip


# tiny's geometry: cross-attention at the lower resolution only (attention over 40x40 tokens would dominate CPU time)
TINY_UNET = dict(SD14_UNET, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=4, norm_num_groups=16, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))  # fmt: skip
TINY_VAE = dict(SD14_VAE, block_out_channels=(4, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)
TINY_TEXT = dict(SD14_TEXT, vocab_size=514, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                 num_hidden_layers=2, projection_dim=32)  # fmt: skip


def _gain_tiny_latents(vae: AutoencoderKL) -> None:
    """Random weights give latents ~25x smaller than SD's; rescale the latent map (and its inverse in the decoder)
    so scaled z has SD's unit variance and noise levels mean the same as in Stable Diffusion."""
    with torch.no_grad():
        channels = vae.config.latent_channels
        vae.quant_conv.weight[:channels] *= TINY_LATENT_GAIN
        vae.quant_conv.bias[:channels] *= TINY_LATENT_GAIN
        vae.post_quant_conv.weight /= TINY_LATENT_GAIN


def tiny_ldm(seed: int = 0) -> StableDiffusionImg2ImgPipeline:
    """A Stable-Diffusion-shaped img2img pipeline with seeded random weights, built in about a second on CPU.

    Same geometry as SD-1.x where it matters to the code: the VAE downsamples by 8 into 4 latent channels
    with scaling factor 0.18215 (so z of a 320 px image is 4 x 40 x 40), the UNet is cross-attention
    conditioned on 77 tokens, the text encoder is a CLIPTextModel (hidden size 32, so c is 77 x 32).
    """
    pipe = _assemble(TINY_UNET, TINY_VAE, TINY_TEXT, seed)
    _gain_tiny_latents(pipe.vae)
    return pipe


def tiny_depth_ldm(seed: int = 1):
    """Stable Diffusion 2 depth's shape with seeded random weights: :func:`tiny_ldm`'s components, its U-Net taking
    the depth map as a fifth input channel (``c_concat``), and no depth estimator."""

    components = _components(dict(TINY_UNET, in_channels=5), TINY_VAE, TINY_TEXT, seed)
    _gain_tiny_latents(components["vae"])
    return _depth_pipeline(components)


def random_sd14_ldm(seed: int = 0) -> StableDiffusionImg2ImgPipeline:
    """The full Stable Diffusion v1.4 architecture with random weights (:data:`SD14_UNET`, ...).

    For speed benchmarks and rehearsals only: compute and memory match the real checkpoint, the images do not.
    """
    return _assemble(SD14_UNET, SD14_VAE, SD14_TEXT, seed)


def random_sd2_depth_ldm(seed: int = 1):
    """Stable Diffusion 2 depth's architecture (:data:`SD2_DEPTH_UNET`, :data:`SD2_TEXT`) with random weights and no
    depth estimator, as :func:`load_depth_ldm` loads the real one. For rehearsals: compute and memory are the real
    model's, the images are not."""
    return _depth_pipeline(_components(SD2_DEPTH_UNET, SD14_VAE, SD2_TEXT, seed))


def _depth_pipeline(components: dict):
    """A depth img2img pipeline of built components, without a depth estimator (depth comes from the brain)."""
    from diffusers import StableDiffusionDepth2ImgPipeline

    pipe = StableDiffusionDepth2ImgPipeline(**components, depth_estimator=None, feature_extractor=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# tiny's words: those of captions naming animals, the offline world's (brainldm.offline.synthetic) among them, so
# that its captions tokenize whole (tests/test_synthetic.py checks they do)
TINY_CAPTION_WORDS = (
    ",",
    ".",
    ":",
    "a",
    "an",
    "and",
    "animals",
    "giraffe",
    "image",
    "leopard",
    "next",
    "of",
    "picture",
    "sheep",
    "showing",
    "snake",
    "some",
    "standing",
    "tiger",
    "to",
    "together",
    "zebra",
)


def tiny_captioner(seed: int = 0) -> Captioner:
    """A BLIP captioner with seeded random weights (vision width 32 at 64 px; text decoder width 32, 2 layers) and a
    word-level BERT tokenizer over the prompt and :data:`TINY_CAPTION_WORDS`. Built in a second.
    Its weights are drawn 10x wider than BLIP's initialisation, so that its captions depend on the image."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocabulary = specials + sorted(set(TAKAGI_CAPTIONS.prompt.split()) | set(TINY_CAPTION_WORDS))
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocabulary)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    ids = {w: i for i, w in enumerate(vocabulary)}
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=16, initializer_range=0.2),
        text_config=dict(vocab_size=len(vocabulary), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                         bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"], pad_token_id=ids["[PAD]"],
                         eos_token_id=ids["[SEP]"], initializer_range=0.2),
        projection_dim=32,
        initializer_range=0.2,
    )  # fmt: skip
    model = seeded(seed, lambda: BlipForConditionalGeneration(config))
    return Captioner(model.eval(), tokenizer, image_size=64)


def random_blip_captioner(seed: int = 0) -> Captioner:
    """BLIP's captioner architecture (:data:`BLIP_MODEL`: ViT-B/16 vision tower, BERT-base text decoder; transformers'
    ``BlipConfig`` defaults) with seeded random weights, and a word-level tokenizer of the same vocabulary size
    (placeholder words), built without any Hub file. For rehearsals: compute, memory and shapes are the real model's
    (a 226 x 768 embedding at 240 px), the captions are random words."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

    config = BlipConfig()
    text = config.text_config
    vocabulary = [f"w{i}" for i in range(text.vocab_size)]
    for token, index in (("[PAD]", text.pad_token_id), ("[UNK]", 100), ("[CLS]", 101), ("[SEP]", text.sep_token_id),
                         ("[MASK]", 103), ("[DEC]", text.bos_token_id)):  # fmt: skip
        vocabulary[index] = token
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocabulary)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    model = seeded(seed, lambda: BlipForConditionalGeneration(config))
    return Captioner(model.eval(), tokenizer, image_size=BLIP_IMAGE_SIZE)


def tiny_depth_model(seed: int = 0):
    """DPT with seeded random weights: a 4-layer ViT of width 32 at 64 px (17 tokens), every layer passed to a small
    neck. Built in a second. Its weights are drawn 10x wider than DPT's initialisation, so that its depth maps are
    of DPT-large's magnitude (hundreds) and differ between images, not ~1e-10."""
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=64,
        patch_size=16, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
        head_in_index=-1, initializer_range=0.2,
    )  # fmt: skip
    return seeded(seed, lambda: DPTForDepthEstimation(config)).eval()


def random_dpt_large(seed: int = 0):
    """DPT-large's architecture (:data:`DPT_MODEL`: ViT-L/16 at 384 px, layers 5, 11, 17 and 23 to the neck) with
    seeded random weights. For rehearsals: compute, memory and the ``dpt`` target's shape (4 x 577 x 1024) are the
    real model's, the depth maps are not."""
    from transformers import DPTConfig, DPTForDepthEstimation

    config = DPTConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, image_size=384,
        patch_size=16, backbone_out_indices=[5, 11, 17, 23], neck_hidden_sizes=[256, 512, 1024, 1024],
        fusion_hidden_size=256, head_in_index=-1,
    )  # fmt: skip
    return seeded(seed, lambda: DPTForDepthEstimation(config)).eval()


def random_clip_l14(seed: int = 0):
    """CLIP ViT-L/14's vision tower with projection (:data:`CLIP_L14_VISION`) with seeded random weights: the CLIP
    metric's network in a rehearsal."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return seeded(seed, lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L14_VISION))).eval()


def toy_ldm() -> StableDiffusionImg2ImgPipeline:
    """``toy``, the trained offline LDM: its diffusers folder, loaded as any folder is."""
    return load_ldm(str(TOY_DIR), device="cpu", dtype=torch.float32)


def toy_clip():
    """toy's CLIP vision tower (its ``image_encoder``), trained with its text encoder on the offline world's pictures
    and captions: the stand-in for CLIP ViT-L/14, which cannot be downloaded offline and would not know them. Its
    scores are not comparable with published CLIP figures."""
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(TOY_DIR / "image_encoder").eval()


def register() -> None:
    """Register every model here with the product's registry (the ``brainldm.models`` entry point)."""
    add = registry.register
    add("ldm", "tiny", tiny_ldm, "SD-shaped, seeded random weights, built in a second (tests)")
    add("ldm", "toy", toy_ldm, "the trained offline LDM (brainldm/models/toy)", clip="toy")
    add("ldm", "random-sd14", random_sd14_ldm, "SD-1.4's architecture, random weights (rehearsals)", rehearsal=True,
        clip="random-clip-l14")  # fmt: skip
    add("depth_ldm", "tiny", tiny_depth_ldm, "SD-2-depth-shaped, seeded random weights (tests)")
    add("depth_ldm", "random-sd2-depth", random_sd2_depth_ldm, "SD-2-depth's architecture, random weights",
        rehearsal=True)  # fmt: skip
    add("captioner", "tiny", tiny_captioner, "a BLIP captioner with seeded random weights over the world's words")
    add("captioner", "random-blip", random_blip_captioner, "BLIP ViT-B's architecture, random weights", rehearsal=True)
    add("depth_model", "tiny", tiny_depth_model, "a DPT with seeded random weights (tests)")
    add("depth_model", "random-dpt-large", random_dpt_large, "DPT-large's architecture, random weights",
        rehearsal=True)  # fmt: skip
    add("clip", "random-clip-l14", random_clip_l14, "CLIP ViT-L/14's vision tower, random weights", rehearsal=True)
    add("clip", "toy", toy_clip, "toy's own CLIP vision tower (the offline stand-in for CLIP ViT-L/14)")
