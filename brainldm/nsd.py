"""The raw Natural Scenes Dataset layout: where each file lives and what its labels mean.

Paths are relative to the NSD root, exactly as on NSD's public bucket. ``brainldm.synthetic`` writes to
these same paths, so the offline world and real NSD go through one reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io

from .validation import InputError, oneline, require_file

# `streams.nii.gz` labels (0 = in the brain but unlabelled; -1 = outside the brain)
STREAMS = {
    0: "unknown",
    1: "early",
    2: "midventral",
    3: "midlateral",
    4: "midparietal",
    5: "ventral",
    6: "lateral",
    7: "parietal",
}
STREAM_IDS = {name: label for label, name in STREAMS.items()}

N_SUBJECTS = 8
BETAS_SCALE = 300.0  # stored int16 betas are percent signal change x 300
COCO_SPLITS = ("train2017", "val2017")


def expdesign_path(root: str | Path) -> Path:
    return Path(root) / "nsddata/experiments/nsd/nsd_expdesign.mat"


def stim_info_path(root: str | Path) -> Path:
    return Path(root) / "nsddata/experiments/nsd/nsd_stim_info_merged.csv"


def stimuli_path(root: str | Path) -> Path:
    return Path(root) / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"


def captions_path(root: str | Path, coco_split: str) -> Path:
    """COCO 2017 caption annotations, as NSD ships them beside the stimuli."""
    return Path(root) / f"nsddata_stimuli/stimuli/nsd/annotations/captions_{coco_split}.json"


def roi_path(root: str | Path, subject: int, name: str) -> Path:
    """`name` is an ROI file stem such as ``nsdgeneral`` or ``streams``."""
    return Path(root) / f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi/{name}.nii.gz"


def betas_dir(root: str | Path, subject: int) -> Path:
    return Path(root) / f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"


def betas_path(root: str | Path, subject: int, session: int, suffix: str = ".nii.gz") -> Path:
    """One session's betas; `session` is 1-based. `suffix` is ``.nii.gz`` or ``.hdf5``."""
    return betas_dir(root, subject) / f"betas_session{session:02d}{suffix}"


# --- readers: each validates what it reads and raises InputError naming the file -----------------------------


@dataclass(frozen=True)
class ExpDesign:
    """``nsd_expdesign.mat``, as stored: 1-based ``masterordering`` (n_trials,), ``subjectim`` (8, n), ``sharedix``."""

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray

    def trial_images(self, subject: int, n_trials: int) -> np.ndarray:
        """0-based 73k image id of each of the subject's first ``n_trials`` trials."""
        if n_trials > len(self.masterordering):
            raise InputError(
                f"the betas hold {n_trials} trials but masterordering lists only {len(self.masterordering)}"
            )
        return self.subjectim[subject - 1, self.masterordering[:n_trials] - 1] - 1

    @property
    def shared(self) -> np.ndarray:
        """0-based ids of the shared images (the test set)."""
        return self.sharedix - 1


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"NSD root {root} is not a folder; pass --nsd-root pointing at your NSD copy")
    return root


def read_expdesign(root: str | Path) -> ExpDesign:
    path = require_file(expdesign_path(_check_root(root)), "NSD experiment design")
    try:
        mat = scipy.io.loadmat(path)
        design = ExpDesign(
            masterordering=np.asarray(mat["masterordering"]).astype(np.int64).ravel(),
            subjectim=np.asarray(mat["subjectim"]).astype(np.int64),
            sharedix=np.asarray(mat["sharedix"]).astype(np.int64).ravel(),
        )
    except (KeyError, ValueError, OSError, TypeError) as err:
        raise InputError(f"could not read {path}: {err!r}; expected masterordering, subjectim and sharedix") from err
    if design.subjectim.ndim != 2 or design.subjectim.shape[0] != N_SUBJECTS:
        raise InputError(f"{path}: subjectim should be {N_SUBJECTS} x n, got shape {design.subjectim.shape}")
    if design.masterordering.min() < 1 or design.masterordering.max() > design.subjectim.shape[1]:
        raise InputError(
            f"{path}: masterordering must hold 1-based indices into subjectim's {design.subjectim.shape[1]}"
        )
    return design


def read_stim_info(root: str | Path) -> pd.DataFrame:
    """``nsd_stim_info_merged.csv`` indexed by 0-based ``nsdId``."""
    path = require_file(stim_info_path(_check_root(root)), "NSD stimulus info")
    try:
        info = pd.read_csv(path, index_col=0)
    except (ValueError, pd.errors.ParserError) as err:
        raise InputError(f"could not read {path}: {oneline(err)}; download it again") from err
    missing = [column for column in ("nsdId", "cocoId", "cocoSplit") if column not in info.columns]
    if missing:
        raise InputError(f"{path} has no {', '.join(missing)} column(s); is it NSD's nsd_stim_info_merged.csv?")
    return info.set_index("nsdId", drop=False)


def read_captions(root: str | Path, coco_ids) -> dict[int, list[str]]:
    """All COCO captions of each requested cocoId (whitespace-stripped), from the train2017 and val2017 files."""
    wanted = {int(c) for c in coco_ids}
    captions: dict[int, list[str]] = {c: [] for c in wanted}
    for split in COCO_SPLITS:
        path = require_file(captions_path(_check_root(root), split), f"COCO {split} captions")
        try:
            annotations = json.loads(path.read_text())["annotations"]
        except (ValueError, KeyError) as err:
            raise InputError(f"could not read {path}: {err!r}; expected a COCO captions JSON") from err
        for a in annotations:
            if a["image_id"] in captions:
                captions[a["image_id"]].append((a["id"], a["caption"].strip()))
    missing = sorted(c for c, caps in captions.items() if not caps)
    if missing:
        raise InputError(
            f"no COCO captions for cocoId {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f" in {captions_path(root, 'train2017').parent}; is the annotations folder complete?"
        )
    return {c: [text for _, text in sorted(caps)] for c, caps in captions.items()}  # COCO annotation order


class Stimuli:
    """Random access to ``nsd_stimuli.hdf5``'s ``imgBrick`` (n, H, W, 3 uint8). Use as a context manager."""

    def __init__(self, root: str | Path):
        self.path = require_file(stimuli_path(_check_root(root)), "NSD stimuli")
        try:
            self._file = h5py.File(self.path, "r")
            self.brick = self._file["imgBrick"]
        except (OSError, KeyError) as err:
            raise InputError(f"could not read imgBrick from {self.path}: {err}") from err

    def __getitem__(self, nsd_id: int) -> np.ndarray:
        try:
            return self.brick[int(nsd_id)]
        except (OSError, IndexError, ValueError) as err:
            raise InputError(f"could not read image {nsd_id} from {self.path}: {err}") from err

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Stimuli:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_roi(root: str | Path, subject: int, name: str) -> nib.Nifti1Image:
    path = require_file(roi_path(_check_root(root), subject, name), f"subj{subject:02d} {name} ROI")
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
    except Exception as err:  # nibabel raises many types for a bad file
        raise InputError(
            f"could not read {path}: {oneline(err)}; the file may be truncated or corrupt: download it again"
        ) from err
    return nib.Nifti1Image(np.round(data).astype(np.int16), image.affine)


def list_sessions(root: str | Path, subject: int, first: int | None = None) -> list[int]:
    """The subject's sessions 1, 2, ... (each a ``betas_sessionNN.nii.gz``), or only the ``first`` of them.

    A missing session before a later one is an error naming it, unless ``first`` stops before the gap.
    """
    folder = betas_dir(_check_root(root), subject)
    present = {int(p.name[len("betas_session") :].split(".")[0]) for p in folder.glob("betas_session*.nii.gz")}
    if not present:
        raise InputError(f"no betas for subject {subject}: no betas_sessionNN.nii.gz in {folder}")
    wanted = range(1, (first or max(present)) + 1)
    missing = [s for s in wanted if s not in present]
    if missing and (first is None or first <= max(present)):
        raise InputError(
            f"betas of session {missing[0]} are missing from {folder} (sessions up to {max(present)} are there); "
            f"download betas_session{missing[0]:02d}.nii.gz, or pass --sessions {missing[0] - 1} to use only the "
            "sessions before it"
            if missing[0] > 1
            else f"{folder} has betas but not betas_session01.nii.gz"
        )
    if first is not None and first > max(present):
        raise InputError(
            f"--sessions {first} asks for more sessions than subject {subject} has ({max(present)}, in {folder})"
        )
    return list(wanted)


def betas_shape(root: str | Path, subject: int, session: int) -> tuple[int, ...]:
    """(X, Y, Z, n_trials) of one session's betas, read from the header only."""
    path = betas_path(root, subject, session)
    try:
        shape = nib.load(path).shape
    except Exception as err:
        raise InputError(
            f"could not read the header of {path}: {oneline(err)}; "
            "the file may be truncated or corrupt: download it again"
        ) from err
    if len(shape) != 4:
        raise InputError(f"{path}: expected X x Y x Z x trials betas, got shape {shape}")
    return shape


def read_betas(root: str | Path, subject: int, session: int, ijk: np.ndarray) -> np.ndarray:
    """One session's betas at voxels ``ijk`` (n_voxels, 3) -> (n_trials, n_voxels) float32 percent signal change.

    Reads the ``.hdf5`` twin when present (no gunzip; h5py sees its axes reversed), else the NIfTI. Either way it
    streams one block of volumes at a time, so memory stays at a few volumes, not the session's 1 GB.
    """
    path = betas_path(root, subject, session, ".hdf5")
    try:
        if path.is_file():
            values = _read_hdf5_betas(path, ijk)
        else:
            path = betas_path(root, subject, session)
            values = _read_nifti_betas(path, ijk)
    except Exception as err:
        raise InputError(
            f"could not read betas from {path}: {oneline(err)}; the file may be truncated or corrupt: download it again"
        ) from err
    return values / np.float32(BETAS_SCALE)


def _read_nifti_betas(path: Path, ijk: np.ndarray) -> np.ndarray:
    """Stream a (X, Y, Z, T) NIfTI volume by volume: NIfTI is column-major, so each volume is contiguous."""
    proxy = nib.load(path).dataobj  # the header: where the data start, their dtype and scaling
    shape, dtype = proxy.shape, proxy.dtype
    n_voxels = int(np.prod(shape[:3]))
    flat = np.ravel_multi_index(tuple(ijk.T), shape[:3], order="F")
    slope, inter = proxy.slope, proxy.inter
    values = np.empty((shape[3], len(ijk)), dtype=np.float32)
    with nib.openers.ImageOpener(path) as f:
        f.seek(proxy.offset)
        for t in range(shape[3]):
            chunk = f.read(n_voxels * dtype.itemsize)
            if len(chunk) != n_voxels * dtype.itemsize:
                raise OSError(f"the file ends at volume {t + 1} of {shape[3]}")
            values[t] = np.frombuffer(chunk, dtype=dtype)[flat]
    if (slope, inter) != (1.0, 0.0):
        values = values * np.float32(slope) + np.float32(inter)
    return values


def _read_hdf5_betas(path: Path, ijk: np.ndarray, block: int = 32) -> np.ndarray:
    with h5py.File(path, "r") as f:
        data = f["betas"]  # (T, Z, Y, X)
        values = np.empty((data.shape[0], len(ijk)), dtype=np.float32)
        for start in range(0, data.shape[0], block):
            volumes = data[start : start + block]
            values[start : start + len(volumes)] = volumes[:, ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    return values
