"""Voxel-wise encoding models: which LDM features predict which parts of cortex (the paper's second half).

For each feature space (z, c, zc@strength, U-Net taps; see :mod:`brainldm.ldm.features`):

1. PCA to at most 6,400 dimensions, fit on the unique training images only (:func:`pca_scores`, from Gram matrices
   summed over blocks of the features, so a space of any width fits in memory);
2. ridge from the components to every voxel, alpha per voxel by CV grouped by image
(:class:`brainldm.decoding.ridge.RidgeCV`);
3. Pearson r between predicted and measured test responses (betas averaged over repetitions);
4. a one-sided p-value per voxel against the null of r between independent Gaussian vectors of the test length,
   and Benjamini-Hochberg FDR (:func:`significance`);
5. per-ROI summaries over the voxel table's ROI labels (NSD's ``streams``, or a user's own ROIs).

Here is the computation (:func:`fit_encoding` for one feature space, :func:`group_summary` across subjects);
:mod:`brainldm.analysis.encoding_job` runs it for a subject or a group and writes the maps, summaries and figures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch

from brainldm.decoding.ridge import RidgeCV
from brainldm.metrics import dimension_correlation
from brainldm.paths import subject_name
from brainldm.presets import TAKAGI2023
from brainldm.torch_utils import default_device
from brainldm.validation import InputError

MIN_TEST_IMAGES = 4  # the fewest test images whose correlations encoding scores and tests


# --- pure functions ------------------------------------------------------------------------------------------


def pca_scores(
    blocks: Iterable[tuple[np.ndarray, np.ndarray]], n_components: int = TAKAGI2023.n_pca, device=None
) -> tuple[np.ndarray, np.ndarray]:
    """PCA fit on training rows, as the scores of the training and the test rows -> ((n, k), (t, k)), k at most
    ``n_components`` and only directions the training rows vary in.

    ``blocks``: (train (n, ...), test (t, ...)) column blocks that together are the features: one pair of whole
    arrays, or :meth:`~brainldm.data.features.FeatureStore.blocks`. Only the Gram matrices (n x n and t x n) are summed
    over the blocks, each block centred on its training columns' means, so a feature space of any width (a flattened
    U-Net tap: a million values an image) costs n x n memory, never n x width, and no component matrix is formed.
    """
    device = default_device(device)
    gram = cross = None
    for train, test in blocks:
        x = torch.as_tensor(np.asarray(train, dtype=np.float32), device=device).reshape(len(train), -1)
        y = torch.as_tensor(np.asarray(test, dtype=np.float32), device=device).reshape(len(test), -1)
        mean = x.mean(0)
        x, y = x - mean, y - mean
        gram = x @ x.T if gram is None else gram.add_(x @ x.T)
        cross = y @ x.T if cross is None else cross.add_(y @ x.T)
    if gram is None:
        raise InputError("no feature blocks to fit the PCA on")
    e, vectors = torch.linalg.eigh(gram)
    e, vectors = e.flip(0).clamp_min(0), vectors.flip(1)
    k = min(n_components, int((e > e[0] * 1e-6).sum()))
    e, vectors = e[:k], vectors[:, :k]
    # with Xc = U diag(sqrt(e)) V^T, the scores Xc V are U sqrt(e), and a test row's are (y Xc^T) U / sqrt(e)
    return (vectors * e.sqrt()).cpu().numpy(), (cross @ vectors / e.sqrt()).cpu().numpy()


def one_sided_p(r: np.ndarray, n: int) -> np.ndarray:
    """P(R >= r) for the Pearson r of two independent Gaussian vectors of length n (as scipy's pearsonr)."""
    null = scipy.stats.beta(n / 2 - 1, n / 2 - 1, loc=-1, scale=2)
    return null.sf(np.asarray(r, dtype=np.float64))


def significance(r: np.ndarray, n: int, q: float = TAKAGI2023.fdr_q) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p, Benjamini-Hochberg adjusted p, significant mask at FDR q) for per-voxel r over n test images.

    A voxel is significant when its adjusted p is at most q, as Benjamini & Hochberg (and statsmodels) define it.
    """
    p = one_sided_p(r, n)
    adjusted = scipy.stats.false_discovery_control(p, method="bh")
    return p, adjusted, adjusted <= q


def roi_summary(
    r: np.ndarray, significant: np.ndarray, streams: np.ndarray, roi_names: dict[int, str]
) -> dict[str, dict[str, float]]:
    """Per ROI (``streams`` labels named by ``roi_names``): voxel count, mean r and the fraction significant."""
    summary = {}
    for label, name in roi_names.items():
        mask = streams == label
        if mask.any():
            summary[name] = {
                "n_voxels": int(mask.sum()),
                "mean_r": float(r[mask].mean()),
                "fraction_significant": float(significant[mask].mean()),
            }
    return summary


# --- one feature space ---------------------------------------------------------------------------------------


@dataclass
class EncodingResult:
    """One feature space's encoding model, scored per voxel on the test split."""

    feature: str
    r: np.ndarray  # (n_voxels,)
    p: np.ndarray
    p_fdr: np.ndarray
    significant: np.ndarray
    best_alphas: np.ndarray
    n_components: int
    n_test: int
    rois: dict
    q: float = TAKAGI2023.fdr_q  # the FDR level ``significant`` was decided at


def fit_encoding(
    features: Iterable[tuple[np.ndarray, np.ndarray]],
    train_betas: np.ndarray,
    train_ids: np.ndarray,
    test_betas: np.ndarray,
    streams: np.ndarray,
    roi_names: dict[int, str],
    feature: str = "",
    n_components: int = TAKAGI2023.n_pca,
    alphas: Sequence[float] = TAKAGI2023.alphas,
    cv: int = TAKAGI2023.cv_folds,
    q: float = TAKAGI2023.fdr_q,
    device=None,
) -> EncodingResult:
    """Fit and score one feature space.

    ``features``: the features of each distinct training image (in ``np.unique(train_ids)`` order) and of each test
    image, as (train, test) column blocks (see :func:`pca_scores`): ``[(train_features, test_features)]`` for whole
    arrays. ``train_betas``: (n_trials, n_voxels) with ``train_ids`` (n_trials,) the image of each trial. PCA and the
    ridge work on the distinct images (each weighted by its trials; the same fit as on one row per trial), and CV
    folds keep an image's trials together.
    """
    if n_components < 1:
        raise InputError(f"PCA components must be >= 1, got {n_components}")
    images, rows = np.unique(train_ids, return_inverse=True)

    def checked(blocks):
        for train, test in blocks:
            if len(train) != len(images):
                raise InputError(
                    f"{feature or 'features'}: {len(train)} rows of training features for {len(images)} distinct "
                    "training images; pass one row per image, in np.unique(train_ids) order"
                )
            yield train, test

    train_scores, test_scores = pca_scores(checked(features), n_components, device)
    ridge = RidgeCV(alphas=alphas, cv=cv, device=device)
    ridge.fit(train_scores, train_betas, groups=train_ids, rows=rows)
    prediction = ridge.predict(test_scores)
    r = dimension_correlation(prediction, test_betas).astype(np.float32)  # Pearson r per voxel
    p, p_fdr, significant = significance(r, len(test_betas), q)
    return EncodingResult(
        feature=feature,
        r=r.astype(np.float32),
        p=p,
        p_fdr=p_fdr,
        significant=significant,
        best_alphas=ridge.best_alphas_.numpy(),
        n_components=train_scores.shape[1],
        n_test=len(test_betas),
        rois=roi_summary(r, significant, streams, roi_names),
        q=q,
    )


def group_summary(results: dict[int, dict[str, EncodingResult]]) -> dict:
    """Per feature space and ROI: each subject's mean r and fraction of significant voxels, and the mean r over
    subjects with its standard error -> {feature: {roi: {"subjects": {subjNN: {...}}, "mean_r", "sem_r"}}}."""

    summary: dict = {}
    for subject, per_feature in results.items():
        for name, result in per_feature.items():
            for roi, stats in result.rois.items():
                entry = summary.setdefault(name, {}).setdefault(roi, {"subjects": {}})
                entry["subjects"][subject_name(subject)] = {
                    "mean_r": stats["mean_r"],
                    "fraction_significant": stats["fraction_significant"],
                }
    for per_roi in summary.values():
        for entry in per_roi.values():
            r = np.array([s["mean_r"] for s in entry["subjects"].values()])
            entry["mean_r"] = float(r.mean())
            entry["sem_r"] = float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else 0.0
    return summary
