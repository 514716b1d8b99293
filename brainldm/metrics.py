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


def two_way_identification(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """2-way identification accuracy of each item (chance 0.5) -> (n,).

    For item i: the fraction of other items j whose target correlates with prediction i less than item i's own
    target does (``r(pred_i, true_j) < r(pred_i, true_i)``), as in Takagi & Nishimoto and later papers.
    """
    r = correlation_matrix(pred, true)
    n = len(r)
    if n < 2:
        raise ValueError("2-way identification needs at least 2 items")
    own = np.diag(r)[:, None]
    wins = (r < own).sum(1)  # the diagonal never counts: r_ii < r_ii is False
    return wins / (n - 1)


def identification_rank(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of each item's own target among all targets, by correlation with its prediction -> (n,)."""
    r = correlation_matrix(pred, true)
    return 1 + (r > np.diag(r)[:, None]).sum(1)
