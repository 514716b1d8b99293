"""The standard reconstruction metrics table (as in Takagi & Nishimoto, Brain-Diffuser, MindEye, MindEye2).

Low-level: PixCorr and SSIM (:mod:`brainldm.metrics`). High-level: 2-way identification in AlexNet layer 2 and 5,
InceptionV3 and CLIP ViT-L/14 feature spaces (chance 50%), and EffNet-B1 and SwAV correlation distance (lower is
better). Feature models load lazily through their usual loaders (torchvision / torch.hub for the CNNs,
transformers for CLIP); a metric whose model cannot be loaded is refused up front (or, when asked, reported as
unavailable with the reason).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from brainldm.analysis.reconstructions import finished_trials, load_trial_images, subject_folders, trial_name
from brainldm.analysis.viz import save_figure
from brainldm.data.features import FeatureStore, load_features
from brainldm.images import normalise
from brainldm.ldm.loading import clip_stand_in
from brainldm.ldm.reconstruct import KINDS
from brainldm.metrics import (
    EVAL_SIZE,
    as_evaluated,
    as_mindeye2_original,
    as_mindeye2_reconstruction,
    correlation_distance,
    pixcorr,
    retrieval_top1,
    ssim,
    two_way_identification,
)
from brainldm.validation import InputError

Extractor = Callable[[list[np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class Metric:
    """One column of the table. ``kind``: ``"pixel"`` (scored on the images themselves), ``"identification"``
    (2-way identification in a feature space, in %) or ``"distance"`` (correlation distance in a feature space).
    ``input_size``: the side, in px, images are resized to (no crop) before the metric's network or comparison."""

    title: str
    kind: str
    higher_is_better: bool = True
    chance: float | None = None
    input_size: int | None = None


# The registry: adding a metric is one entry here (and, for a feature metric, its extractor in load_extractors).
# Input sizes follow MindEye2's evaluation (Scotti et al., ICML 2024), the protocol the field now compares under:
# PixCorr on 425 px RGB and SSIM on 425 px greyscale (NSD's stimulus size), AlexNet at 256 px without a crop,
# Inception at 342, CLIP ViT-L/14 at 224 with CLIP's normalisation, EffNet-B1 at 255, SwAV ResNet-50 at 224.
METRICS = {
    "pixcorr": Metric("PixCorr", "pixel", input_size=EVAL_SIZE),
    "ssim": Metric("SSIM", "pixel", input_size=EVAL_SIZE),
    "alexnet2": Metric("Alex(2)", "identification", chance=0.5, input_size=256),
    "alexnet5": Metric("Alex(5)", "identification", chance=0.5, input_size=256),
    "inception": Metric("Incep", "identification", chance=0.5, input_size=342),
    "clip": Metric("CLIP", "identification", chance=0.5, input_size=224),
    "effnet": Metric("Eff", "distance", higher_is_better=False, input_size=255),
    "swav": Metric("SwAV", "distance", higher_is_better=False, input_size=224),
}
# How several samples per image count: MindEye2 scores one reconstruction per image (sample 0, the default);
# Takagi & Nishimoto average each metric over the samples of each image (5 in the paper).
PROTOCOLS = {
    "mindeye2": "one reconstruction per image (sample 0), as MindEye2 (Scotti et al. 2024) and the tables it prints",
    "takagi": "each metric averaged over the samples of each image, as Takagi & Nishimoto (2023; 5 samples)",
}
CLIP_MODEL = "openai/clip-vit-large-patch14"
RANDOM_CLIP = "random-clip-l14"  # CLIP ViT-L/14's vision tower with random weights, for rehearsals
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, projection_dim=768)  # fmt: skip
# an LDM named so has random weights (brainldm.ldm.loading): its reconstructions are scored by random networks too
RANDOM_PREFIX = "random-"


@dataclass(frozen=True)
class PublishedRow:
    """Published subject-averaged scores, by metric name, with where they come from and on how many test images."""

    source: str
    n_test_images: int
    scores: dict[str, float] = field(default_factory=dict)


# Quoted, not computed here: subject-averaged figures on NSD's shared test images (subjects 1, 2, 5, 7), each as the
# table named in its source prints it (tables disagree on some peers: NeuroVLA's Table 2 prints Brain-Diffuser and
# UMBRAE differently from MindEye2's and ZEBRA's, so every row keeps the table it came from). The test set is the one
# each method's data release has: 982 images (the first 37 sessions: Takagi & Nishimoto, Brain-Diffuser and methods
# built on MindEye1's release) or 1,000 (all 40 sessions: MindEye2 and methods built on its release). Check against
# the papers before citing them.
PUBLISHED_ORDER = ("pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "effnet", "swav")


def _row(source: str, n_test_images: int, *values: float) -> PublishedRow:
    """A published row, its values in the order the tables print them (:data:`PUBLISHED_ORDER`)."""
    return PublishedRow(source, n_test_images, dict(zip(PUBLISHED_ORDER, values)))


REFERENCE_ROWS = {
    "Takagi & Nishimoto 2023": _row("MindEye2 Table 1", 982, .246, .410, .789, .856, .838, .821, .811, .504),
    "Brain-Diffuser 2023": _row("MindEye2 Table 1", 982, .273, .365, .944, .966, .913, .909, .728, .422),
    "DREAM, WACV 2024": _row("NeuroVLA Table 2", 982, .288, .338, .950, .975, .948, .952, .638, .413),
    "MindBridge, CVPR 2024": _row("ZEBRA T1, NeuroVLA T2", 982, .151, .263, .877, .955, .924, .947, .712, .418),
    "MindEye2, ICML 2024": _row("MindEye2 Table 1", 1000, .322, .431, .961, .986, .954, .930, .619, .344),
    "NeuroPictor, ECCV 2024": _row("ZEBRA Table 1", 982, .229, .375, .965, .984, .945, .933, .639, .350),
    "UMBRAE, ECCV 2024": _row("ZEBRA Table 1", 982, .283, .341, .955, .970, .917, .935, .700, .393),
    "NeuroVLA, NeurIPS 2024": _row("NeuroVLA Table 2", 982, .265, .357, .931, .971, .968, .975, .633, .321),
    "MindTuner, AAAI 2025": _row("ZEBRA Table 1", 1000, .322, .421, .958, .988, .956, .938, .612, .340),
}  # fmt: skip


# --- feature extractors, loaded lazily -----------------------------------------------------------------------


def _batch(images: list[np.ndarray], size: int, normalisation: str, device) -> torch.Tensor:
    """Images (uint8 (H, W, 3) or float (3, H, W) in [0, 1]) at ``size`` as the protocol resizes them
    (:func:`~brainldm.metrics.as_evaluated`), normalised as ``normalisation`` names -> (n, 3, size, size)."""
    return normalise(torch.from_numpy(np.stack([as_evaluated(im, size) for im in images])), normalisation).to(device)


def torchvision_extractor(name: str, device="cpu", weights: str | None = "DEFAULT") -> Extractor:
    """AlexNet layer 2 / 5, InceptionV3 avgpool or EffNet-B1 avgpool, with torchvision's ImageNet weights (``weights``
    None: random ones, for rehearsals)."""
    import torchvision  # only when these metrics are asked for (there is no CPU torchvision wheel everywhere)
    from torchvision.models.feature_extraction import create_feature_extractor

    if name in ("alexnet2", "alexnet5"):
        model = torchvision.models.alexnet(weights=weights)
        node = "features.4" if name == "alexnet2" else "features.11"
    elif name == "inception":
        model = torchvision.models.inception_v3(weights=weights, aux_logits=weights is not None, init_weights=False)
        node = "avgpool"
    else:
        model = torchvision.models.efficientnet_b1(weights=weights)
        node = "avgpool"
    size = METRICS[name].input_size
    extractor = create_feature_extractor(model.eval().to(device), return_nodes=[node])

    @torch.no_grad()
    def extract(images):
        return extractor(_batch(images, size, "imagenet", device))[node].flatten(1).cpu().numpy()

    return extract


def swav_extractor(device="cpu", random_weights: bool = False) -> Extractor:
    """SwAV ResNet-50 avgpool features through torch.hub (needs the hub cache or network), or torchvision's ResNet-50
    with random weights (``random_weights``, for rehearsals)."""
    if random_weights:
        import torchvision  # lazy: only where torchvision imports (not beside the CPU machines' torch)

        model = torchvision.models.resnet50(weights=None)
    else:
        model = torch.hub.load("facebookresearch/swav:main", "resnet50")
    model = model.eval().to(device)
    model.fc = torch.nn.Identity()

    @torch.no_grad()
    def extract(images):
        x = _batch(images, METRICS["swav"].input_size, "imagenet", device)
        return model(x).cpu().numpy()

    return extract


def clip_extractor(model=None, model_id: str = CLIP_MODEL, device="cpu") -> Extractor:
    """CLIP image embeddings (ViT-L/14 by default, or :data:`RANDOM_CLIP`; any transformers CLIP vision model, e.g. a
    tiny one in tests)."""
    if model is None:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if model_id == RANDOM_CLIP:
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L14_VISION))
        else:
            model = CLIPVisionModelWithProjection.from_pretrained(model_id)
    model = model.eval().to(device)
    size = model.config.image_size

    @torch.no_grad()
    def extract(images):
        out = model(pixel_values=_batch(images, size, "clip", device))
        embedding = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
        return embedding.cpu().numpy()

    return extract


def stand_in_clip_extractor(model_id: str, device="cpu") -> Extractor | None:
    """The CLIP extractor of a model's own vision tower where it ships one as a stand-in (``toy``; see
    :func:`brainldm.ldm.loading.clip_stand_in`): its own contrastive image space, so it scores the meaning of its
    pictures,
    offline; not comparable with published CLIP figures. None for other models."""
    from transformers import CLIPVisionModelWithProjection

    tower = clip_stand_in(model_id)
    if tower is None:
        return None
    return clip_extractor(CLIPVisionModelWithProjection.from_pretrained(tower), device=device)


def recon_model_ids(recon: str | Path) -> set[str]:
    """The LDMs that made the finished reconstructions under a ``scripts/reconstruct.py`` output folder."""
    trials = [t for folder in subject_folders(recon) for t in finished_trials(folder)]
    return {json.loads((t / "meta.json").read_text()).get("model_id") for t in trials}


TORCHVISION_METRICS = ("alexnet2", "alexnet5", "inception", "effnet", "swav")  # swav: a torch.hub ResNet-50
TORCHVISION_INSTALL = 'pip install -e ".[gpu]"'  # the README's GPU set-up: torchvision beside pip's CUDA torch


def check_torchvision(names: Sequence[str]) -> None:
    """Raise unless torchvision imports, when any of ``names`` needs it."""
    needs = [n for n in names if n in TORCHVISION_METRICS]
    if not needs:
        return
    try:
        import torchvision  # noqa: F401  (lazy: the CPU machines' torch has no torchvision that imports)
    except Exception as err:  # ModuleNotFoundError, or RuntimeError from a torchvision built for another torch
        keep = [n for n in names if n not in TORCHVISION_METRICS]
        raise InputError(
            f"metrics {', '.join(needs)} need torchvision, which cannot be imported here ({err.__class__.__name__}: "
            f"{' '.join(str(err).split())[:120]}); install it with {TORCHVISION_INSTALL}, or leave them out with "
            f"--metrics {','.join(keep) or 'pixcorr,ssim'}"
        ) from err


def unavailable_message(names: Sequence[str], unavailable: dict[str, str]) -> str:
    """One line on the metrics whose networks could not be loaded, and what to do."""
    said = "; ".join(f"{METRICS[n].title}: {reason}" for n, reason in unavailable.items())
    keep = [n for n in names if n not in unavailable]
    return (
        f"cannot compute {', '.join(unavailable)} ({said}); download their checkpoints once with network access "
        f"(CLIP: {CLIP_MODEL}; SwAV: torch.hub's facebookresearch/swav), or leave them out with "
        f"--metrics {','.join(keep) or 'pixcorr,ssim'}"
    )


def load_extractors(
    names: Sequence[str], overrides: dict[str, Extractor] | None = None, device="cpu", random_weights: bool = False
):
    """(extractors, unavailable reasons) for the feature metrics among ``names``; with ``random_weights``, every
    network at its real architecture with random weights (a rehearsal: shapes and costs, not scores)."""
    extractors, unavailable = dict(overrides or {}), {}
    for name in names:
        if METRICS[name].kind == "pixel" or name in extractors:
            continue
        try:
            if name == "clip":
                extractors[name] = clip_extractor(model_id=RANDOM_CLIP if random_weights else CLIP_MODEL, device=device)
            elif name == "swav":
                extractors[name] = swav_extractor(device, random_weights)
            else:
                extractors[name] = torchvision_extractor(name, device, None if random_weights else "DEFAULT")
        except Exception as err:  # an import, a download or a cache miss: say which, keep the other metrics
            unavailable[name] = f"{err.__class__.__name__}: {' '.join(str(err).split())[:300]}"
    return extractors, unavailable


# --- evaluation ----------------------------------------------------------------------------------------------


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
        # an offline model (toy): CLIP ViT-L/14 can't be downloaded and would not know its pictures; it has its own
        (model_id,) = models
        stand_in = stand_in_clip_extractor(model_id, device)
        if stand_in is not None:
            extractors = dict(extractors or {}, clip=stand_in)
            stand_ins["clip"] = f"the {model_id} model's CLIP vision tower (offline stand-in for CLIP ViT-L/14)"
    random_weights = bool(models) and all(str(m).startswith(RANDOM_PREFIX) for m in models)
    if random_weights:
        stand_ins.update(dict.fromkeys(
            [n for n in names if METRICS[n].kind != "pixel" and not (extractors and n in extractors)],
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


# --- the table and the plot ----------------------------------------------------------------------------------


def _format(name: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if METRICS[name].kind == "identification" else f"{value:.3f}"


def metrics_table(results: dict, names: Sequence[str] = tuple(METRICS)) -> str:
    """A markdown table laid out like the published ones, with the quoted reference rows at the bottom."""
    stand_ins = results.get("stand_ins", {})

    def title(n: str) -> str:
        return f"{METRICS[n].title}{'*' if n in stand_ins else ''} {'↑' if METRICS[n].higher_is_better else '↓'}"

    header = "| Method | " + " | ".join(title(n) for n in names) + " |"
    lines = [header, "|---" * (len(names) + 1) + "|"]
    for subject, rows in results["subjects"].items():
        for row, scores in rows.items():
            lines.append(f"| {subject} {row} | " + " | ".join(_format(n, scores.get(n)) for n in names) + " |")
    if len(results["subjects"]) > 1:
        for row, scores in results["average"].items():
            lines.append(f"| **average** {row} | " + " | ".join(_format(n, scores.get(n)) for n in names) + " |")
    for label, published in REFERENCE_ROWS.items():
        cells = " | ".join(_format(n, published.scores.get(n)) for n in names)
        lines.append(f"| *{label} ({published.source}), {published.n_test_images} images* | {cells} |")
    text = "\n".join(lines)
    for name, what in stand_ins.items():
        text += f"\n\n\\* {METRICS[name].title} here is computed with {what}."
    if results["unavailable"]:
        text += "\n\nUnavailable metrics (their models could not be loaded):\n" + "\n".join(
            f"- {METRICS[n].title}: {reason}" for n, reason in results["unavailable"].items()
        )
    if "protocol" in results:
        text += f"\n\nProtocol: {results['protocol']}, {PROTOCOLS[results['protocol']]}."
    for subject, modes in results.get("rescale", {}).items():
        said = ", ".join("as fitted (no rescaling)" if m == "None" else f"rescaled per {m}" for m in modes)
        text += f"\n\nDecoded targets, {subject}: {said}."
    for subject, sets in results.get("test_sets", {}).items():
        text += f"\n\nTest images, {subject}: " + "; ".join(f"{name}: {n}" for name, n in sets.items()) + "."
    if any(len(sets) > 1 for sets in results.get("test_sets", {}).values()):
        text += (
            " Rows marked with a first-sessions set score only the images shown in those sessions, with betas averaged"
            " over every repetition the data hold; for the paper's own averaging, prepare with that many --sessions."
        )
    text += (
        "\n\nRows in italics are published figures quoted for comparison, each from the table named, not computed "
        "here; the number of test images says which test set they used (982: the first 37 sessions; 1000: all 40)."
    )
    return text


def metrics_plot(results: dict, path: str | Path) -> Path:
    """One panel per metric: the subject-averaged value of each row; chance (50%) drawn for identification."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["average"]
    names = [n for n in METRICS if any(n in scores for scores in rows.values())]
    figure, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        labels = [row for row in rows if name in rows[row]]
        ax.bar(range(len(labels)), [rows[row][name] for row in labels], color="tab:blue")
        ax.set_xticks(range(len(labels)), [row.split(",")[0] + ("*" if "," in row else "") for row in labels])
        ax.set_title(METRICS[name].title, fontsize=9)
        if METRICS[name].chance is not None:
            ax.axhline(METRICS[name].chance, color="gray", linestyle="--", linewidth=1)
            ax.set_ylim(0, 1)
    figure.suptitle("reconstruction metrics (average over subjects; * = mean over samples)", fontsize=9)
    return save_figure(figure, path)


def write_report(results: dict, out: str | Path, names: Sequence[str] = tuple(METRICS)) -> dict[str, Path]:
    """metrics.json, metrics.md and metrics.png in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    (out / "metrics.md").write_text(metrics_table(results, names) + "\n")
    return {
        "json": out / "metrics.json",
        "table": out / "metrics.md",
        "plot": metrics_plot(results, out / "metrics.png"),
    }
