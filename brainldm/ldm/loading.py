"""Load a latent diffusion model (Stable Diffusion through diffusers), or build one offline.

Everything downstream takes a :class:`~diffusers.StableDiffusionImg2ImgPipeline` and uses its components
(``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``). Three sources give one:

- a Hub model id or a local diffusers folder (``load_ldm("CompVis/stable-diffusion-v1-4")``);
- ``"tiny"``: :func:`tiny_ldm`, a Stable-Diffusion-shaped model with seeded random weights, for tests and
  the offline demo;
- ``"random-sd14"``: :func:`random_sd14_ldm`, the full SD-1.4 architecture with random weights, for speed
  benchmarks and rehearsals where no checkpoint can be downloaded (speed and memory do not depend on the weights).

The follow-up's depth LDM loads alike (:func:`load_depth_ldm`: a Hub id or folder, ``"tiny"``, or
``"random-sd2-depth"``, Stable Diffusion 2 depth's architecture with random weights).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from brainldm.presets import TAKAGI2023
from brainldm.torch_utils import default_device
from brainldm.validation import InputError

TINY = "tiny"
TOY = "toy"
TOY_DIR = Path(__file__).parents[1] / "models" / "toy"  # the trained offline model, made by scripts/train_toy_ldm.py
TINY_LATENT_GAIN = 24.0
RANDOM_SD14 = "random-sd14"
RANDOM_SD2_DEPTH = "random-sd2-depth"


def clip_stand_in(model_id_or_dir: str | Path) -> Path | None:
    """The CLIP vision tower a model trained by brainldm's toy recipe ships as its stand-in for CLIP ViT-L/14 (the
    ``image_encoder`` beside the ``training.json`` that ``scripts/train_toy_ldm.py`` writes), or None for any other
    model: real LDMs' reconstructions are scored with CLIP ViT-L/14 itself."""
    folder = TOY_DIR if str(model_id_or_dir) == TOY else Path(model_id_or_dir)
    if (folder / "training.json").is_file() and (folder / "image_encoder").is_dir():
        return folder / "image_encoder"
    return None


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on GPU (as the paper's pipeline ran), fp32 on CPU (where fp16 is slow or unsupported)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def ldm_sizes(ldm, preset=TAKAGI2023) -> tuple[int, int]:
    """(z_image_size, output_size) of an LDM: its native output size (the U-Net's sample size times the VAE's
    downsampling factor: 512 for SD-1.x, 128 for ``toy``) and z's image size at the paper's proportion of it
    (320 of 512), so sizes travel with the model."""
    factor = 2 ** (len(ldm.vae.config.block_out_channels) - 1)
    output_size = int(ldm.unet.config.sample_size) * factor
    return output_size * preset.z_image_size // preset.output_size, output_size


def ddim_scheduler(snr_shift: float = 1.0) -> DDIMScheduler:
    """The DDIM scheduler of Stable Diffusion v1 (``scaled_linear`` betas, eta 0 at call time).

    ``snr_shift`` multiplies every timestep's signal-to-noise ratio alpha_bar / (1 - alpha_bar), written out as the
    scheduler's ``trained_betas``; 1 is SD's own schedule. A model on a smaller latent grid needs a larger one to
    keep as much of an image's layout at the same timestep (toy's: :class:`~brainldm.offline.toy.ToyConfig`).
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
    # fork_rng: building a model must not move the caller's global RNG
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config, scaling_factor=TAKAGI2023.vae_scaling_factor)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
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


def load_ldm(
    model_id_or_dir: str = TAKAGI2023.model_id,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> StableDiffusionImg2ImgPipeline:
    """Load a Stable Diffusion img2img pipeline with the paper's DDIM scheduler.

    Args:
        model_id_or_dir: a Hub model id, a local diffusers folder, ``"toy"`` (the trained offline model,
            :mod:`brainldm.offline.toy`), ``"tiny"`` or ``"random-sd14"``.
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to fp16 on CUDA and fp32 on CPU.
    """
    device = default_device(device)
    dtype = dtype or default_dtype(device)
    if model_id_or_dir == TOY:
        model_id_or_dir = str(TOY_DIR)  # a diffusers folder inside the package: the same path a Hub id takes
    if model_id_or_dir == TINY:
        pipe = tiny_ldm()
    elif model_id_or_dir == RANDOM_SD14:
        pipe = random_sd14_ldm()
    else:
        # The safety checker belongs to text-to-image serving, not to reconstruction research.
        pipe = _from_pretrained(
            StableDiffusionImg2ImgPipeline, model_id_or_dir, dtype, safety_checker=None, requires_safety_checker=False
        )
    return _placed(pipe, device, dtype)


def _from_pretrained(pipeline_class, model_id_or_dir: str, dtype: torch.dtype, flag: str = "--model", **components):
    """A diffusers pipeline from the Hub or a folder, with the paper's DDIM scheduler and no progress bar.

    A model that cannot be loaded is bad input (a wrong id or folder, or offline without it cached): an
    :class:`InputError` that says so and names ``flag``, the script option that chose it."""
    try:
        pipe = pipeline_class.from_pretrained(model_id_or_dir, dtype=dtype, **components)
    except (OSError, ValueError) as err:
        raise InputError(_load_error(model_id_or_dir, err, flag)) from err
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _placed(pipe, device: torch.device, dtype: torch.dtype):
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32-only modules on every dtype cast, even with none
    for model in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "image_encoder", None)):
        if model is not None:
            torch.nn.Module.to(model, device=device, dtype=dtype)
    return pipe


DEPTH_MODEL = "stabilityai/stable-diffusion-2-depth"


def load_depth_ldm(model_id_or_dir: str = DEPTH_MODEL, device=None, dtype=None):
    """Stable Diffusion 2's depth-conditioned img2img pipeline with the paper's DDIM scheduler, loaded without its
    depth estimator (the depth maps are decoded from the brain, :mod:`brainldm.ldm.depth`), or ``"tiny"``
    (:func:`tiny_depth_ldm`) or ``"random-sd2-depth"`` (:func:`random_sd2_depth_ldm`). Device and dtype default as
    :func:`load_ldm`'s."""
    from diffusers import StableDiffusionDepth2ImgPipeline

    device = default_device(device)
    dtype = dtype or default_dtype(device)
    if model_id_or_dir == TINY:
        pipe = tiny_depth_ldm()
    elif model_id_or_dir == RANDOM_SD2_DEPTH:
        pipe = random_sd2_depth_ldm()
    else:
        pipe = _from_pretrained(
            StableDiffusionDepth2ImgPipeline,
            model_id_or_dir,
            dtype,
            flag="--depth-ldm",
            depth_estimator=None,
            feature_extractor=None,
        )
    return _placed(pipe, device, dtype)


def _load_error(model_id_or_dir: str, err: Exception, flag: str) -> str:
    err = " ".join(str(err).split())  # one line
    if Path(model_id_or_dir).exists():
        return f"{flag} {model_id_or_dir!r} is a folder but not a diffusers model of the kind needed: {err}"
    if str(model_id_or_dir).startswith(("/", ".", "~")) or str(model_id_or_dir).count("/") > 1:  # a path, not an id
        return f"{flag} {model_id_or_dir!r}: no such folder; point {flag} at a diffusers model's folder or a Hub id"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    if offline:
        from huggingface_hub.constants import HF_HUB_CACHE

        return (
            f"{flag} {model_id_or_dir!r} is not in the Hugging Face cache ({HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
            "set, so it cannot be downloaded. Download it once with network access (unset HF_HUB_OFFLINE), "
            f"point {flag} at a local diffusers folder, or use {flag} tiny for the offline model."
        )
    return (
        f"could not load {flag} {model_id_or_dir!r} (not a local folder, and the Hub download failed): {err}. "
        f"Check the model id, your network and HF_TOKEN for gated models, or use {flag} tiny offline."
    )


def optimize_ldm(
    ldm: StableDiffusionImg2ImgPipeline, channels_last: bool = False, compile_mode: str | None = None
) -> StableDiffusionImg2ImgPipeline:
    """Speed-ups that keep results up to float rounding: fused QKV projections always; optionally channels_last
    convolutions and ``torch.compile`` of the UNet (``compile_mode`` e.g. ``"reduce-overhead"``, which adds CUDA
    graphs; compilation takes a minute or more per batch shape, then each step is faster).

    Attention already runs through PyTorch's scaled_dot_product_attention (diffusers' default processor).
    """
    ldm.unet.fuse_qkv_projections()
    ldm.vae.fuse_qkv_projections()
    if channels_last:
        ldm.unet.to(memory_format=torch.channels_last)
        ldm.vae.to(memory_format=torch.channels_last)
    if compile_mode:
        ldm.unet = torch.compile(ldm.unet, mode=compile_mode, fullgraph=True)
    return ldm
