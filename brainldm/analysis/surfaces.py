"""Cortical surfaces through pycortex: which subject and transform a functional grid lives in, and its ROI layout.

A :class:`CorticalSpace` names a pycortex subject and the transform from its surfaces to a functional grid: NSD's
``subjNN`` with ``func1pt8_to_anat0pt8_autoFSbbr`` (imported once by ``scripts/import_nsd_subject.py``), or any
subject in pycortex's database. :func:`functional_layout` reads a subject's ROI outlines into the grid as NSD-style
``nsdgeneral`` and ``streams`` volumes (a brain's real anatomy for data that has none). Flatmaps are drawn by
:func:`brainldm.analysis.viz.flatmaps`.

pycortex is an optional dependency (``pip install "brainldm[cortex]"``); nothing else in brainldm needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainldm.data import nsd
from brainldm.data.storage import Storage
from brainldm.validation import InputError

NSD_TRANSFORM = "func1pt8_to_anat0pt8_autoFSbbr"


@dataclass(frozen=True)
class CorticalSpace:
    """A pycortex subject and the name of its transform to the functional grid the data live in."""

    subject: str
    transform: str

    @classmethod
    def for_nsd(cls, subject: int) -> CorticalSpace:
        """NSD subject ``subject`` (1-8) as ``scripts/import_nsd_subject.py`` imports it."""
        return cls(f"subj{int(subject):02d}", NSD_TRANSFORM)

    @classmethod
    def parse(cls, text: str) -> CorticalSpace:
        """``"subj01/func1pt8_to_anat0pt8_autoFSbbr"`` -> CorticalSpace("subj01", "func1pt8_to_anat0pt8_autoFSbbr")."""
        subject, _, transform = text.partition("/")
        if not subject or not transform:
            raise InputError(f"a cortical space is SUBJECT/TRANSFORM, e.g. subj01/{NSD_TRANSFORM}; got {text!r}")
        return cls(subject, transform)

    def __str__(self) -> str:
        return f"{self.subject}/{self.transform}"


def require_pycortex():
    """The ``cortex`` module, or an :class:`InputError` saying how to install it."""
    try:
        import cortex
    except ImportError as err:
        raise InputError(
            'flatmaps and cortical layouts need pycortex: pip install "brainldm[cortex]" '
            "(and apt-get install inkscape for ROI labels)"
        ) from err
    return cortex


def check_space(space: CorticalSpace, grid_shape: tuple[int, ...] | None = None) -> None:
    """Raise an :class:`InputError` saying which command imports the subject when pycortex lacks it, or (with
    ``grid_shape``, the data's X, Y, Z) when the space's functional grid is another one."""
    cortex = require_pycortex()
    if space.subject not in cortex.db.subjects:
        hint = (
            f"import it once with: python scripts/import_nsd_subject.py --nsd-root NSD_ROOT --subject "
            f"{int(space.subject[4:])}"
            if space.subject.startswith("subj") and space.subject[4:].isdigit()
            else "import it with cortex.freesurfer.import_subj"
        )
        where = cortex.database.default_filestore
        raise InputError(f"pycortex's database ({where}) has no subject {space.subject!r}; {hint}")
    transforms = cortex.db.get_paths(space.subject)["xfms"]
    if space.transform not in transforms:
        raise InputError(
            f"pycortex subject {space.subject!r} has no transform {space.transform!r} (it has {sorted(transforms)}); "
            "scripts/import_nsd_subject.py writes NSD's"
        )
    if grid_shape is not None:
        grid = tuple(int(n) for n in cortex.db.get_xfm(space.subject, space.transform).shape[::-1])  # (Z, Y, X)
        if grid != tuple(grid_shape):
            raise InputError(
                f"the cortical space {space.subject}/{space.transform} maps a {grid} grid, but the data's voxels "
                f"lie in a {tuple(grid_shape)} grid; pass the --cortical-space SUBJECT/TRANSFORM made for this data "
                f"(NSD subject N: subjNN/{NSD_TRANSFORM}, from scripts/import_nsd_subject.py)"
            )


@dataclass
class FunctionalLayout:
    """A subject's functional grid and its NSD-style ROI volumes, in NIfTI (X, Y, Z) order.

    ``streams`` and ``nsdgeneral`` are -1 outside cortex, as NSD's files are outside the brain.
    """

    affine: np.ndarray  # (4, 4) voxel -> world, mm
    grid_shape: tuple[int, int, int]
    streams: np.ndarray  # int16, NSD streams labels (0 = cortex, in no stream)
    nsdgeneral: np.ndarray  # int16: 1 in visual cortex, 0 elsewhere in cortex


def functional_layout(
    space: CorticalSpace,
    streams_rois: dict[str, tuple[str, ...]],
    nsdgeneral_rois: tuple[str, ...],
    depths: tuple[float, ...] = (0.25, 0.5, 0.75),
) -> FunctionalLayout:
    """Voxels of ``space``'s grid that cortex passes through, labelled by the subject's ROI outlines: each stream of
    ``streams_rois`` (NSD's ``streams`` names -> the outlines in it), and ``nsdgeneral`` over those and
    ``nsdgeneral_rois``.

    Each surface vertex is sampled at ``depths`` between white matter (0) and pia (1) and mapped into the grid;
    a voxel is cortex when a sample lands in it, and takes the label most of its samples carry.
    """
    cortex = require_pycortex()
    check_space(space)
    transform = cortex.db.get_xfm(space.subject, space.transform)
    overlay = cortex.db.get_overlay(space.subject)
    flat, polys = cortex.db.get_surf(space.subject, "flat", merge=True)
    on_flat = np.zeros(len(flat), dtype=bool)
    on_flat[np.unique(polys)] = True  # vertices cut from the flat map have no outline to be inside

    labels = np.zeros(len(flat), dtype=np.int16)  # vertex -> streams label
    visual = np.zeros(len(flat), dtype=bool)
    known = set(overlay.rois.shapes)
    for stream, rois in streams_rois.items():
        for roi in rois:
            if roi not in known:
                raise InputError(f"pycortex subject {space.subject!r} has no ROI {roi!r} (it has {sorted(known)})")
            inside = np.zeros(len(flat), dtype=bool)
            inside[overlay.rois.get_mask(roi)] = True
            inside &= on_flat
            labels[inside & (labels == 0)] = nsd.STREAM_IDS[stream]
            visual |= inside
    for roi in nsdgeneral_rois:
        visual[overlay.rois.get_mask(roi)] = True

    white, _ = cortex.db.get_surf(space.subject, "wm", merge=True)
    pia, _ = cortex.db.get_surf(space.subject, "pia", merge=True)
    grid = tuple(int(n) for n in transform.shape[::-1])  # pycortex volumes are (Z, Y, X)
    votes = np.zeros((len(nsd.STREAMS) + 1, int(np.prod(grid))), dtype=np.int32)  # row 0: visual, 1..: labels
    for depth in depths:
        ijk = np.round(transform((1 - depth) * white + depth * pia)).astype(int)
        inside = np.all((ijk >= 0) & (ijk < grid), axis=1)
        flat_index = np.ravel_multi_index(ijk[inside].T, grid)
        np.add.at(votes, (labels[inside] + 1, flat_index), 1)
        np.add.at(votes[0], flat_index[visual[inside]], 1)
    hits = votes[1:].sum(0)
    streams = np.where(hits > 0, votes[1:].argmax(0), -1).astype(np.int16).reshape(grid)
    nsdgeneral = np.where(hits > 0, (2 * votes[0] >= hits).astype(np.int16), -1).astype(np.int16).reshape(grid)
    affine = np.asarray(transform.reference.affine, dtype=np.float64)
    return FunctionalLayout(affine=affine, grid_shape=grid, streams=streams, nsdgeneral=nsdgeneral)


# What pycortex's FreeSurfer import reads of a subject folder (besides the flat patches)
FREESURFER_FILES = ("mri/T1.mgz", "mri/aseg.mgz", "mri/wm.mgz") + tuple(
    f"surf/{hemi}.{name}"
    for hemi in ("lh", "rh")
    for name in ("white", "smoothwm", "pial", "inflated", "sulc", "thickness", "curv")
)


def nsd_freesurfer_files(subject: int, patch: str = "full") -> list[str]:
    """The keys of an NSD subject's FreeSurfer files that pycortex reads: surfaces, volumes and flat patches."""
    folder = f"nsddata/freesurfer/subj{subject:02d}"
    patches = [f"{folder}/surf/{hemi}.{patch}.flat.patch.3d" for hemi in ("lh", "rh")]
    return patches + [f"{folder}/{name}" for name in FREESURFER_FILES]


def import_nsd_subject(
    nsd_root: str | Path | Storage, subject: int, patch: str = "full", cache_dir: str | Path | None = None
) -> CorticalSpace:
    """Import NSD subject ``subject`` into pycortex's database once: surfaces, flat patch, func1pt8mm transform.

    Reads ``nsddata/freesurfer/subjNN`` (FreeSurfer's surfaces and its ``full`` flat patches) and takes the
    func1pt8mm grid from the subject's ``nsdgeneral`` ROI file. pycortex keeps surfaces in scanner coordinates,
    which NSD's func1pt8mm headers share, so the transform is the inverse of that grid's affine; the import is
    refused when the mid-cortical surface does not land inside the grid's brain mask. ``nsd_root`` may be a URL
    (NSD's bucket): then only those FreeSurfer files are fetched, into ``cache_dir``.
    """
    import nibabel as nib

    cortex = require_pycortex()
    space = CorticalSpace.for_nsd(subject)
    storage = nsd_root if isinstance(nsd_root, Storage) else Storage(nsd_root, cache_dir=cache_dir, progress=True)
    folder = f"nsddata/freesurfer/{space.subject}"
    for key in nsd_freesurfer_files(subject, patch):
        storage.local(key, f"{space.subject} FreeSurfer file")
    reference = storage.local(nsd.roi_file(subject, "nsdgeneral"), f"{space.subject} nsdgeneral ROI")
    freesurfer = ((storage.cache if storage.remote else storage.root) / folder).parent  # FreeSurfer's SUBJECTS_DIR
    if space.subject not in cortex.db.subjects:
        cortex.freesurfer.import_subj(space.subject, space.subject, str(freesurfer), "white", autoflatten=False)
        cortex.freesurfer.import_flat(
            space.subject, patch, cx_subject=space.subject, freesurfer_subject_dir=str(freesurfer), auto_overwrite=True
        )
    grid = nib.load(reference)
    brain = np.asarray(grid.dataobj) >= 0
    (white, _), (pia, _) = (cortex.db.get_surf(space.subject, s, merge=True) for s in ("wm", "pia"))
    world_to_voxel = np.linalg.inv(grid.affine)
    ijk = np.round(nib.affines.apply_affine(world_to_voxel, (white + pia) / 2)).astype(int)
    inside = np.all((ijk >= 0) & (ijk < brain.shape), axis=1)
    in_brain = inside.copy()
    in_brain[inside] = brain[tuple(ijk[inside].T)]
    if in_brain.mean() < 0.8:
        raise InputError(
            f"only {in_brain.mean():.0%} of {space.subject}'s cortex lands inside the brain of {reference}; the "
            "FreeSurfer surfaces and func1pt8mm headers do not share scanner coordinates, so align them first "
            "(e.g. with cortex.align) and save the transform as " + NSD_TRANSFORM
        )
    cortex.db.save_xfm(space.subject, space.transform, world_to_voxel, xfmtype="coord", reference=str(reference))
    return space
