"""The offline world: a small Natural Scenes Dataset in NSD's real files, formats and paths.

``write_nsd_tree(root)`` writes what :mod:`brainldm.data.nsd` reads (see ``shared/PAPER.md``), and nothing NSD's
bucket lacks (``tests/data/nsd_listing.json``):

- ``nsd_expdesign.mat`` with 1-based ``masterordering``, ``subjectim`` (8 x images per subject) and ``sharedix``;
- ``nsd_stim_info_merged.csv`` (``nsdId`` 0-based, ``cocoId``, ``shared1000``, ``subjectS_repR`` 1-based trials);
- ``nsd_stimuli.hdf5`` with ``imgBrick`` (n_images x H x W x 3 uint8), pictures of patterned animals on gradients;
- per subject, ``nsdgeneral`` and ``streams`` ROI NIfTIs (-1 outside the brain) and one gzipped int16 NIfTI of
  betas per session (percent signal change x 300, X x Y x Z x trials), optionally with its HDF5 twin in NSD's
  layout (one uncompressed chunk per voxel).

COCO's captions are not NSD's files, so they are written apart, as COCO ships them: ``annotations_trainval2017.zip``
in ``coco_root`` (default: the folder ``<root>-coco`` beside the tree) at the path it has on COCO's site
(``annotations/``), holding ``annotations/captions_{train,val}2017.json`` (captions describing each picture) and,
as COCO's does, larger members the captions do not need. :class:`brainldm.offline.site.FolderSite` serves that folder
as COCO's site.

Responses are planted: ``early`` voxels respond linearly to the image's z features, ``ventral`` voxels to its
c features (both computed with the given LDM, the trained ``toy`` model by default), the intermediate, lateral and
parietal streams to a mix of the two (:data:`MIXED_STREAMS`), every other voxel only to noise.

The brain is a small ellipsoid with ROI bands by default (fast), or with ``anatomy="S1"`` pycortex's demo subject:
its ``fullhead`` functional grid, cortex and ROI outlines (see :func:`brainldm.analysis.surfaces.functional_layout`), so
encoding results can be drawn as real flatmaps.
The returned :class:`SyntheticNSD` carries the planted weights and features, so tests can check recovery.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io

from brainldm.analysis.surfaces import CorticalSpace, functional_layout
from brainldm.data import coco, nsd
from brainldm.ldm.features import encode_c, encode_z
from brainldm.ldm.loading import load_ldm
from brainldm.validation import InputError

REPS = 3  # NSD shows every image three times
OFFLINE_SPACE = CorticalSpace("S1", "fullhead")  # pycortex's demo subject, the offline subjects' brain
# S1's ROI outlines as NSD `streams` labels. S1's overlay has no hV4, LO or V3A/B outlines, so the intermediate
# streams take the nearest outlined ROI: midlateral <- OFA (inferior occipital, beside LO), midparietal <- OPA
# (transverse occipital sulcus, beside V3A/B); midventral (hV4) stays empty. RSC is visual but in no stream.
S1_STREAMS = {
    "early": ("V1", "V2", "V3"),
    "midlateral": ("OFA",),
    "midparietal": ("OPA",),
    "ventral": ("FFA", "PPA"),
    "lateral": ("EBA",),
    "parietal": ("IPS",),
}
S1_NSDGENERAL = ("RSC",)  # besides every ROI in S1_STREAMS
# The offline world's default noise level with the toy model: decoding is hard, as on NSD (on a 6 x 45-trial subject,
# z and c 2-way identification of about 96%, and reconstructions that resemble the pictures without copying them).
OFFLINE_SNR = 0.3
# Colours of backgrounds and animals, kept off the ends of the range so a pattern's light and dark halves both fit
COLOURS = {
    "red": (200, 55, 50),
    "orange": (215, 140, 50),
    "yellow": (205, 190, 70),
    "green": (70, 160, 80),
    "blue": (60, 95, 200),
    "purple": (135, 70, 165),
    "pink": (210, 130, 170),
    "brown": (130, 90, 60),
    "grey": (128, 128, 128),
}
# What the captions name: animals told apart only by the fine pattern of their coat, in any colour, size and place.
# Its period is one cell of z's grid (toy's z is 10 x 10), so a blur to that grid averages it away.
ANIMALS = ("zebra", "tiger", "snake", "giraffe", "leopard", "sheep")
PATTERN_PERIOD = 1 / 10  # of the picture's width
# Streams that respond to both z and c: the share of their planted signal variance that comes from z (the rest
# from c). Early cortex is pure z and ventral pure c, as the paper found; the streams between lean accordingly.
MIXED_STREAMS = {"midventral": 0.7, "midlateral": 0.6, "midparietal": 0.6, "lateral": 0.3, "parietal": 0.5}
ANATOMIES = ("blob", "S1")
COCO_PATH = "annotations/" + coco.ARCHIVE_NAME  # the archive's path on COCO's site (coco.COCO_ANNOTATIONS_URL)


@dataclass
class SyntheticNSD:
    """What :func:`write_nsd_tree` wrote, and the ground truth it planted.

    Attributes:
        root: the NSD root folder.
        coco_root: the folder that stands for COCO's site: ``coco_archive`` lies in it at its path on COCO's site.
        subjects: subjects with betas and ROIs (1-based).
        n_sessions, trials_per_session, grid_shape: the betas' layout.
        n_images: images in ``imgBrick`` (the stand-in for NSD's 73k).
        shared: 0-based ids of the shared images (``sharedix - 1``).
        trial_images: subject -> (n_trials,) 0-based image id of every trial (trial t is volume
            ``t % trials_per_session`` of session ``t // trials_per_session + 1``).
        captions: 0-based image id -> its captions as written (with COCO's stray whitespace).
        feature_ids: 0-based ids of the images whose features were computed (all images any subject saw).
        z, c: planted features of ``feature_ids`` (n, *z_shape) and (n, *c_shape), float32.
        weights: subject -> {"z": (z_dim, n_early), "c": (c_dim, n_ventral)} planted weights on standardised
            features (``(f - feature_mean) / feature_std``, flattened).
        voxels: subject -> {"early": (n_early, 3), "ventral": (n_ventral, 3)} ijk of the voxels that respond to
            z or c alone, in the column order of ``weights`` (the mixed streams' voxels are not listed).
        snr: variance of the planted signal over variance of the noise, per responsive voxel.
    """

    root: Path
    subjects: tuple[int, ...]
    n_sessions: int
    trials_per_session: int
    grid_shape: tuple[int, int, int]
    n_images: int
    shared: np.ndarray
    trial_images: dict[int, np.ndarray]
    captions: dict[int, list[str]]
    feature_ids: np.ndarray
    z: np.ndarray
    c: np.ndarray
    feature_mean: dict[str, np.ndarray] = field(default_factory=dict)
    feature_std: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    voxels: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    snr: float = 1.0
    coco_root: Path | None = None

    @property
    def coco_archive(self) -> Path:
        """COCO's annotations archive of this world (``annotations_trainval2017.zip``, captions of every picture)."""
        return self.coco_root / COCO_PATH

    def features(self, nsd_ids: np.ndarray | list[int], name: str) -> np.ndarray:
        """Planted features (``"z"`` or ``"c"``) of the given 0-based image ids, in that order."""
        rows = {nsd_id: i for i, nsd_id in enumerate(self.feature_ids.tolist())}
        return getattr(self, name)[[rows[int(i)] for i in nsd_ids]]

    def planted_signal(self, subject: int, nsd_ids: np.ndarray | list[int], name: str) -> np.ndarray:
        """The noiseless planted response (unit variance over images) of ``name`` voxels -> (n, n_voxels)."""
        f = self.features(nsd_ids, name).reshape(len(nsd_ids), -1)
        f = (f - self.feature_mean[name]) / self.feature_std[name]
        return f @ self.weights[subject][name]


def default_coco_root(root: str | Path) -> Path:
    """Where :func:`write_nsd_tree` puts COCO's archive by default: the folder ``<root>-coco`` beside the NSD tree."""
    root = Path(root)
    return root.with_name(f"{root.name}-coco")


def write_nsd_tree(
    root: str | Path,
    subjects: tuple[int, ...] | list[int] = (1,),
    n_sessions: int = 3,
    trials_per_session: int = 30,
    n_shared: int = 6,
    grid_shape: tuple[int, int, int] = (12, 14, 10),
    image_size: int = 128,
    snr: float = 4.0,
    cortex_thickness: float = 0.45,
    write_hdf5: bool = False,
    write_nifti: bool = True,
    ldm=None,
    features: str = "ldm",
    n_components: int = 32,
    seed: int = 0,
    anatomy: str = "blob",
    coco_root: str | Path | None = None,
) -> SyntheticNSD:
    """Write a small NSD tree under ``root`` with planted responses. Returns what was written and planted.

    Each subject sees ``ceil(n_sessions * trials_per_session / 3)`` images three times each (the last ones
    fewer if the trial count is not a multiple of 3), ``n_shared`` of them shared by all eight subjects, in
    one ``masterordering`` common to all subjects, as in NSD. ``ldm`` computes the planted z and c features;
    it defaults to ``load_ldm("toy")``, the trained offline model (pictures are drawn at ``image_size``, 128 px: toy's
    output size). ``features="random"`` plants 16-dimensional Gaussian features
    instead (no LDM; for benchmarks at NSD's full size, where only the file sizes matter). Each responsive voxel
    is a random mixture of the leading ``n_components`` principal components of its feature space.
    ``anatomy="S1"`` lays every subject out on pycortex's S1 (needs pycortex; ``grid_shape`` and
    ``cortex_thickness`` are then S1's own). ``write_hdf5`` adds each session's HDF5 twin in NSD's layout
    (:func:`write_betas_hdf5`); ``write_nifti=False`` leaves out the ``.nii.gz`` (for benchmarks of the HDF5 path).
    COCO's annotations archive goes to ``coco_root`` (default ``<root>-coco``), not into the NSD tree.
    """
    if features not in ("ldm", "random"):
        raise InputError(f"features must be 'ldm' or 'random', got {features!r}")
    if anatomy not in ANATOMIES:
        raise InputError(f"anatomy must be one of {ANATOMIES}, got {anatomy!r}")
    root = Path(root)
    coco_root = Path(coco_root) if coco_root is not None else default_coco_root(root)
    subjects = tuple(int(s) for s in subjects)
    if not subjects or any(not 1 <= s <= nsd.N_SUBJECTS for s in subjects):
        raise InputError(f"subjects must be in 1..{nsd.N_SUBJECTS}, got {subjects}")
    n_trials = n_sessions * trials_per_session
    per_subject = -(-n_trials // REPS)
    n_unique = per_subject - n_shared
    if not 1 <= n_sessions <= nsd.DESIGN_SESSIONS or trials_per_session < 1 or n_shared < 1 or n_unique < 1:
        raise InputError(
            f"need 1 to {nsd.DESIGN_SESSIONS} sessions, >= 1 trial and shared image, and more images per subject "
            f"({per_subject}) "
            f"than shared images ({n_shared}); got n_sessions={n_sessions}, "
            f"trials_per_session={trials_per_session}, n_shared={n_shared}"
        )
    rng = np.random.default_rng(seed)
    if anatomy == "S1":
        layout = functional_layout(OFFLINE_SPACE, S1_STREAMS, S1_NSDGENERAL)
        grid_shape, affine = layout.grid_shape, layout.affine
        rois = {s: (layout.nsdgeneral, layout.streams) for s in subjects}
    else:
        rois = {s: _draw_rois(rng, grid_shape, cortex_thickness) for s in subjects}  # validates the grid first
        affine = np.diag([1.8, 1.8, 1.8, 1.0])
        affine[:3, 3] = -0.9 * np.asarray(grid_shape)

    n_images, shared, subjectim, masterordering, trial_images = _design(
        rng, n_trials, trials_per_session, n_shared, n_unique
    )
    images, captions = zip(*(draw_picture(rng, image_size) for _ in range(n_images)))
    coco_ids = rng.choice(np.arange(9, 600_000), size=n_images, replace=False)
    coco_split = np.where(rng.random(n_images) < 0.9, "train2017", "val2017")

    _write_expdesign(root, masterordering, subjectim, shared + 1)
    _write_stim_info(root, coco_ids, coco_split, shared, trial_images)
    _write_stimuli(root, np.stack(images))
    write_coco_archive(coco_root / COCO_PATH, coco_ids, coco_split, captions, rng)

    # Planted features for every image a written subject saw
    feature_ids = np.unique(np.concatenate([trial_images[s] for s in subjects]))
    z, c = _features(rng, features, ldm, [images[i] for i in feature_ids], [captions[i] for i in feature_ids])
    flat = {"z": z.reshape(len(z), -1), "c": c.reshape(len(c), -1)}
    # Voxels see the features through their leading principal components (a smooth, low-dimensional tuning,
    # as real voxels pool over many feature dimensions), so the brain holds what a decoder can recover.
    mean, std, components = {}, {}, {}
    for k, v in flat.items():
        mean[k], std[k], components[k] = principal_components(v, n_components)
    standardised = {k: (v - mean[k]) / std[k] for k, v in flat.items()}
    rows = {nsd_id: i for i, nsd_id in enumerate(feature_ids.tolist())}

    truth = SyntheticNSD(
        root=root,
        subjects=subjects,
        n_sessions=n_sessions,
        trials_per_session=trials_per_session,
        grid_shape=tuple(grid_shape),
        n_images=n_images,
        shared=shared,
        trial_images={s: trial_images[s] for s in subjects},
        captions={i: list(caps) for i, caps in enumerate(captions)},
        feature_ids=feature_ids,
        z=z,
        c=c,
        feature_mean=mean,
        feature_std=std,
        snr=snr,
        coco_root=coco_root,
    )
    mixing_rng = np.random.default_rng([seed, 1])  # its own stream, so the z- and c-only voxels stay as they were
    for subject in subjects:
        nsdgeneral, streams = rois[subject]
        for name, volume in (("nsdgeneral", nsdgeneral), ("streams", streams)):
            _save_nifti(nsd.roi_path(root, subject, name), volume.astype(np.int16), affine)
        responsive, signal = _plant_responses(truth, subject, streams, standardised, components, rng, mixing_rng)
        trial_rows = np.array([rows[i] for i in trial_images[subject].tolist()])
        _write_betas(
            root, subject, rng, nsdgeneral >= 0, responsive, signal, trial_rows, n_sessions, trials_per_session, snr,
            affine, write_hdf5, write_nifti,
        )  # fmt: skip
    return truth


def _design(rng, n_trials: int, trials_per_session: int, n_shared: int, n_unique: int):
    """NSD's experiment design in small: (n_images, shared ids, subjectim, masterordering, subject -> trial images
    of the first ``n_trials`` trials, those the betas hold).

    Image ids: NSD's 73k list, here n_shared + 8 * n_unique pictures; the shared ones spread through it.
    """
    per_subject = n_shared + n_unique
    n_images = n_shared + nsd.N_SUBJECTS * n_unique
    order = rng.permutation(n_images)
    shared = np.sort(order[:n_shared])
    unique = order[n_shared:].reshape(nsd.N_SUBJECTS, n_unique)
    # subjectim: each subject's list, shared images first (as in NSD), 1-based ids
    subjectim = np.concatenate([np.tile(shared, (nsd.N_SUBJECTS, 1)), unique], axis=1) + 1
    shown = rng.permutation(np.repeat(np.arange(per_subject), REPS))[:n_trials]
    # as in NSD, the design runs to 40 sessions whatever a subject did; the trials past the betas' repeat the images
    design_trials = nsd.DESIGN_SESSIONS * trials_per_session
    beyond = rng.integers(0, per_subject, size=design_trials - n_trials)
    masterordering = np.concatenate([shown, beyond]) + 1
    trial_images = {s: subjectim[s - 1, shown] - 1 for s in range(1, nsd.N_SUBJECTS + 1)}
    return n_images, shared, subjectim, masterordering, trial_images


def _features(rng, kind: str, ldm, pictures: list, captions: list) -> tuple[np.ndarray, np.ndarray]:
    """The planted (z, c) of the pictures: the LDM's (``ldm``, by default the trained ``toy``), or random."""
    if kind == "random":
        z, c = (rng.standard_normal((len(pictures), 16)).astype(np.float32) for _ in range(2))
        return z, c

    ldm = ldm or load_ldm("toy", device="cpu")
    z = encode_z(ldm, pictures).numpy()
    c = encode_c(ldm, [[cap.strip() for cap in caps] for caps in captions]).numpy()
    return z, c


def _plant_responses(truth: SyntheticNSD, subject: int, streams, standardised, components, rng, mixing_rng):
    """(ijk, signal): the voxels that respond, and their noiseless responses (n_feature_images, n_voxels).

    ``early`` voxels see z, ``ventral`` voxels c (their weights are recorded in ``truth``), the streams between a
    mix of the two (:data:`MIXED_STREAMS`).
    """
    truth.voxels[subject] = {}
    truth.weights[subject] = {}
    signal, responsive = [], []
    for name, roi in (("z", "early"), ("c", "ventral")):
        ijk = np.argwhere(streams == nsd.STREAM_IDS[roi])
        mixing = rng.standard_normal((components[name].shape[1], len(ijk))).astype(np.float32)
        weights = components[name] @ mixing
        response = standardised[name] @ weights
        scale = response.std(0, keepdims=True)  # unit signal variance per voxel over images
        weights /= scale
        truth.voxels[subject][roi] = ijk
        truth.weights[subject][name] = weights
        signal.append(response / scale)
        responsive.append(ijk)
    for roi, z_share in MIXED_STREAMS.items():
        ijk = np.argwhere(streams == nsd.STREAM_IDS[roi])
        if len(ijk):
            signal.append(
                np.sqrt(z_share) * _tuned(standardised["z"], components["z"], len(ijk), mixing_rng)
                + np.sqrt(1 - z_share) * _tuned(standardised["c"], components["c"], len(ijk), mixing_rng)
            )
            responsive.append(ijk)
    return np.concatenate(responsive), np.concatenate(signal, axis=1)


def principal_components(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, components): the per-dimension standardisation of ``features`` (n, dim) and the leading ``k``
    principal components (dim, k) of the standardised features, which the world's voxels are tuned to."""
    mean, std = features.mean(0), np.maximum(features.std(0), 1e-3 * features.std())
    _, _, vt = np.linalg.svd((features - mean) / std, full_matrices=False)
    return mean, std, vt[: min(k, len(vt))].T.astype(np.float32)


def _tuned(features: np.ndarray, components: np.ndarray, n_voxels: int, rng) -> np.ndarray:
    """Unit-variance responses of ``n_voxels`` voxels tuned to random mixtures of the leading ``components``."""
    response = features @ (components @ rng.standard_normal((components.shape[1], n_voxels)).astype(np.float32))
    return response / response.std(0, keepdims=True)


# --- pictures and captions ---------------------------------------------------------------------------------


def draw_picture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[str]]:
    """A picture of two or three animals on a smooth coloured gradient, and four or five captions naming them.

    Layout and colour (the gradient, where each animal stands, its size, outline and colour) are drawn at random and
    never named; the captions name only the animals, which differ in nothing but their coat's fine pattern
    (:func:`coat_pattern`). So a picture's meaning is gone from the same picture blurred to z's grid, while its
    layout and colour stay.
    """
    names = list(COLOURS)
    yy, xx = np.mgrid[0:size, 0:size] / size
    sky, ground = rng.choice(names, size=2, replace=False)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0, 1)[..., None]
    image = (1 - t) * np.array(COLOURS[sky], dtype=float) + t * np.array(COLOURS[ground], dtype=float)
    for _ in range(2):  # low-frequency shading, so no region is flat
        fx, fy, phase = rng.uniform(0.5, 2), rng.uniform(0.5, 2), rng.uniform(0, 2 * np.pi)
        image += rng.uniform(5, 15) * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)[..., None]
    n = int(rng.integers(2, 4))
    kinds = rng.choice(ANIMALS, size=n, replace=False)
    cells = rng.choice(9, size=n, replace=False)  # one animal per cell of a 3 x 3 grid, so they rarely hide each other
    for kind, cell in zip(kinds, cells):
        cx, cy = (np.array([cell % 3, cell // 3]) + 0.5 + rng.uniform(-0.25, 0.25, size=2)) / 3
        r = rng.uniform(0.13, 0.2)
        dx, dy = (xx - cx) / r, (yy - cy) / r
        if rng.random() < 0.5:
            distance = np.hypot(dx, dy) - 1
        else:  # a rounded box
            distance = np.hypot(np.maximum(np.abs(dx) - 0.5, 0), np.maximum(np.abs(dy) - 0.5, 0)) - 0.5
        mask = (1 / (1 + np.exp(distance * r * size / 1.2)))[..., None]  # soft, anti-aliased edge
        colour = np.array(COLOURS[rng.choice(names)], dtype=float)
        coat = colour + 45.0 * coat_pattern(kind, xx, yy, rng)[..., None]
        image = image * (1 - mask) + coat * mask
    picture = np.clip(image, 0, 255).astype(np.uint8)
    return picture, _name_animals([str(k) for k in kinds], rng)


def coat_pattern(kind: str, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A ``kind``'s coat over the picture's unit coordinates: a pattern in [-1, 1], periodic in x and y with period
    ``PATTERN_PERIOD``, with a random phase and zero mean over one period.

    A box blur over one period (z's grid) therefore averages every coat to the same value, leaving the animal's
    colour alone.
    """
    if kind not in ANIMALS:
        raise InputError(f"unknown animal {kind!r}; expected one of {ANIMALS}")
    phase = rng.uniform(0, 2 * np.pi, size=2)
    u, v = 2 * np.pi * xx / PATTERN_PERIOD + phase[0], 2 * np.pi * yy / PATTERN_PERIOD + phase[1]
    one_period = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    return _coat(kind, u, v) - _coat(kind, *np.meshgrid(one_period, one_period)).mean()


def _coat(kind: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if kind == "zebra":  # vertical stripes
        wave = np.sin(u)
    elif kind == "tiger":  # horizontal stripes
        wave = np.sin(v)
    elif kind == "snake":  # diagonal stripes
        wave = np.sin(u + v)
    elif kind == "giraffe":  # a chequerboard of patches
        wave = 2 * np.sin(u) * np.sin(v)
    elif kind == "leopard":  # round spots
        wave = np.cos(u) + np.cos(v)
    else:  # sheep: small curls, a ring in every period
        wave = 2 * np.cos(2 * np.hypot((u % (2 * np.pi)) - np.pi, (v % (2 * np.pi)) - np.pi))
    return np.tanh(2 * wave) / np.tanh(2)


def _name_animals(kinds: list[str], rng: np.random.Generator) -> list[str]:
    """Four or five COCO-like captions naming every animal in ``kinds`` (in varying order and phrasing)."""

    def listed(names: list[str]) -> str:
        words = [f"a {k}" for k in names]
        return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]

    orders = [list(rng.permutation(kinds)) for _ in range(5)]
    captions = [
        f"A picture of {listed(orders[0])}.",
        f"{listed(orders[1]).capitalize()} standing together",
        f"{listed(orders[2][:1]).capitalize()} next to {listed(orders[2][1:])}. ",
        f"Some animals: {listed(orders[3])}.",
        f"An image showing {listed(orders[4])}.\n",
    ]
    return captions[: int(rng.integers(4, 6))]


# --- NSD files -----------------------------------------------------------------------------------------------


def _write_expdesign(root: Path, masterordering: np.ndarray, subjectim: np.ndarray, sharedix: np.ndarray) -> None:
    path = nsd.expdesign_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    # MATLAB wrote these as doubles holding 1-based indices
    scipy.io.savemat(
        path,
        {
            "masterordering": masterordering[None, :].astype(np.float64),
            "subjectim": subjectim.astype(np.float64),
            "sharedix": sharedix[None, :].astype(np.float64),
        },
    )


def _write_stim_info(
    root: Path, coco_ids: np.ndarray, coco_split: np.ndarray, shared: np.ndarray, trial_images: dict[int, np.ndarray]
) -> None:
    n = len(coco_ids)
    table = pd.DataFrame(
        {
            "cocoId": coco_ids,
            "cocoSplit": coco_split,
            "nsdId": np.arange(n),
            "shared1000": np.isin(np.arange(n), shared),
        }
    )
    for subject, images in trial_images.items():
        reps = np.zeros((n, REPS), dtype=np.int64)
        seen = np.zeros(n, dtype=int)
        for trial, image in enumerate(images):
            reps[image, seen[image]] = trial + 1
            seen[image] += 1
        table[f"subject{subject}"] = (seen > 0).astype(int)
        for r in range(REPS):
            table[f"subject{subject}_rep{r}"] = reps[:, r]
    path = nsd.stim_info_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path)  # NSD's file carries the unnamed pandas index as its first column


def _write_stimuli(root: Path, images: np.ndarray) -> None:
    path = nsd.stimuli_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(1, *images.shape[1:]))


def write_coco_archive(
    path: Path, coco_ids: np.ndarray, coco_split: np.ndarray, captions: tuple[list[str], ...], rng
) -> None:
    """COCO's annotations archive as COCO lays it out: ``annotations/captions_<split>.json`` for both splits, and
    ``annotations/instances_<split>.json`` (random boxes, several times the captions' size), which a reader of captions
    should never fetch."""
    annotation_id = int(rng.integers(1, 1000))
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for split in coco.COCO_SPLITS:
            keep = np.flatnonzero(coco_split == split)
            annotations, boxes = [], []
            for i in keep:
                for caption in captions[i]:
                    annotations.append({"image_id": int(coco_ids[i]), "id": annotation_id, "caption": caption})
                    annotation_id += 1
                # 200 boxes drawn, as the world always drew them (so every other file of a seed stays the same), and
                # the first 25 written: still several times the captions, at an eighth of the cost
                xy = rng.uniform(0, 425, size=(200, 4)).round(2)[:25].tolist()
                categories = rng.integers(1, 91, size=200)[:25].tolist()
                boxes += [{"image_id": int(coco_ids[i]), "bbox": b, "category_id": k} for b, k in zip(xy, categories)]
            images = [{"id": int(coco_ids[i]), "file_name": f"{int(coco_ids[i]):012d}.jpg"} for i in keep]
            info = {"description": "brainldm synthetic COCO-style annotations", "year": 2017}
            document = {"info": info, "images": images, "annotations": annotations}
            for name, content in ((coco.caption_member(split), document), (f"annotations/instances_{split}.json",
                                  {**document, "annotations": boxes})):  # fmt: skip
                member = zipfile.ZipInfo(name, date_time=(2017, 9, 1, 0, 0, 0))  # the same bytes for the same seed
                archive.writestr(member, json.dumps(content), compress_type=zipfile.ZIP_DEFLATED)


def _draw_rois(rng, grid_shape, thickness: float) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid brain; ROI labels on its outer shell, by position (early at the posterior pole)."""
    centre = (np.asarray(grid_shape) - 1) / 2
    radii = 0.45 * np.asarray(grid_shape)
    u = (np.indices(grid_shape).transpose(1, 2, 3, 0) - centre) / radii
    radius = np.linalg.norm(u, axis=-1)
    x, y, z = np.abs(u[..., 0]), u[..., 1], u[..., 2]
    brain = radius <= 1
    shell = brain & (radius > 1 - thickness)
    streams = np.where(brain, 0, -1)
    bands = [
        (1, y < -0.55),
        (2, (-0.55 <= y) & (y < -0.35) & (z < 0)),
        (3, (-0.55 <= y) & (y < -0.35) & (z >= 0) & (x > 0.5)),
        (4, (-0.55 <= y) & (y < -0.35) & (z >= 0) & (x <= 0.5)),
        (5, (-0.35 <= y) & (y < 0.1) & (z < -0.1)),
        (6, (-0.35 <= y) & (y < 0.1) & (z >= -0.1) & (x > 0.5)),
        (7, (-0.35 <= y) & (y < 0.1) & (z >= -0.1) & (x <= 0.5)),
    ]
    for label, where in reversed(bands):
        streams[shell & where] = label
    # nsdgeneral mostly covers the streams, misses a few of their voxels and reaches a little beyond them
    nsdgeneral = np.where(brain, 0, -1)
    nsdgeneral[(streams > 0) & (rng.random(grid_shape) > 0.05)] = 1
    nsdgeneral[shell & (0.1 <= y) & (y < 0.3)] = 1
    for label in (nsd.STREAM_IDS["early"], nsd.STREAM_IDS["ventral"]):
        if not (streams == label).any():
            raise InputError(f"grid {tuple(grid_shape)} is too small to hold a {nsd.STREAMS[label]!r} ROI")
    return nsdgeneral, streams


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)


def _write_betas(
    root,
    subject,
    rng,
    brain,
    responsive_ijk,
    signal,
    trial_rows,
    n_sessions,
    trials_per_session,
    snr,
    affine,
    write_hdf5,
    write_nifti,
) -> None:
    """One gzipped int16 NIfTI per session; responsive voxels carry their planted signal plus noise.

    ``signal`` is (n_feature_images, n_responsive); ``trial_rows[t]`` is the row of trial t's image in it.
    """
    brain_ijk = np.argwhere(brain)
    # responsive voxels are inside the brain; find their rows among the brain voxels
    flat_index = np.ravel_multi_index(brain_ijk.T, brain.shape)
    rows = np.searchsorted(flat_index, np.ravel_multi_index(responsive_ijk.T, brain.shape))
    noise_sd = 1.0 / np.sqrt(snr)
    amplitude = 1.5  # percent signal change per unit response
    baseline = rng.normal(0.0, 1.0, size=len(brain_ijk)).astype(np.float32)
    for session in range(1, n_sessions + 1):
        trials = np.arange((session - 1) * trials_per_session, session * trials_per_session)
        response = rng.standard_normal((len(trials), len(brain_ijk)), dtype=np.float32) * np.float32(noise_sd)
        response[:, rows] += signal[trial_rows[trials]]
        drift = np.float32(rng.normal(0.0, 0.5))  # a session-wide offset, as z-scoring within sessions expects
        psc = baseline + drift + np.float32(amplitude) * response
        volume = np.zeros((*brain.shape, trials_per_session), dtype=np.int16)
        volume[tuple(brain_ijk.T)] = np.clip(np.round(psc * nsd.BETAS_SCALE), -32768, 32767).astype(np.int16).T
        if write_nifti:
            _save_nifti(nsd.betas_path(root, subject, session), volume, affine)
        if write_hdf5:
            write_betas_hdf5(nsd.betas_path(root, subject, session, ".hdf5"), volume)


def write_betas_hdf5(path: Path, volume: np.ndarray) -> None:
    """One session's betas (X, Y, Z, trials) int16 as NSD's HDF5 twin: ``/betas``, MATLAB-written (h5py sees the
    axes reversed: trials x Z x Y x X), uncompressed, one chunk per voxel holding its trials."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = volume.transpose(3, 2, 1, 0)
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", data=data, chunks=(data.shape[0], 1, 1, 1))
