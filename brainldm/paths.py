"""Where brainldm writes: a subject's folder name, and atomic writes (readers never see a half-written file).

Every wing writes files; these two rules are shared by all of them, so they live on the ground floor.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def subject_name(subject: int, whole_brain: bool = False) -> str:
    """The subject's folder and config name: ``subj01``, or ``subj01-wholebrain`` for every in-brain voxel."""
    return f"subj{int(subject):02d}" + ("-wholebrain" if whole_brain else "")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; moved onto ``path`` when the block succeeds, removed if not.
    Readers never see a half-written file, and a killed writer leaves at most a hidden ``.tmp`` file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # per process and thread, so writers of the same file (ranks of one run) never share a temporary; the suffix
    # stays: PIL and numpy read formats from it
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
