"""Scores shared by the decoders, the reconstructions and the app: correlations and 2-way identification."""

from __future__ import annotations

import numpy as np


def _standardise_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    x = x - x.mean(1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def correlation_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between every row of a (n, ...) and every row of b (m, ...) -> (n, m)."""
    return _standardise_rows(a) @ _standardise_rows(b).T


def pattern_correlation(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-item Pearson r between a prediction and its own target, over all feature dimensions -> (n,)."""
    return np.sum(_standardise_rows(pred) * _standardise_rows(true), axis=1)


def dimension_correlation(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-dimension Pearson r across items -> (n_dims,). A constant dimension scores 0."""
    p = np.asarray(pred, dtype=np.float64).reshape(len(pred), -1)
    t = np.asarray(true, dtype=np.float64).reshape(len(true), -1)
    return np.sum(_standardise_rows(p.T) * _standardise_rows(t.T), axis=1)


def identification(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(2-way identification accuracy, rank) of each item, from one correlation matrix -> (n,), (n,).

    2-way identification (chance 0.5), as in Takagi & Nishimoto and later papers: for item i, the fraction of other
    items j whose target correlates with prediction i less than item i's own target does
    (``r(pred_i, true_j) < r(pred_i, true_i)``). Rank (1 = best): the position of item i's own target among all
    targets, by correlation with its prediction.
    """
    r = correlation_matrix(pred, true)
    n = len(r)
    if n < 2:
        raise ValueError("2-way identification needs at least 2 items")
    own = np.diag(r)[:, None]
    wins = (r < own).sum(1)  # the diagonal never counts: r_ii < r_ii is False
    return wins / (n - 1), _ranks(r, own)


def _ranks(r: np.ndarray, own: np.ndarray) -> np.ndarray:
    """1 + how many targets correlate with each prediction more than its own target does."""
    return 1 + (r > own).sum(1)


def two_way_identification(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """2-way identification accuracy of each item (chance 0.5) -> (n,); see :func:`identification`."""
    return identification(pred, true)[0]


def identification_rank(pred: np.ndarray, true: np.ndarray, targets=None) -> np.ndarray:
    """Rank (1 = best) of each prediction's own target among all targets -> (n,); see :func:`identification`.

    Prediction i's own target is ``true[targets[i]]``; by default ``true[i]`` (pred and true paired row by row). The
    app ranks one reconstruction among every test picture this way (``targets=[trial]``).
    """
    if targets is None:
        return identification(pred, true)[1]
    r = correlation_matrix(pred, true)
    return _ranks(r, r[np.arange(len(r)), np.asarray(targets)][:, None])


# --- image metrics -------------------------------------------------------------------------------------------

EVAL_SIZE = 425  # NSD's stimulus size: PixCorr and SSIM compare images at 425 x 425
# MindEye2 scores its 224-px originals (coco_images_224, float16) and its 256-px reconstructions
ORIGINAL_SIZE, RECONSTRUCTION_SIZE = 224, 256


def pixel_vectors(images, size: int = 64) -> np.ndarray:
    """Images (H, W, 3) uint8 of any size -> (n, size * size * 3) float32: each image's pixels, resized alike (bicubic),
    for identification by pixels."""
    from PIL import Image

    resized = [Image.fromarray(np.asarray(i)).resize((size, size), Image.Resampling.BICUBIC) for i in images]
    return np.stack([np.asarray(i) for i in resized]).reshape(len(resized), -1).astype(np.float32)


def as_evaluated(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` as MindEye2's evaluation code sees it at ``size`` x ``size`` -> float32 (3, size, size) in [0, 1].

    A uint8 (H, W, 3) image becomes a float tensor in [0, 1]; a float (3, H, W) one is taken as it is. MindEye2 then
    resizes with ``transforms.Resize(size, InterpolationMode.BILINEAR)`` on tensors, which its pinned torchvision
    (0.16) computes without antialiasing: ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``.
    """
    import torch
    import torch.nn.functional as F

    image = np.asarray(image)
    if image.dtype == np.uint8:
        x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)
    else:
        x = torch.from_numpy(np.asarray(image, dtype=np.float32))
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=False)[0]
    return x.numpy()


def as_mindeye2_original(image: np.ndarray) -> np.ndarray:
    """An original as MindEye2 stores it: at 224 px, in float16 (its ``coco_images_224_float16.hdf5``)."""
    return as_evaluated(image, ORIGINAL_SIZE).astype(np.float16).astype(np.float32)


def as_mindeye2_reconstruction(image: np.ndarray) -> np.ndarray:
    """A reconstruction as MindEye2 scores it: at 256 px."""
    return as_evaluated(image, RECONSTRUCTION_SIZE)


def pixcorr(reconstruction: np.ndarray, original: np.ndarray) -> float:
    """Pearson r between all pixel values (RGB, 425 x 425, :func:`as_evaluated`) of a reconstruction and its original,
    as MindEye2's ``np.corrcoef`` over the flattened images."""
    a = as_evaluated(reconstruction, EVAL_SIZE).astype(np.float64).ravel()
    b = as_evaluated(original, EVAL_SIZE).astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def ssim(reconstruction: np.ndarray, original: np.ndarray) -> float:
    """SSIM of the grayscale images at 425 x 425 (:func:`as_evaluated`; scikit-image's ``rgb2gray``, Gaussian weights,
    sigma 1.5, no sample covariance, data range 1), as MindEye2's evaluation."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    a = rgb2gray(as_evaluated(reconstruction, EVAL_SIZE).transpose(1, 2, 0))
    b = rgb2gray(as_evaluated(original, EVAL_SIZE).transpose(1, 2, 0))
    return float(
        structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)
    )


def correlation_distance(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """1 - Pearson r between each item's reconstruction and original features -> (n,) (lower is better)."""
    return 1.0 - pattern_correlation(pred, true)


def retrieval_top1(brain: np.ndarray, image: np.ndarray, pool: int = 300, draws: int = 30, seed: int = 0) -> dict:
    """Top-1 retrieval among ``pool`` random items (MindEye's protocol), both directions, averaged over draws.

    brain -> image: is each brain embedding's best-correlated image embedding its own? image -> brain likewise.
    """
    n = len(brain)
    pool = min(pool, n)
    rng = np.random.default_rng(seed)
    forward, backward = [], []
    for _ in range(draws):
        idx = rng.choice(n, size=pool, replace=False)
        r = correlation_matrix(brain[idx], image[idx])
        forward.append(np.mean(r.argmax(1) == np.arange(pool)))
        backward.append(np.mean(r.argmax(0) == np.arange(pool)))
    return {"brain_to_image": float(np.mean(forward)), "image_to_brain": float(np.mean(backward)), "pool": pool}
