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


def check_finite(name: str, array) -> None:
    """Raise if ``array`` (numpy or torch) holds NaN or inf."""
    values = np.asarray(array.detach().cpu() if hasattr(array, "detach") else array)
    if not np.isfinite(values).all():
        bad = int(values.size - np.isfinite(values).sum())
        raise InputError(f"{name} contains {bad} NaN or infinite value(s); remove or impute them first")
