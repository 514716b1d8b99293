"""Decoded depth: DPT's hidden states as a decoding target, depth maps from decoded ones, and Stable Diffusion 2's
depth model conditioned on them.

Takagi & Nishimoto's follow-up code (yu-takagi/StableDiffusionReconstruction, ``codes/depth``) decodes the four
backbone hidden states that DPT-large (``Intel/dpt-large``, 384 px: 577 tokens x 1024 each) passes to its neck, from
the voxels of six streams together; DPT's own neck and head turn the decoded states into a depth map, which
conditions ``stabilityai/stable-diffusion-2-depth`` (as ``c_concat``) in img2img from an init image, with the decoded
caption as the prompt (:mod:`brainldm.ldm.captioner`).

Here DPT is transformers' :class:`~transformers.DPTForDepthEstimation`: ``load_depth_model(model_id)`` for a Hub
checkpoint or a name in :mod:`brainldm.ldm.registry`. The SD-2-depth pipeline
is loaded by :func:`brainldm.ldm.loading.load_depth_ldm` without its depth estimator, so it can only use the maps it is
given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from brainldm.images import BICUBIC, PREPROCESSING, images_to_tensor, resize
from brainldm.ldm import registry
from brainldm.presets import TAKAGI2023, Sampling
from brainldm.torch_utils import default_device
from brainldm.validation import InputError

DPT_MODEL = "Intel/dpt-large"
DPT_REFERENCE_SIZE = 512  # the reference code's resize before DPT's processor (codes/depth/img2feat_dpt.py)


def load_depth_model(model_id: str = DPT_MODEL, device=None):
    """A Hub DPT depth model (or a local folder, or a name registered in :mod:`brainldm.ldm.registry`), in eval
    mode."""

    entry = registry.builder("depth_model", model_id)
    if entry is not None:
        model = entry.build()
    else:
        from transformers import DPTForDepthEstimation

        try:
            model = DPTForDepthEstimation.from_pretrained(model_id)
        except OSError as err:
            raise InputError(
                f"could not load the DPT depth model {model_id!r}: {err}; pass a Hub id or local folder of a "
                f"DPTForDepthEstimation checkpoint{registry.alternatives('depth_model')}"
            ) from err
    return model.eval().to(default_device(device))


def states_shape(model) -> tuple[int, int, int]:
    """(4, tokens, width) of one image's ``dpt`` target: (4, 577, 1024) for DPT-large."""
    config = model.config
    return (len(config.backbone_out_indices), (config.image_size // config.patch_size) ** 2 + 1, config.hidden_size)


def _pixel_values(model, images) -> torch.Tensor:

    parameter = next(model.parameters())
    # as the reference code: Lanczos to 512 px, then the model's image processor (bicubic to its size, normalised)
    x = images_to_tensor(resize(images, DPT_REFERENCE_SIZE), model.config.image_size, "dpt", BICUBIC)
    return x.to(parameter.device, parameter.dtype)


@torch.no_grad()
def dpt_states(model, images) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``dpt`` target of images, and DPT's own depth prediction from them: ((n, 4, tokens, width) float32 CPU,
    (n, h, w) float32 CPU). The states are exactly what the model's neck receives (caught at its input)."""
    if model.config.is_hybrid:
        raise InputError("hybrid DPT models pass CNN feature maps to their neck; use a ViT DPT such as Intel/dpt-large")
    caught = {}
    hook = model.neck.register_forward_pre_hook(lambda module, args: caught.__setitem__("states", args[0]))
    try:
        depth = model(pixel_values=_pixel_values(model, images)).predicted_depth
    finally:
        hook.remove()
    return torch.stack(list(caught["states"]), dim=1).float().cpu(), depth.float().cpu()


def dpt_feature(model, model_id: str) -> tuple[dict, Callable]:
    """The ``dpt`` feature for :func:`brainldm.ldm.extraction.extract_features`: what its store records (the depth
    model's id, its image size), and the function of a batch of images that computes it."""
    recorded = {"model_id": model_id, "image_size": model.config.image_size, "preprocessing": PREPROCESSING["dpt"]}
    return recorded, lambda images: dpt_states(model, images)[0]


@torch.no_grad()
def depth_from_states(model, states: torch.Tensor) -> torch.Tensor:
    """Depth maps (n, h, w) float32 CPU from DPT hidden states (n, 4, tokens, width), true or decoded: DPT's own
    neck and head, as the reference code runs them."""
    states = torch.as_tensor(states)
    if states.ndim != 4 or tuple(states.shape[1:]) != states_shape(model):
        raise InputError(
            f"DPT states must be (n, {', '.join(map(str, states_shape(model)))}) for this depth model, got "
            f"{tuple(states.shape)}; were the maps fitted to another depth model's features?"
        )
    parameter = next(model.parameters())
    states = states.to(parameter.device, parameter.dtype)
    hidden = model.neck([states[:, k] for k in range(states.shape[1])], None, None)
    return model.head(hidden).float().cpu()


def depth_image(depth: np.ndarray) -> np.ndarray:
    """A depth map (h, w) as a grey uint8 image, scaled to its own maximum (as the reference code draws them)."""
    depth = np.asarray(depth, dtype=np.float32)
    top = float(depth.max())
    scaled = depth / top if top > 0 else np.zeros_like(depth)
    grey = (np.clip(scaled, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


@torch.no_grad()
def depth_img2img(
    pipe,
    init: torch.Tensor,
    prompts: Sequence[str],
    depth: torch.Tensor,
    sampling: Sampling = TAKAGI2023.sampling,
    seeds: Sequence[int] | None = None,
) -> np.ndarray:
    """Stable Diffusion 2 depth img2img: from ``init`` images (n, 3, H, W) in [0, 1], prompted by ``prompts`` (n),
    conditioned on ``depth`` maps (n, h, w) (any size: the pipeline resizes them to its latent grid and normalises
    each to [-1, 1], as the reference code did), against "" with classifier-free guidance. ``seeds``: one per item.
    Returns (n, H, W, 3) floats in [0, 1]."""
    if getattr(pipe, "depth_estimator", None) is not None:
        raise InputError(
            "the depth pipeline carries its own depth estimator; load it with brainldm.ldm.loading.load_depth_ldm"
        )
    if not (len(init) == len(prompts) == len(depth)):
        raise InputError(f"init images, prompts and depth maps differ in number ({len(init)}, {len(prompts)}, "
                         f"{len(depth)})")  # fmt: skip
    seeds = list(range(sampling.seed, sampling.seed + len(init))) if seeds is None else list(seeds)
    return pipe(
        prompt=list(prompts),
        negative_prompt=[""] * len(init),
        image=init.to(pipe.unet.device, pipe.unet.dtype),
        depth_map=torch.as_tensor(depth).to(pipe.unet.device, torch.float32),
        strength=sampling.strength,
        num_inference_steps=sampling.num_inference_steps,
        guidance_scale=sampling.guidance_scale,
        generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
        output_type="np",
    ).images
