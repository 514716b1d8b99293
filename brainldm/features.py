"""LDM features of the stimuli: z (VAE latents of the image) and c (CLIP text embeddings of its captions).

All functions take the LDM (a diffusers Stable Diffusion pipeline, see :mod:`brainldm.ldm`) and read shapes
from it, so SD-1.x (z 4x40x40, c 77x768), SD-2.x and ``tiny_ldm`` go through the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .presets import TAKAGI2023

ImageLike = Image.Image | np.ndarray


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """An image as an H x W x 3 uint8 array. Converts PIL modes and grey/RGBA arrays; rejects the rest."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got an array of shape {array.shape}"
        )
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and 0.0 <= array.min() and array.max() <= 1.0:
            array = np.round(array * 255.0)
        else:
            raise ValueError(f"expected uint8 pixels or floats in [0, 1], got dtype {array.dtype}")
        array = array.astype(np.uint8)
    return array


def images_to_tensor(images: Sequence[ImageLike], size: int) -> torch.Tensor:
    """Resize images to ``size`` x ``size`` (bicubic, as the reference code) -> (n, 3, size, size) in [-1, 1]."""
    arrays = [
        np.asarray(Image.fromarray(to_rgb_array(im)).resize((size, size), Image.Resampling.BICUBIC)) for im in images
    ]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@torch.no_grad()
def encode_z(ldm, images: Sequence[ImageLike], image_size: int = TAKAGI2023.z_image_size) -> torch.Tensor:
    """z: the VAE latent mean of each image at ``image_size``, times the VAE scaling factor.

    Returns a float32 CPU tensor (n, latent_channels, image_size / 8, image_size / 8): (n, 4, 40, 40) for SD-1.x.
    """
    vae = ldm.vae
    x = images_to_tensor(images, image_size).to(device=vae.device, dtype=vae.dtype)
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    return z.float().cpu()


@torch.no_grad()
def encode_prompts(ldm, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP text-encoder last hidden states, each prompt padded to the tokenizer's length -> (n, 77, hidden)."""
    tokenizer, text_encoder = ldm.tokenizer, ldm.text_encoder
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0].float().cpu()


def encode_c(ldm, captions: Sequence[Sequence[str]]) -> torch.Tensor:
    """c: for each image, the mean over its captions of :func:`encode_prompts` -> (n_images, 77, hidden)."""
    for i, caps in enumerate(captions):
        if isinstance(caps, str) or len(caps) == 0:
            raise ValueError(f"image {i} has no captions (expected a non-empty list of strings, got {caps!r})")
    flat = [cap for caps in captions for cap in caps]
    embeddings = encode_prompts(ldm, flat)
    sizes = [len(caps) for caps in captions]
    return torch.stack([chunk.mean(0) for chunk in embeddings.split(sizes)])
