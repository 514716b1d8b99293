"""Input checks shared across brainldm. Each failure is one :class:`InputError` saying what, where and what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds


class InputError(ValueError):
    """Bad input from the user (a file, a value, a shape). Scripts print its message and exit with status 2
    (:mod:`brainldm.cli`)."""


def oneline(err: BaseException) -> str:
    """An exception's message on one line (nibabel and h5py messages carry newlines)."""
    return " ".join(str(err).split())


def require_file(path: str | Path, what: str) -> Path:
    """``path`` if it is an existing file, else an :class:`InputError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"missing {what}: {path} does not exist")
    return path


def check_sampling(scheduler, num_inference_steps: int, guidance_scale: float) -> None:
    """Denoising steps within what ``scheduler`` was trained with, and classifier-free guidance >= 1."""
    max_steps = scheduler.config.num_train_timesteps
    if not 1 <= num_inference_steps <= max_steps:
        raise InputError(f"steps must be in 1..{max_steps} (the scheduler's training steps), got {num_inference_steps}")
    if not guidance_scale >= 1:
        raise InputError(
            f"guidance must be >= 1, got {guidance_scale}: diffusers ignores classifier-free guidance below 1 "
            "(it gives the images of 1)"
        )


def check_finite(name: str, array) -> None:
    """Raise if ``array`` (numpy or torch) holds NaN or inf."""
    values = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
    if not np.isfinite(values).all():
        bad = int(values.size - np.isfinite(values).sum())
        raise InputError(f"{name} contains {bad} NaN or infinite value(s); remove or impute them first")
