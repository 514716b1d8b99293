"""The reconstruction folder's format, its one owner: ``OUT/subjNN/<split>-<row>/`` per trial, with PNGs per kind,
the decoded arrays (``.npy``), ``caption.txt`` where a caption was decoded, and ``meta.json`` written last (its presence
marks the trial done). :func:`~brainldm.reconstruction.job.reconstruct_trials` writes the folders;
:mod:`brainldm.analysis.evaluate` and the figures read them through the functions here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from brainldm.paths import atomic_path, subject_name
from brainldm.validation import InputError, oneline


def trial_name(split: str, row: int) -> str:
    """A trial's folder name in its subject's folder: ``test-00007``."""
    return f"{split}-{row:05d}"


def trial_folder(out: str | Path, subject: int, split: str, row: int) -> Path:
    return subject_folder(out, subject) / trial_name(split, row)


def is_done(folder: Path) -> bool:
    """meta.json is written last, so its presence means the trial's images are complete."""
    return (folder / "meta.json").exists()


def subject_folder(out: str | Path, subject: int) -> Path:
    """Subject ``subject``'s folder in a reconstruction output folder: ``OUT/subj01``."""
    return Path(out) / subject_name(subject)


def subject_folders(out: str | Path) -> list[Path]:
    """The ``subjNN`` folders of a reconstruction output folder."""
    return sorted(p for p in Path(out).glob("subj[0-9][0-9]") if p.is_dir())


def finished_trials(folder: Path, split: str | None = None) -> list[Path]:
    """A subject folder's finished trial folders (of ``split``, or every split), in order."""
    return sorted(f for f in Path(folder).glob(f"{split or '*'}-*") if f.is_dir() and is_done(f))


def trial_row(folder: Path) -> int:
    """The row a trial folder holds (``test-00007`` -> 7)."""
    return int(Path(folder).name.rsplit("-", 1)[1])


def write_trial(folder: Path, images: dict[str, np.ndarray], arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write one trial: its images as PNGs, its arrays as ``.npy``, its decoded caption, and ``meta.json`` last."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        with atomic_path(folder / f"{name}.png") as tmp:
            Image.fromarray(image).save(tmp)
    for name, array in arrays.items():
        with atomic_path(folder / f"{name}.npy") as tmp:
            np.save(tmp, array)
    if "decoded_caption" in meta:
        with atomic_path(folder / "caption.txt") as tmp:
            tmp.write_text(meta["decoded_caption"] + "\n")
    with atomic_path(folder / "meta.json") as tmp:  # written last: its presence marks the trial done
        tmp.write_text(json.dumps(meta, indent=2))


def load_trial_images(folder: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, {name: image}) of a finished trial folder."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    images = {}
    for path in sorted(folder.glob("*.png")):
        try:
            with Image.open(path) as image:
                images[path.stem] = np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated or foreign files
            raise InputError(
                f"cannot read {path}: {oneline(err)}; delete {folder} and rerun reconstruct.py to make it again"
            ) from err
    return meta, images
