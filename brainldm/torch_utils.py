"""Small torch helpers shared across brainldm: devices, CLIP's normalisation, and the one rule that seeds each
image's noise (as diffusers keeps its own in ``utils/torch_utils.py``)."""

from __future__ import annotations

import numpy as np
import torch


def default_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# CLIP's image normalisation (OpenAI CLIP; transformers' CLIPImageProcessor uses the same)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_normalise(pictures: torch.Tensor) -> torch.Tensor:
    """uint8 (n, H, W, 3) at the vision tower's size -> CLIP-normalised float (n, 3, H, W)."""
    x = pictures.permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def noise_seed(seed: int, key: int, sample: int = 0) -> int:
    """The seed of one image's sample: its own for every (seed, image key, sample), reproducible and independent of
    which other images share the batch (the paper's code drew each image's noise from one stream seeded once)."""
    return int(np.random.SeedSequence([seed, key, sample]).generate_state(1, np.uint64)[0] >> 1)
