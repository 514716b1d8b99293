"""Readers: the seam between a raw fMRI dataset and the trials dataset (:func:`brainldm.data.trials.prepare`).

A reader gives one subject's voxels (with their ROI labels, as data), the stimulus each trial showed, which stimuli
form the test split, the betas of one session at a time, and each stimulus's image and captions. Everything it can
check is checked when it is made, before any betas are read. Features, maps, reconstruction and encoding only see
the trials dataset, never a reader's files, so a new dataset is a new reader and nothing else.

- :class:`NSDReader`: the Natural Scenes Dataset in its own layout (:mod:`brainldm.data.nsd`).
- :class:`ExperimentReader`: a user's own experiment, described by a small JSON manifest (betas as NIfTI files or
  one ``.npy`` array, stimulus images, captions, ROI masks, the test images).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import nibabel as nib
import numpy as np
from PIL import Image

from brainldm.data import nsd
from brainldm.data.coco import CocoCaptions
from brainldm.data.storage import AccessDenied, Storage
from brainldm.data.voxels import VoxelTable
from brainldm.validation import InputError, oneline, require_file


class Reader(Protocol):
    """What :func:`brainldm.data.trials.prepare` needs from a raw dataset, for one subject."""

    subject: int
    whole_brain: bool
    voxels: VoxelTable
    sessions: list[int]
    session_of_trial: np.ndarray  # (n_trials,) the session of each trial, in order
    trial_numbers: np.ndarray  # (n_trials,) each trial's 1-based number in the experiment's design
    trial_stimuli: np.ndarray  # (n_trials,) the 0-based stimulus id each trial showed (the dataset's ``nsd_id``)
    test_stimuli: np.ndarray  # stimulus ids of the test split; their trials are averaged per stimulus

    def params(self) -> dict:
        """What identifies this input (a resumed run must match it); ``root`` is the only local path in it."""

    def read_session(self, session: int) -> np.ndarray:
        """One session's betas at the table's voxels -> (n_trials_in_session, n_voxels) float32."""

    def describe_session(self, session: int) -> str:
        """The file a session's betas come from, for error messages."""

    def session_versions(self) -> dict[str, str]:
        """{file: version} of every session's betas file (its size and ETag, or size and mtime when local): a resumed
        run must find the same, or its finished sessions came from other files."""

    def stimulus_info(self, ids: Sequence[int]) -> tuple[list[int], list[list[str]]]:
        """(COCO id or -1, captions) of each stimulus id."""

    def open_stimuli(self):
        """A context manager giving ``stimuli[id] -> (H, W, 3) uint8``."""


# --- NSD ---------------------------------------------------------------------------------------------------------


def nsd_voxel_table(root: str | Path | Storage, subject: int, whole_brain: bool = False) -> VoxelTable:
    """Stored voxels of an NSD subject, in C order of the grid: every voxel with nsdgeneral == 1 or streams > 0,
    or with ``whole_brain`` every voxel inside the brain (ROI labels >= 0), for whole-brain encoding models."""
    general, streams = nsd.read_roi(root, subject, "nsdgeneral"), nsd.read_roi(root, subject, "streams")
    if general.shape != streams.shape:
        raise InputError(
            f"nsdgeneral {general.shape} and streams {streams.shape} ROIs of subject {subject} differ in grid"
        )
    g, s = np.asarray(general.dataobj), np.asarray(streams.dataobj)
    ijk = np.argwhere(((g >= 0) | (s >= 0)) if whole_brain else ((g == 1) | (s > 0)))
    return VoxelTable(
        subject=subject,
        ijk=ijk,
        grid_shape=tuple(int(n) for n in g.shape),
        affine=np.asarray(general.affine, dtype=np.float64),
        nsdgeneral=g[tuple(ijk.T)] == 1,
        streams=np.maximum(s[tuple(ijk.T)], 0).astype(np.int64),
        roi_names=dict(nsd.STREAMS),
    )


class NSDReader:
    """One NSD subject: betas ``betas_fithrf_GLMdenoise_RR`` in func1pt8mm, the design, stim info, COCO captions.

    ``root`` is a local NSD folder or a URL such as NSD's bucket ``s3://natural-scenes-dataset``, from which only
    what the subject needs is fetched (see :mod:`brainldm.data.storage`; ``cache_dir`` holds what was fetched).
    ``coco_annotations`` is where COCO's captions come from (NSD's bucket does not hold them): a URL of COCO's
    annotations archive, a local copy of it, or a folder of the caption JSONs; by default the JSONs a local NSD root
    holds where ``nsd_access`` unpacks them, else COCO's own archive (see :mod:`brainldm.data.coco`).
    ``sessions``: use the first K sessions, or a list of session numbers in any order (default: all the subject's
    consecutive sessions). The test split is NSD's shared images (``sharedix``) seen in those sessions.

    Trials sit where NSD's design puts them: the volumes of session s are trials ``750 (s - 1)`` to ``750 s - 1``,
    whichever sessions are read and in whatever order. A session file that does not hold the design's 750 trials
    (cut short by a failed copy, another file under its name) is an error naming it, never a shift of every later
    trial onto another picture; ``nsd_stim_info_merged.csv`` is compared with the design on every trial it lists.
    """

    def __init__(
        self,
        root: str | Path | Storage,
        subject: int,
        sessions: int | Sequence[int] | None = None,
        whole_brain: bool = False,
        cache_dir: str | Path | None = None,
        progress: bool = False,
        coco_annotations: str | Path | CocoCaptions | None = None,
    ):
        if isinstance(sessions, int) and sessions < 1:
            raise InputError(f"--sessions must be >= 1, got {sessions}")
        storage = root if isinstance(root, Storage) else Storage(root, cache_dir=cache_dir, progress=progress)
        self.root, self.subject, self.whole_brain = storage, int(subject), whole_brain
        design = nsd.read_expdesign(storage)
        self.info = nsd.read_stim_info(storage)
        if sessions is None or isinstance(sessions, int):
            self.sessions = nsd.list_sessions(storage, subject, sessions)
        else:
            self.sessions = nsd.check_sessions(storage, subject, sessions)
        self.voxels = nsd_voxel_table(storage, subject, whole_brain)
        per_session = design.trials_per_session
        for session in self.sessions:
            with self._refused(session):
                shape = nsd.betas_shape(storage, subject, session)
            if tuple(shape[:3]) != self.voxels.grid_shape:
                raise InputError(
                    f"{self.describe_session(session)} has grid {tuple(shape[:3])} but the ROIs of "
                    f"subject {subject} have grid {self.voxels.grid_shape}; are they from the same resolution "
                    "(func1pt8mm)?"
                )
            if shape[3] != per_session:
                raise InputError(
                    f"{self.describe_session(session)} holds {shape[3]} trials, but NSD's design has {per_session} "
                    f"in every session (trial t is volume t % {per_session} of session t // {per_session} + 1); the "
                    "file is cut short or is not this session's: download it again"
                )
        trials = np.concatenate([design.session_trials(s) for s in self.sessions])
        self.trial_numbers = trials + 1
        self.session_of_trial = np.repeat(self.sessions, per_session)
        self.trial_stimuli = design.trial_images(subject, trials)
        self._cross_check(design)
        coco_ids = self.info.loc[np.unique(self.trial_stimuli), "cocoId"].astype(np.int64)
        self.coco = CocoCaptions.for_nsd(storage, coco_annotations, cache_dir=cache_dir, progress=progress)
        self.captions = self.coco.read(coco_ids.to_numpy())
        self.test_stimuli = np.unique(self.trial_stimuli[np.isin(self.trial_stimuli, design.shared)])

    def params(self) -> dict:
        root = self.root.root
        return {
            "dataset": "nsd",
            "root": root if self.root.remote else str(root.resolve()),
            "subject": self.subject,
            "sessions": self.sessions,
            "whole_brain": self.whole_brain,
        }

    def read_session(self, session: int) -> np.ndarray:
        with self._refused(session):
            return nsd.read_betas(self.root, self.subject, session, self.voxels.ijk)

    @contextmanager
    def _refused(self, session: int):
        """A session the bucket lists but refuses to give (NSD held its last sessions back from public release for
        years; the manual: "listable but not downloadable") is named, with the way round it."""
        try:
            yield
        except AccessDenied as err:
            before = [s for s in self.sessions if s < session] == list(range(1, session)) and session > 1
            way = f"--sessions {session - 1} (the sessions before it)" if before else "--sessions with the others"
            folder = self.root.url(nsd.betas_folder(self.subject))
            raise InputError(
                f"session {session} of subject {self.subject} is listed in {folder} but its betas were refused "
                f"({self.describe_session(session)}: access denied), as NSD's withheld sessions are; pass {way}"
            ) from err

    def describe_session(self, session: int) -> str:
        return self.root.url(nsd.betas_source(self.root, self.subject, session))

    def session_versions(self) -> dict[str, str]:
        sources = [nsd.betas_source(self.root, self.subject, s) for s in self.sessions]
        return {self.root.url(rel): self.root.version(rel) for rel in sources}

    def stimulus_info(self, ids: Sequence[int]) -> tuple[list[int], list[list[str]]]:
        coco = self.info.loc[list(ids), "cocoId"].to_numpy().astype(np.int64)
        return coco.tolist(), [self.captions[int(c)] for c in coco]

    def open_stimuli(self) -> nsd.Stimuli:
        return nsd.Stimuli(self.root, np.unique(self.trial_stimuli))

    def _cross_check(self, design: nsd.ExpDesign) -> None:
        """The stim-info rep columns and the design must agree on every trial read: each trial is listed under the
        image the design says it showed, and every trial the rep columns list shows, by the design, their row's
        image."""
        info, subject, images = self.info, self.subject, self.trial_stimuli
        columns = [f"subject{subject}_rep{r}" for r in range(3)]
        if not set(columns) <= set(info.columns):
            return  # an older stim-info file without rep columns: nothing to cross-check
        missing = np.setdiff1d(np.unique(images), info.index.to_numpy())
        if len(missing):
            raise InputError(f"nsd_stim_info_merged.csv has no row for nsdId {missing[0]} shown to subject {subject}")
        disagree = (
            "nsd_expdesign.mat and nsd_stim_info_merged.csv disagree: trial {t} of subject {subject} shows nsdId "
            "{design} by the design, but nsd_stim_info_merged.csv lists it under nsdId {listed}"
        )
        reps = info.loc[images, columns].to_numpy()
        wrong = np.flatnonzero(~(reps == self.trial_numbers[:, None]).any(axis=1))
        if len(wrong):
            t = int(self.trial_numbers[wrong[0]])
            listed = info.index[(info[columns].to_numpy() == t).any(axis=1)].tolist()
            raise InputError(disagree.format(t=t, subject=subject, design=images[wrong[0]], listed=listed or "none"))
        listed = info[columns].to_numpy()
        row, rep = np.nonzero(np.isin(listed, self.trial_numbers))
        trials = listed[row, rep]
        shown = design.trial_images(subject, trials - 1)
        wrong = np.flatnonzero(shown != info.index.to_numpy()[row])
        if len(wrong):
            k = wrong[0]
            raise InputError(
                disagree.format(t=int(trials[k]), subject=subject, design=shown[k], listed=info.index[row[k]])
            )


# --- a user's own experiment -------------------------------------------------------------------------------------

MANIFEST_KEYS = ("betas", "trials", "images", "captions", "rois", "test")


class ExperimentReader:
    """A user's own experiment, described by a JSON manifest; paths in it are relative to the manifest::

        {
          "subject": 1,
          "betas": ["betas/run1.nii.gz", "betas/run2.nii.gz"],  // one 4D NIfTI (X, Y, Z, trials) per session,
                                                               // or one .npy of (trials, X, Y, Z)
          "trials": "trials.txt",         // the image file each trial showed, one line per trial, sessions in order
          "images": "images/",            // the stimulus images, any format PIL reads
          "captions": "captions.json",    // {"image file": ["a caption", ...], ...}
          "rois": {"early": "rois/early.nii.gz", "ventral": "rois/ventral.nii.gz"},  // masks in the betas grid
          "test": "test.txt",             // the test split's image files, one per line
          "trials_per_session": 120       // optional: trials in each betas file (a number, or one per file)
        }

    Trials are numbered by the trials list's lines. ``trials_per_session`` guards that numbering: a betas file
    with another trial count (cut short by a failed copy) is an error naming it, not a shift of every later trial
    onto another image. Stimulus ids are the images' positions in sorted file-name order. The stored voxels are
    those in any ROI mask (labelled by the first mask that holds them, in the manifest's order); ``nsdgeneral`` is
    their union. Name the ROIs ``early`` and ``ventral`` to decode z and c with the paper's settings (or choose
    others when fitting).
    """

    def __init__(self, manifest: str | Path):
        self.manifest = require_file(manifest, "experiment manifest")
        try:
            spec = json.loads(self.manifest.read_text())
        except ValueError as err:
            raise InputError(f"{self.manifest} is not valid JSON: {oneline(err)}") from err
        _check_manifest(self.manifest, spec)
        here = self.manifest.parent
        self.subject, self.whole_brain = int(spec.get("subject", 1)), False
        betas = spec["betas"] if isinstance(spec["betas"], list) else [spec["betas"]]
        self.betas = [require_file(here / p, "betas file") for p in betas]
        self.image_dir = here / spec["images"]
        if not self.image_dir.is_dir():
            raise InputError(f"the images folder {self.image_dir} does not exist")
        self.image_names = sorted(p.name for p in self.image_dir.iterdir() if p.is_file())
        ids = {name: i for i, name in enumerate(self.image_names)}
        shown = _lines(require_file(here / spec["trials"], "trials list"))
        test = _lines(require_file(here / spec["test"], "test list"))
        for what, names in (("trials list", shown), ("test list", test)):
            unknown = [n for n in names if n not in ids]
            if unknown:
                raise InputError(f"the {what} names {unknown[0]!r}, which is not in {self.image_dir}")
        captions_path = require_file(here / spec["captions"], "captions JSON")
        try:
            captions = json.loads(captions_path.read_text())
        except ValueError as err:
            raise InputError(f"{captions_path} is not valid JSON: {oneline(err)}") from err
        if not isinstance(captions, dict) or not all(isinstance(c, list) for c in captions.values()):
            raise InputError(f'{captions_path} must map image files to lists of captions: {{"a.png": ["..."]}}')
        without = [n for n in sorted(set(shown)) if not captions.get(n)]
        if without:
            raise InputError(f"{captions_path} has no captions for {without[0]!r}; every shown image needs some")
        self.captions = {ids[n]: [str(c).strip() for c in caps] for n, caps in captions.items() if n in ids}

        lengths = [self._n_trials(path) for path in self.betas]
        expected = spec.get("trials_per_session")
        if expected is not None:
            expected = [expected] * len(self.betas) if isinstance(expected, int) else expected
            for path, n, want in zip(self.betas, lengths, expected):
                if n != want:
                    raise InputError(
                        f"{path} holds {n} trials, but {self.manifest.name} gives that session {want} "
                        "(trials_per_session); the file is cut short or is not that session's"
                    )
        if sum(lengths) != len(shown):
            raise InputError(
                f"the betas hold {sum(lengths)} trials ({', '.join(map(str, lengths))} per file) but the trials list "
                f"names {len(shown)}; they must match, one line per trial"
            )
        self.sessions = list(range(1, len(self.betas) + 1))
        self.session_of_trial = np.concatenate([np.full(n, s) for s, n in zip(self.sessions, lengths)])
        self.trial_numbers = np.arange(1, len(shown) + 1)  # the trials list's lines
        self.trial_stimuli = np.array([ids[n] for n in shown], dtype=np.int64)
        self.test_stimuli = np.unique([ids[n] for n in test])
        if (
            not np.isin(self.test_stimuli, self.trial_stimuli).all()
            or np.isin(self.trial_stimuli, self.test_stimuli).all()
        ):
            raise InputError("the test list must name images that were shown, and leave some shown images for training")
        self.voxels = self._voxel_table({name: here / path for name, path in spec["rois"].items()})

    @staticmethod
    def _grid(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
        """(shape, affine) of a betas file without reading its data: (X, Y, Z, trials)."""
        try:
            if path.suffix == ".npy":
                array = np.load(path, mmap_mode="r")
                return (*array.shape[1:], array.shape[0]), np.eye(4)
            image = nib.load(path)
            return image.shape, np.asarray(image.affine)
        except Exception as err:
            raise InputError(f"could not read {path}: {oneline(err)}; is it a NIfTI file or a .npy array?") from err

    def _n_trials(self, path: Path) -> int:
        shape, _ = self._grid(path)
        if len(shape) != 4:
            raise InputError(f"{path}: expected betas of shape (X, Y, Z, trials) (NIfTI) or (trials, X, Y, Z) (.npy)")
        return shape[3]

    def _voxel_table(self, rois: dict[str, Path]) -> VoxelTable:
        if not rois:
            raise InputError(f"{self.manifest} names no ROI masks")
        shape, affine = self._grid(self.betas[0])
        labels = np.zeros(shape[:3], dtype=np.int64)
        for label, (name, path) in enumerate(rois.items(), start=1):
            try:
                mask = np.asarray(nib.load(require_file(path, f"ROI mask {name!r}")).dataobj) > 0
            except InputError:
                raise
            except Exception as err:
                raise InputError(f"could not read the ROI mask {path}: {oneline(err)}") from err
            if mask.shape != tuple(shape[:3]):
                raise InputError(f"the ROI mask {path} has grid {mask.shape}, the betas {tuple(shape[:3])}")
            labels[mask & (labels == 0)] = label
        ijk = np.argwhere(labels > 0)
        return VoxelTable(
            subject=self.subject,
            ijk=ijk,
            grid_shape=tuple(int(n) for n in shape[:3]),
            affine=affine,
            nsdgeneral=np.ones(len(ijk), dtype=bool),
            streams=labels[tuple(ijk.T)],
            roi_names={0: "unknown", **{label: name for label, name in enumerate(rois, start=1)}},
        )

    def params(self) -> dict:
        return {"dataset": "experiment", "root": str(self.manifest.resolve()), "subject": self.subject,
                "sessions": self.sessions, "whole_brain": False}  # fmt: skip

    def read_session(self, session: int) -> np.ndarray:
        path = self.betas[session - 1]
        ijk = tuple(self.voxels.ijk.T)
        if path.suffix == ".npy":
            return np.asarray(np.load(path, mmap_mode="r")[(slice(None), *ijk)], dtype=np.float32)
        return np.asarray(nib.load(path).dataobj, dtype=np.float32)[ijk].T  # (voxels, trials) -> (trials, voxels)

    def describe_session(self, session: int) -> str:
        return str(self.betas[session - 1])

    def session_versions(self) -> dict[str, str]:
        return {str(p): f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in self.betas}

    def stimulus_info(self, ids: Sequence[int]) -> tuple[list[int], list[list[str]]]:
        return [-1] * len(ids), [self.captions[int(i)] for i in ids]

    @contextmanager
    def open_stimuli(self) -> Iterator[_ImageFolder]:
        yield _ImageFolder(self.image_dir, self.image_names)


def _check_manifest(path: Path, spec) -> None:
    """Every key present and of its type, before any file it names is opened."""
    if not isinstance(spec, dict):
        raise InputError(f"{path} must hold a JSON object with {', '.join(MANIFEST_KEYS)}, got {type(spec).__name__}")
    missing = [key for key in MANIFEST_KEYS if key not in spec]
    if missing:
        raise InputError(f"{path} has no {', '.join(missing)}; it needs {', '.join(MANIFEST_KEYS)}")
    for key in ("trials", "images", "captions", "test"):
        if not isinstance(spec[key], str) or not spec[key]:
            raise InputError(f"{path}: {key!r} must be a path (a string), got {spec[key]!r}")
    betas = spec["betas"]
    if not (isinstance(betas, str) and betas) and not (
        isinstance(betas, list) and betas and all(isinstance(b, str) and b for b in betas)
    ):
        raise InputError(f"{path}: 'betas' must be a path or a non-empty list of paths, got {betas!r}")
    rois = spec["rois"]
    if not isinstance(rois, dict) or not all(isinstance(v, str) and v for v in rois.values()):
        raise InputError(f'{path}: \'rois\' must map ROI names to mask paths, e.g. {{"early": "rois/early.nii.gz"}}')
    per_session = spec.get("trials_per_session")
    is_count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    n_files = len(betas) if isinstance(betas, list) else 1
    if per_session is not None and not (
        is_count(per_session)
        or (isinstance(per_session, list) and len(per_session) == n_files and all(map(is_count, per_session)))
    ):
        raise InputError(
            f"{path}: 'trials_per_session' must be a whole number >= 1 or one per betas file ({n_files}), got "
            f"{per_session!r}"
        )
    subject = spec.get("subject", 1)
    if isinstance(subject, bool) or not isinstance(subject, int) or subject < 1:
        raise InputError(f"{path}: 'subject' must be a whole number >= 1, got {subject!r}")


class _ImageFolder:
    def __init__(self, folder: Path, names: list[str]):
        self.folder, self.names = folder, names

    def __getitem__(self, stimulus: int) -> np.ndarray:
        path = self.folder / self.names[int(stimulus)]
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            raise InputError(f"cannot read the stimulus image {path}: {oneline(err)}") from err


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
