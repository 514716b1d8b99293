"""The offline world end to end: a synthetic NSD tree (:mod:`brainldm.offline.synthetic`) run through the real pipeline,
prepared as a trials dataset, its z and c extracted with an offline LDM and its subject maps fitted.

What the demo app falls back to without maps or data, what the tests decode, and what the offline benchmarks measure:
one function, so that all of them run the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from brainldm.data.features import parse_features
from brainldm.data.trials import SubjectStimuli, prepare_subject
from brainldm.decoding.fit import fit_subject_maps
from brainldm.ldm.extraction import extract_features
from brainldm.offline.synthetic import SyntheticNSD, write_nsd_tree


@dataclass
class OfflineWorld:
    """A fitted offline world under ``root``: ``nsd/`` (the tree), ``trials/``, ``features/`` and the maps."""

    root: Path
    tree: SyntheticNSD
    data: Path
    features: Path
    maps: dict = field(default_factory=dict)  # subject -> SubjectMaps


def build_offline_world(
    root: str | Path,
    ldm,
    model_id: str,
    subjects: tuple[int, ...] = (1,),
    fit: tuple[int, ...] | None = None,
    progress: bool = False,
    **world,
) -> OfflineWorld:
    """Write a synthetic NSD tree of ``subjects`` (``world``: :func:`~brainldm.offline.synthetic.write_nsd_tree`'s
    settings), prepare each subject, extract z and c of its pictures with ``ldm`` (named ``model_id`` in the feature
    store) and fit the maps of the subjects in ``fit`` (default: all)."""

    root = Path(root)
    tree = write_nsd_tree(root / "nsd", subjects, ldm=ldm, **world)
    for subject in subjects:
        prepare_subject(tree.root, subject, root / "trials", progress=progress, coco_annotations=tree.coco_archive)
    stimuli = SubjectStimuli(root / "trials", subjects)  # the shared pictures once
    extract_features(
        ldm, model_id, stimuli.nsd_ids, stimuli.__getitem__, parse_features("z,c"), root / "features",
        progress=progress,
    )  # fmt: skip
    offline = OfflineWorld(root, tree, root / "trials", root / "features")
    for subject in subjects if fit is None else fit:
        offline.maps[subject] = fit_subject_maps(offline.data, offline.features, subject, device="cpu")
    return offline
