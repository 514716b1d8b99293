"""The scoring job: every finished reconstruction under a ``scripts/reconstruct.py`` output folder scored on the
metrics of :mod:`brainldm.analysis.protocol` (their networks from :mod:`brainldm.analysis.extractors`), per subject,
kind and test set, with retrieval where the decoded features allow it. :mod:`brainldm.analysis.report` makes the table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from brainldm.analysis.extractors import (
    Extractor,
    check_torchvision,
    load_extractors,
    stand_in_clip_extractor,
    unavailable_message,
)
from brainldm.analysis.protocol import METRICS, PROTOCOLS
from brainldm.data.features import FeatureStore, load_features
from brainldm.ldm import registry
from brainldm.ldm.reconstruct import KINDS
from brainldm.metrics import (
    as_mindeye2_original,
    as_mindeye2_reconstruction,
    correlation_distance,
    pixcorr,
    retrieval_top1,
    ssim,
    two_way_identification,
)
from brainldm.reconstruction.folders import finished_trials, load_trial_images, subject_folders, trial_name
from brainldm.validation import InputError


def recon_model_ids(recon: str | Path) -> set[str]:
    """The LDMs that made the finished reconstructions under a ``scripts/reconstruct.py`` output folder."""
    trials = [t for folder in subject_folders(recon) for t in finished_trials(folder)]
    return {json.loads((t / "meta.json").read_text()).get("model_id") for t in trials}


def load_subject_reconstructions(folder: Path) -> list[tuple[dict, dict[str, np.ndarray]]]:
    trials = [load_trial_images(f) for f in finished_trials(folder)]
    if len(trials) < 2:
        raise InputError(f"{folder} holds {len(trials)} finished reconstructions; metrics need at least 2")
    return trials


def score_images(
    originals: list[np.ndarray], reconstructions: list[np.ndarray], names: Sequence[str], extractors: dict
) -> dict[str, float]:
    """Each available metric of ``names`` for one set of reconstructions (a float per metric), on MindEye2's image path:

    1. originals as MindEye2 stores them: resized to 224 px and kept in float16 (its ``coco_images_224``);
    2. reconstructions as MindEye2 scores them: resized to 256 px;
    3. each metric resizes both to its input size (425 for PixCorr and SSIM, 224 for CLIP, ...), all as float tensors
       in [0, 1] with bilinear interpolation and no antialiasing (:func:`~brainldm.metrics.as_evaluated`), then
       normalises for its network.
    """
    return score_sets(originals, reconstructions, names, extractors, {"all": list(range(len(originals)))})["all"]


def score_sets(
    originals: list[np.ndarray],
    reconstructions: list[np.ndarray],
    names: Sequence[str],
    extractors: dict,
    sets: dict[str, list[int]],
    cache: dict | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`score_images` on each set of positions (``sets``: name -> positions) -> {set: {metric: value}}.

    Each image's metric inputs and network features are computed once, whatever the sets: pixel metrics are
    averaged over each set's images, and identification is among each set's images. ``cache`` (the originals
    on MindEye2's path under ``"originals"``, and their features under each metric's name), when given, is filled on
    first use and reused: the originals are the same for every kind and sample of reconstruction.
    """
    cache = {} if cache is None else cache
    if "originals" not in cache:
        cache["originals"] = [as_mindeye2_original(o) for o in originals]
    originals = cache["originals"]
    reconstructions = [as_mindeye2_reconstruction(r) for r in reconstructions]
    scores: dict[str, dict[str, float]] = {name: {} for name in sets}
    for name in names:
        kind = METRICS[name].kind
        if kind == "pixel":
            metric = pixcorr if name == "pixcorr" else ssim
            values = np.array([metric(r, o) for r, o in zip(reconstructions, originals)])
        elif name in extractors:
            if name not in cache:
                cache[name] = np.asarray(extractors[name](originals))
            pred, true = np.asarray(extractors[name](reconstructions)), cache[name]
        else:
            continue
        for set_name, positions in sets.items():
            if kind == "pixel":
                value = values[positions]
            elif kind == "identification":
                value = two_way_identification(pred[positions], true[positions])
            else:
                value = correlation_distance(pred[positions], true[positions])
            scores[set_name][name] = float(np.mean(value))
    return scores


# NSD's two test sets: Takagi & Nishimoto and Brain-Diffuser had the first 37 sessions, in which 982 of the 1,000
# shared images were shown; MindEye2 and the methods built on its release use all 40 sessions (1,000 images).
FIRST_SESSIONS = 37


def sets_of_test_images(
    sessions: Sequence[Sequence[int] | None], first_sessions: int = FIRST_SESSIONS
) -> dict[str, list[int]]:
    """Positions of the test images in each test set the data allow, from the sessions each image was shown in:
    ``"all"``, and ``"first N sessions"`` (the images shown at least once in sessions 1..N) when that is some of
    them but not all (the data run past session N). Images with unknown sessions (older folders) allow only "all"."""
    sets = {"all": list(range(len(sessions)))}
    if all(s for s in sessions):
        early = [i for i, s in enumerate(sessions) if min(s) <= first_sessions]
        if 0 < len(early) < len(sessions):
            sets[f"first {first_sessions} sessions"] = early
    return sets


def evaluate(
    recon: str | Path,
    names: Sequence[str] = tuple(METRICS),
    kinds: Sequence[str] | None = None,
    extractors: dict[str, Extractor] | None = None,
    features: str | Path | None = None,
    device="cpu",
    protocol: str = "mindeye2",
    first_sessions: int = FIRST_SESSIONS,
    allow_unavailable: bool = False,
) -> dict:
    """Metrics of every subject in a ``scripts/reconstruct.py`` output folder, and their average over subjects.

    A metric asked for whose network cannot be loaded (torchvision not installed, a checkpoint neither cached nor
    downloadable) is refused up front with what to install or download, before any image is scored; with
    ``allow_unavailable`` it is left out of the table instead and its reason kept in ``"unavailable"``.

    Returns {"subjects": {subj: {row: {metric: value}}}, "average": {row: {metric: value}}, "unavailable": {...},
    "retrieval": {subj: ...}, "protocol": ..., "test_sets": {subj: {set: n_images}}, "rescale": {subj: [how the
    trials' z and c were rescaled]}}. One row per kind (``kinds``: by default every kind the trials hold, of
    :data:`~brainldm.ldm.reconstruct.KINDS`); ``protocol`` (see :data:`PROTOCOLS`) says how several
    samples per image count: ``"mindeye2"`` scores sample 0, ``"takagi"`` averages over the samples. When the data
    run past ``first_sessions`` sessions, each kind also gets a row on the images shown within them (NSD's 982-image
    test set for 37), next to the row on all of them.
    """
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise InputError(f"unknown metric {unknown[0]!r}; choose from {list(METRICS)}")
    if not allow_unavailable:
        check_torchvision(names)  # at once, before CLIP's download
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; choose from {list(PROTOCOLS)}")
    stand_ins = {}
    models = recon_model_ids(recon)
    if "clip" in names and not (extractors and "clip" in extractors) and len(models) == 1:
        (model_id,) = models
        stand_in = stand_in_clip_extractor(model_id, device)
        if stand_in is not None:
            extractors = dict(extractors or {}, clip=stand_in)
            clip = registry.builder("clip", registry.builder("ldm", model_id).clip)
            stand_ins["clip"] = f"{clip.description}, registered to score {model_id} in place of CLIP ViT-L/14"
    entries = [registry.builder("ldm", m) for m in models]
    random_weights = bool(entries) and all(entry is not None and entry.rehearsal for entry in entries)
    if random_weights:
        stand_ins.update(dict.fromkeys(
            [n for n in names if METRICS[n].kind != "pixel" and (n == "clip" or not (extractors and n in extractors))],
            f"random weights, as the LDM ({', '.join(sorted(models))}) had: a rehearsal, not a score",
        ))  # fmt: skip
    extractors, unavailable = load_extractors(names, extractors, device, random_weights)
    if unavailable and not allow_unavailable:
        raise InputError(unavailable_message(names, unavailable))
    folders = subject_folders(recon)
    if not folders:
        raise InputError(f"no subjNN folders in {recon}; is it the output of scripts/reconstruct.py?")
    results = {
        "subjects": {},
        "unavailable": unavailable,
        "stand_ins": stand_ins,
        "retrieval": {},
        "protocol": protocol,
        "test_sets": {},
        "rescale": {},
    }
    for folder in folders:
        trials = load_subject_reconstructions(folder)
        held = [k for k in KINDS if all((k if k == "Xz" else f"{k}_0") in images for _, images in trials)]
        if kinds is not None and set(kinds) - set(held):
            raise InputError(
                f"{folder} holds no {', '.join(sorted(set(kinds) - set(held)))} reconstructions in some trials (it "
                f"holds {', '.join(held)}); reconstruct them, or score --kinds {','.join(held)}"
            )
        partly = [k for k in KINDS if k not in held and any((k if k == "Xz" else f"{k}_0") in im for _, im in trials)]
        if kinds is None and partly:
            n = sum(all(f"{k}_0" in images for k in partly) for _, images in trials)
            raise InputError(
                f"{folder} holds {', '.join(partly)} in {n} of its {len(trials)} trials only (a folder reconstructed "
                f"with and without the follow-up); score --kinds {','.join(held)}, or reconstruct the rest alike"
            )
        results["rescale"][folder.name] = sorted({str(meta.get("rescale")) for meta, _ in trials})
        sets = sets_of_test_images([meta.get("sessions") for meta, _ in trials], first_sessions)
        results["test_sets"][folder.name] = {name: len(positions) for name, positions in sets.items()}
        rows = {}
        for set_name, scored in _score_kinds(trials, kinds or held, names, extractors, protocol, sets).items():
            suffix = "" if set_name == "all" else f" ({set_name})"
            rows.update({label + suffix: scores for label, scores in scored.items()})
        results["subjects"][folder.name] = rows
        if features is not None:
            results["retrieval"][folder.name] = _retrieval(folder, trials, features)
    rows = {row for subject in results["subjects"].values() for row in subject}
    results["average"] = {
        row: {
            n: float(np.mean([s[row][n] for s in results["subjects"].values() if row in s and n in s[row]]))
            for n in names
            if any(row in s and n in s[row] for s in results["subjects"].values())
        }
        for row in sorted(rows)
    }
    return results


def _score_kinds(trials, kinds: Sequence[str], names: Sequence[str], extractors: dict, protocol: str, sets) -> dict:
    """{set: {row label: scores}} of each kind of reconstruction over ``trials`` ([(meta, images)]) under
    ``protocol``, for each set of positions in ``sets``."""
    originals = [images["original"] for _, images in trials]
    cache: dict = {}  # the originals' metric inputs and features, computed once for every kind and sample

    def score(name: str) -> dict[str, dict[str, float]]:
        reconstructions = [images[name] for _, images in trials]
        return score_sets(originals, reconstructions, names, extractors, sets, cache)

    rows: dict[str, dict] = {set_name: {} for set_name in sets}
    for kind in kinds:
        if kind == "Xz":  # a plain decode: one image, whatever the protocol
            for set_name, scores in score("Xz").items():
                rows[set_name][kind] = scores
            continue
        samples = min(meta["num_samples"] for meta, _ in trials) if protocol == "takagi" else 1
        per_sample = [score(f"{kind}_{s}") for s in range(samples)]
        label = kind if samples == 1 else f"{kind}, mean of {samples} samples"
        for set_name in sets:
            per_set = [p[set_name] for p in per_sample]
            rows[set_name][label] = {n: float(np.mean([p[n] for p in per_set])) for n in per_set[0]}
    return rows


def _retrieval(folder: Path, trials, features) -> dict:
    """Retrieval between predicted (brain) and true (image) features of every decoded target (z, c, and any other
    the maps hold) that the trials saved and the feature store has."""

    def trial_folder(meta: dict) -> Path:
        return folder / trial_name(meta["split"], meta["row"])

    saved = [{p.stem for p in trial_folder(meta).glob("*.npy")} for meta, _ in trials]
    names = sorted(set.intersection(*saved)) if saved else []
    out = {}
    ids = [meta["nsd_id"] for meta, _ in trials]
    for name in names:
        if not (Path(features) / name).is_dir() or FeatureStore(features, name).missing(ids):
            continue
        brain = np.stack([np.load(trial_folder(m) / f"{name}.npy") for m, _ in trials])
        out[name] = retrieval_top1(brain.astype(np.float32), load_features(features, name, ids))
    return out
