"""Small torch helpers shared across brainldm (as diffusers keeps its own in ``utils/torch_utils.py``)."""

from __future__ import annotations

import torch


def default_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
