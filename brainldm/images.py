"""Pictures in, tensors out: any image (PIL or array) to RGB uint8, and batches of them resized and
normalised for a vision model. Used by the LDM's encoders, the captioner and the depth model alike.

How each decoded target's pictures are prepared is :data:`PREPROCESSING`: the paper's code
(github.com/yu-takagi/StableDiffusionReconstruction) as it does it, but for z's posterior mean (docs/pipeline.md says
why). Feature stores and the maps fitted to them record it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from brainldm.validation import InputError

ImageLike = Image.Image | np.ndarray
LANCZOS, BICUBIC = Image.Resampling.LANCZOS, Image.Resampling.BICUBIC

# Per-channel (mean, std) of pixels in [0, 1], as each network was trained
NORMALISATIONS = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # OpenAI CLIP's processor
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's ImageNet weights
    "dpt": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # DPT-large's image processor
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # pixels in [0, 1] as they are: the reference code's BLIP input
    "vae": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [-1, 1]: Stable Diffusion's VAE
}

REFERENCE_CODE = "github.com/yu-takagi/StableDiffusionReconstruction"
PREPROCESSING = {
    "z": {
        "resize": "lanczos to the LDM's z size (320 px for SD-1.x)",
        "pixels": "[-1, 1]",
        "latent": "the VAE posterior's mean x scaling factor (the reference: a sample of it)",
        "reference": "codes/utils/img2feat_sd.py",
    },
    "c": {
        "captions": "mean of the CLIP text embeddings of every COCO caption",
        "reference": "codes/utils/img2feat_sd.py",
    },
    "blip": {
        "resize": "lanczos to 240 px",
        "pixels": "[0, 1], not normalised (ToTensor only)",
        "reference": "codes/caption/BLIP/img2feat_blip.py",
    },
    "dpt": {
        "resize": "lanczos to 512 px, then bicubic to the model's 384 px (its image processor)",
        "pixels": "DPT's normalisation (mean 0.5, std 0.5)",
        "reference": "codes/depth/img2feat_dpt.py",
    },
}


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """An image as an H x W x 3 uint8 array. Converts PIL modes and grey/RGBA arrays; rejects the rest."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise InputError(
            f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got an array of shape {array.shape}"
        )
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and 0.0 <= array.min() and array.max() <= 1.0:
            array = np.round(array * 255.0)
        else:
            raise InputError(f"expected uint8 pixels or floats in [0, 1], got dtype {array.dtype}")
        array = array.astype(np.uint8)
    return array


def resize(images: Sequence[ImageLike], size: int, resample: Image.Resampling = LANCZOS) -> list[np.ndarray]:
    """Images as ``size`` x ``size`` x 3 uint8 arrays (Lanczos, as the reference code resizes every picture)."""
    return [np.asarray(Image.fromarray(to_rgb_array(im)).resize((size, size), resample)) for im in images]


def normalise(x: torch.Tensor, normalisation: str) -> torch.Tensor:
    """Pixels in [0, 1] (n, 3, H, W) normalised as :data:`NORMALISATIONS` names (``clip``, ``imagenet``, ...)."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {sorted(NORMALISATIONS)}, got {normalisation!r}")
    mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device)[:, None, None] for v in NORMALISATIONS[normalisation])
    return (x - mean) / std


def pictures_to_tensor(pictures: torch.Tensor, normalisation: str) -> torch.Tensor:
    """uint8 pictures (n, H, W, 3), already at the network's size -> normalised float (n, 3, H, W)."""
    return normalise(pictures.permute(0, 3, 1, 2).float() / 255.0, normalisation)


def images_to_tensor(
    images: Sequence[ImageLike], size: int, normalisation: str = "vae", resample: Image.Resampling = LANCZOS
) -> torch.Tensor:
    """Resize images to ``size`` x ``size`` (Lanczos by default, as the reference code) -> (n, 3, size, size),
    normalised as :data:`NORMALISATIONS` names (default ``vae``: [-1, 1])."""
    return pictures_to_tensor(torch.from_numpy(np.stack(resize(images, size, resample))), normalisation)
