"""Load a latent diffusion model (Stable Diffusion through diffusers), or build a registered one.

Everything downstream takes a :class:`~diffusers.StableDiffusionImg2ImgPipeline` and uses its components
(``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler``). :func:`load_ldm` takes a Hub model id or a local
diffusers folder (``load_ldm("CompVis/stable-diffusion-v1-4")``), or a name in :mod:`brainldm.ldm.registry`, which
builds it (models with random weights, for tests, benchmarks and rehearsals where no checkpoint can be downloaded).
The follow-up's depth LDM loads alike (:func:`load_depth_ldm`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

from brainldm.ldm import registry
from brainldm.presets import TAKAGI2023
from brainldm.torch_utils import default_device
from brainldm.validation import InputError


def default_dtype(device: torch.device | str) -> torch.dtype:
    """fp16 on GPU (as the paper's pipeline ran), fp32 on CPU (where fp16 is slow or unsupported)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def ldm_sizes(ldm, preset=TAKAGI2023) -> tuple[int, int]:
    """(z_image_size, output_size) of an LDM: its native output size (the U-Net's sample size times the VAE's
    downsampling factor: 512 for SD-1.x) and z's image size at the paper's proportion of it
    (320 of 512), so sizes travel with the model."""
    factor = 2 ** (len(ldm.vae.config.block_out_channels) - 1)
    output_size = int(ldm.unet.config.sample_size) * factor
    return output_size * preset.z_image_size // preset.output_size, output_size


def load_ldm(
    model_id_or_dir: str = TAKAGI2023.model_id,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> StableDiffusionImg2ImgPipeline:
    """Load a Stable Diffusion img2img pipeline with the paper's DDIM scheduler.

    Args:
        model_id_or_dir: a Hub model id, a local diffusers folder, or a name registered in
            :mod:`brainldm.ldm.registry` (kind ``"ldm"``).
        device: defaults to CUDA when available, else CPU.
        dtype: defaults to fp16 on CUDA and fp32 on CPU.
    """
    # The safety checker belongs to text-to-image serving, not to reconstruction research.
    return _load("ldm", StableDiffusionImg2ImgPipeline, model_id_or_dir, device, dtype, "--model",
                 safety_checker=None, requires_safety_checker=False)  # fmt: skip


def _load(kind: str, pipeline_class, model_id_or_dir: str, device, dtype, flag: str, **components):
    """A pipeline of ``kind``, built by the registry or loaded from the Hub or a folder (with the paper's DDIM
    scheduler and no progress bar), placed on ``device`` in ``dtype`` (defaults: :func:`default_device`,
    :func:`default_dtype`).

    A model that cannot be loaded is bad input (a wrong id or folder, or offline without it cached): an
    :class:`InputError` that says so and names ``flag``, the script option that chose it."""
    device = default_device(device)
    dtype = dtype or default_dtype(device)
    entry = registry.builder(kind, model_id_or_dir)
    if entry is not None:
        return _placed(entry.build(), device, dtype)
    try:
        pipe = pipeline_class.from_pretrained(model_id_or_dir, dtype=dtype, **components)
    except (OSError, ValueError) as err:
        raise InputError(_load_error(model_id_or_dir, err, flag, kind)) from err
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return _placed(pipe, device, dtype)


def _placed(pipe, device: torch.device, dtype: torch.dtype):
    # nn.Module.to: diffusers' ModelMixin.to warns about fp32-only modules on every dtype cast, even with none
    for model in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "image_encoder", None)):
        if model is not None:
            torch.nn.Module.to(model, device=device, dtype=dtype)
    return pipe


DEPTH_MODEL = "stabilityai/stable-diffusion-2-depth"


def load_depth_ldm(model_id_or_dir: str = DEPTH_MODEL, device=None, dtype=None):
    """Stable Diffusion 2's depth-conditioned img2img pipeline with the paper's DDIM scheduler, loaded without its
    depth estimator (the depth maps are decoded from the brain, :mod:`brainldm.ldm.depth`), or a name registered in
    :mod:`brainldm.ldm.registry` (kind ``"depth_ldm"``). Device and dtype default as :func:`load_ldm`'s."""
    from diffusers import StableDiffusionDepth2ImgPipeline

    return _load("depth_ldm", StableDiffusionDepth2ImgPipeline, model_id_or_dir, device, dtype, "--depth-ldm",
                 depth_estimator=None, feature_extractor=None)  # fmt: skip


def _load_error(model_id_or_dir: str, err: Exception, flag: str, kind: str) -> str:
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
            f"point {flag} at a local diffusers folder{registry.alternatives(kind)}."
        )
    return (
        f"could not load {flag} {model_id_or_dir!r} (not a local folder, and the Hub download failed): {err}. "
        f"Check the model id, your network and HF_TOKEN for gated models{registry.alternatives(kind)}."
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
