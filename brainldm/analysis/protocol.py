"""What a reconstruction is scored on, and against what: the metrics of the standard table (as in Takagi & Nishimoto,
Brain-Diffuser, MindEye, MindEye2), the protocols for several samples per image, and published rows to compare with.

Low-level: PixCorr and SSIM (:mod:`brainldm.metrics`). High-level: 2-way identification in AlexNet layer 2 and 5,
InceptionV3 and CLIP ViT-L/14 feature spaces (chance 50%), and EffNet-B1 and SwAV correlation distance (lower is
better); their networks are :mod:`brainldm.analysis.extractors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from brainldm.metrics import EVAL_SIZE


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
