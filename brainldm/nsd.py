"""The raw Natural Scenes Dataset layout: where each file lives and what its labels mean.

Paths are relative to the NSD root, exactly as on NSD's public bucket. ``brainldm.synthetic`` writes to
these same paths, so the offline world and real NSD go through one reader.
"""

from __future__ import annotations

from pathlib import Path

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
