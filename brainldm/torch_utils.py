"""Small torch helpers shared across brainldm: devices, and the one rule that seeds each
image's noise (as diffusers keeps its own in ``utils/torch_utils.py``)."""

from __future__ import annotations

import numpy as np
import torch


def default_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def noise_seed(seed: int, key: int, sample: int = 0) -> int:
    """The seed of one image's sample: its own for every (seed, image key, sample), reproducible and independent of
    which other images share the batch (the paper's code drew each image's noise from one stream seeded once)."""
    return int(np.random.SeedSequence([seed, key, sample]).generate_state(1, np.uint64)[0] >> 1)
