"""Ridge regression with the penalty chosen per target by (grouped) k-fold cross-validation, in torch.

Solver functions take and return tensors and hold no state; :class:`RidgeCV` validates input, calls them and
stores the fitted attributes (scikit-learn style). The work per fold is one eigendecomposition of the training
Gram matrix (``X^T X`` when n_samples >= n_features, else ``X X^T``), reused for every alpha and every batch of
targets: from it, each alpha's map from training targets to validation predictions is computed once per fold (where
that costs less than applying its factors to each target batch), and every alpha's predictions of a target batch are
one matrix product. Targets are processed in batches, so Y can be
far larger than GPU memory. Samples that share a feature row (an image shown three times) can be fit on the distinct
rows, weighted by their counts: the same solution, with the work of the distinct rows (``rows`` in ``fit``).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch

from brainldm.presets import TAKAGI2023
from brainldm.torch_utils import default_device
from brainldm.validation import InputError, check_finite, oneline

SCORINGS = ("correlation", "mse")


# --- pure functions ------------------------------------------------------------------------------------------


def make_folds(n_samples: int, cv: int, groups: Sequence | None = None, seed: int = 0) -> list[np.ndarray]:
    """k folds of validation indices. Samples sharing a group are always in the same fold."""
    groups = np.arange(n_samples) if groups is None else np.asarray(groups)
    if len(groups) != n_samples:
        raise InputError(f"groups has {len(groups)} entries for {n_samples} samples")
    unique, inverse = np.unique(groups, return_inverse=True)
    if not 2 <= cv <= len(unique):
        raise InputError(f"cv must be between 2 and the number of groups ({len(unique)}), got {cv}")
    fold_of_group = np.empty(len(unique), dtype=np.int64)
    fold_of_group[np.random.default_rng(seed).permutation(len(unique))] = np.arange(len(unique)) % cv
    fold = fold_of_group[inverse]
    return [np.flatnonzero(fold == k) for k in range(cv)]


def gram_eigh(X: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """Eigendecomposition of X's smaller Gram matrix -> (form, eigenvalues, eigenvectors).

    ``primal``: X^T X = V diag(e) V^T (n_samples >= n_features); ``dual``: X X^T = U diag(e) U^T.
    """
    primal = X.shape[0] >= X.shape[1]
    gram = X.T @ X if primal else X @ X.T
    e, vectors = torch.linalg.eigh(gram)
    return ("primal" if primal else "dual"), e.clamp_min(0), vectors


def ridge_factors(X_train: torch.Tensor, Y_train: torch.Tensor, decomposition) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) such that the ridge coefficients (n_features, n_targets) for any alpha are ``L @ (R / (e + alpha))``,
    from the eigendecomposition of X_train's Gram matrix (:func:`gram_eigh`)."""
    form, _, vectors = decomposition
    if form == "primal":
        return vectors, vectors.T @ (X_train.T @ Y_train)
    return X_train.T @ vectors, vectors.T @ Y_train


class _Design:
    """The training side of one fit, on X's distinct rows: ``rows`` (n_samples,) says which row of X each sample has
    (repeated presentations of one image share a row), and the fit on the samples ``train`` is the same as a ridge on
    the distinct rows they use, each weighted by how often it occurs. So the Gram matrix, its eigendecomposition and
    every prediction are computed once per distinct row instead of once per sample.

    With weights c, centring on the weighted means, and ``Xw = sqrt(c) (X - x_mean)``, ``Yw = (Ysum - c y_mean) /
    sqrt(c)`` (Ysum: each row's summed targets), ``Xw^T Xw`` and ``Xw^T Yw`` are the sample-level ``X^T X`` and
    ``X^T Y`` of the centred data, so the solution is the sample-level one exactly.
    """

    def __init__(self, X: torch.Tensor, rows: torch.Tensor, train: torch.Tensor):
        counts = torch.bincount(rows[train], minlength=len(X)).to(X.dtype)
        self.used = torch.nonzero(counts).ravel()
        self.counts = counts[self.used]
        self.n = len(train)
        self.X_mean = (self.counts[:, None] * X[self.used]).sum(0) / self.n
        self.Xw = (X[self.used] - self.X_mean) * self.counts.sqrt()[:, None]
        self.decomposition = gram_eigh(self.Xw)

    def prediction_factors(self, X_eval: torch.Tensor, alphas: torch.Tensor, n_targets: int) -> tuple:
        """Predictions at X_eval for every alpha are ``A @ (B @ T)`` with T the training targets as the solver takes
        them (``Xw^T Yw`` in the primal form, ``Yw`` in the dual) -> (A (n_alphas, n_eval, k), B or None).

        ``A B`` is, per alpha, ``X_eval (Xw^T Xw + alpha)^-1`` (primal) or ``X_eval Xw^T (Xw Xw^T + alpha)^-1``
        (dual). It does not depend on the targets: with more targets than alphas x evaluation rows it is formed once
        per fold (B None), and each target batch costs one product; with fewer, B is applied to each batch instead."""
        form, e, vectors = self.decomposition
        left = X_eval @ vectors if form == "primal" else (X_eval @ self.Xw.T) @ vectors
        scaled = torch.stack([left / (e + alpha) for alpha in alphas])
        if len(alphas) * len(X_eval) < n_targets:
            return scaled @ vectors.T, None
        return scaled, vectors.T

    def targets(self, Y_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Yw, y_mean) from the training samples' targets summed per row of X (n_rows, T)."""
        Y_sum = Y_sum[self.used]
        Y_mean = Y_sum.sum(0) / self.n
        return (Y_sum - self.counts[:, None] * Y_mean) / self.counts.sqrt()[:, None], Y_mean


def _row_sums(rows: torch.Tensor, Y: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Targets summed over the samples of each row of X -> (n_rows, T)."""
    return torch.zeros(n_rows, Y.shape[1], device=Y.device, dtype=Y.dtype).index_add_(0, rows, Y)


def _sample_rows(rows, n_samples: int, device) -> torch.Tensor:
    if rows is None:
        return torch.arange(n_samples, device=device)
    return torch.as_tensor(np.asarray(rows), device=device, dtype=torch.long)


def ridge_cv_scores(
    X: torch.Tensor,
    Y: torch.Tensor | np.ndarray,
    alphas: torch.Tensor,
    folds: list[np.ndarray],
    scoring: str = "correlation",
    target_batch_size: int = 4096,
    rows: Sequence[int] | np.ndarray | None = None,
    prediction_moments: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean validation score over folds for every alpha and target -> (n_alphas, n_targets), on X's device.

    X (n_samples, n_features) lives on the compute device; Y (n_samples, n_targets) may stay on the CPU and is
    moved one target batch at a time. Each fold's training data are centred on their own means (intercept).
    The folds' eigendecompositions are computed once and reused for every target batch and alpha.

    ``rows`` (n_samples,): when samples share feature rows (an image shown three times), X may hold only the
    distinct rows and ``rows`` the row of each sample; scores are the same as with the expanded X, and the work
    scales with the distinct rows (see :class:`_Design`). Folds and scores stay per sample.
    """
    n, n_targets = Y.shape
    device = X.device
    rows = _sample_rows(rows, n, device)
    fold_state = []
    for validation in folds:
        train = torch.from_numpy(np.setdiff1d(np.arange(n), validation)).to(device)
        validation = torch.from_numpy(validation).to(device)
        design = _Design(X, rows, train)
        val_rows, val_of_sample = torch.unique(rows[validation], return_inverse=True)
        val_counts = torch.bincount(val_of_sample).to(X.dtype)[:, None]
        factors = design.prediction_factors(X[val_rows] - design.X_mean, alphas, n_targets)
        fold_state.append((design, validation, val_rows, val_of_sample, val_counts, factors))
    scores = torch.zeros(len(alphas), n_targets, device=device, dtype=X.dtype)
    if prediction_moments:
        deviation_sums, squares_sum = torch.zeros_like(scores), torch.zeros_like(scores)
        intercept_sums = torch.zeros(n_targets, device=device, dtype=X.dtype)  # the same at every alpha
    for start in range(0, n_targets, target_batch_size):
        Y_batch = _to(Y[:, start : start + target_batch_size], X)
        Y_sum_all = _row_sums(rows, Y_batch, len(X))
        # X^T Y once per batch for the primal folds, each subtracting its validation rows
        cross_all = X.T @ Y_sum_all if any(f[0].decomposition[0] == "primal" for f in fold_state) else None
        for design, validation, val_rows, val_of_sample, val_counts, (A, B) in fold_state:
            Y_val = Y_batch[validation]
            Y_val_sum = _row_sums(val_of_sample, Y_val, len(val_rows))
            Y_sum = Y_sum_all.index_add(0, val_rows, Y_val_sum, alpha=-1)  # the training samples' sums
            if design.decomposition[0] == "primal":  # the maps take Xw^T Yw: from the batch-wide product
                Y_mean = Y_sum.sum(0) / design.n
                Y_w = cross_all - X[val_rows].T @ Y_val_sum - design.n * torch.outer(design.X_mean, Y_mean)
            else:
                Y_w, Y_mean = design.targets(Y_sum)
            block = scores[:, start : start + target_batch_size]
            Y_centred = Y_val - Y_val.mean(0)
            Y_centred_sum = _row_sums(val_of_sample, Y_centred, len(val_rows))
            Y_norm = Y_centred.norm(dim=0)
            predictions = A @ (Y_w if B is None else B @ Y_w)  # (alphas, distinct validation rows, targets)
            if prediction_moments:
                intercept_sums[start : start + target_batch_size] += len(validation) * Y_mean
            for a, p in enumerate(predictions):
                total = (val_counts * p).sum(0)  # over the validation samples; p is the prediction less the intercept
                if prediction_moments:
                    columns = slice(start, start + target_batch_size)
                    deviation_sums[a, columns] += total
                    squares_sum[a, columns] += (val_counts * p * p).sum(0)
                if scoring == "correlation":  # Pearson r over the validation samples; the intercept cancels
                    p -= total / len(validation)
                    p_norm = (val_counts * p * p).sum(0).sqrt()
                    denominator = (p_norm * Y_norm).clamp_min(torch.finfo(p.dtype).tiny)
                    block[a] += (p * Y_centred_sum).sum(0) / denominator
                else:  # mean squared error over the validation samples, negated
                    p += Y_mean
                    squares = (Y_val * Y_val).sum(0) - 2 * (p * Y_val_sum).sum(0) + (val_counts * p * p).sum(0)
                    block[a] -= squares / len(validation)
    if not prediction_moments:
        return scores / len(folds)
    deviation = deviation_sums / n
    mean = deviation + intercept_sums / n
    return scores / len(folds), mean, (squares_sum / n - deviation * deviation).clamp_min(0).sqrt()


def solve_ridge(
    X: torch.Tensor,
    Y: torch.Tensor | np.ndarray,
    alphas: torch.Tensor,
    target_batch_size: int = 4096,
    rows: Sequence[int] | np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge with an intercept and one alpha per target (n_targets,) -> coef (n_features, n_targets), intercept.

    One eigendecomposition for all targets; coef and intercept are returned on the CPU. ``rows`` as in
    :func:`ridge_cv_scores`.
    """
    n_samples, n_targets = Y.shape
    rows = _sample_rows(rows, n_samples, X.device)
    design = _Design(X, rows, torch.arange(n_samples, device=X.device))
    e = design.decomposition[1]
    coef = torch.empty(X.shape[1], n_targets, dtype=X.dtype)
    intercept = torch.empty(n_targets, dtype=X.dtype)
    for start in range(0, n_targets, target_batch_size):
        stop = min(start + target_batch_size, n_targets)
        Y_w, Y_mean = design.targets(_row_sums(rows, _to(Y[:, start:stop], X), len(X)))
        left, right = ridge_factors(design.Xw, Y_w, design.decomposition)
        weights = left @ (right / (e[:, None] + alphas[start:stop].to(X)[None, :]))
        coef[:, start:stop] = weights.cpu()
        intercept[start:stop] = (Y_mean - design.X_mean @ weights).cpu()
    return coef, intercept


def symmetric_sqrt(gram: torch.Tensor) -> torch.Tensor:
    """S = gram^(1/2) (symmetric): S W has the same right singular vectors and values as X W when gram = X^T X."""
    e, v = torch.linalg.eigh(gram)
    return (v * e.clamp_min(0).sqrt()) @ v.T


class RankReduction:
    """The rank-r map A B closest to a ridge map W in training predictions (argmin ||X (W - A B)||_F), built from
    W's column blocks in two passes, so that no dense W need be held (DPT's 2.4 million targets a picture).

    Each block is given as an *image* M_b whose Gram matrix M_b^T M_b is that of the block's training predictions
    X W_b: in feature space M_b = S W_b (:func:`symmetric_sqrt`, k rows), in the trials' space the centred predictions
    themselves (n rows, :class:`TrialSpaceRidge`). Pass 1 (:meth:`add`) sums M_b M_b^T; its top-r eigenvectors give
    B's rows, the top-r right singular vectors of X W. Pass 2 (:meth:`factor`) gives each block's columns of B and
    adds ``coef_b @ B_b^T`` to A, where ``coef_b`` is W_b (feature space) or the block's dual coefficients (trial
    space: A is then ``X^T U`` times it, :meth:`TrialSpaceRidge.left`).
    """

    def __init__(self, rank: int):
        self.rank = rank
        self._products: torch.Tensor | None = None
        self.left: torch.Tensor | None = None
        self.right: list[torch.Tensor] = []

    def add(self, image: torch.Tensor) -> None:
        """Pass 1: one block's image (m, width)."""
        product = image @ image.T
        self._products = product if self._products is None else self._products + product

    def factor(self, coef: torch.Tensor, image: torch.Tensor) -> None:
        """Pass 2, in the blocks' order: one block's coefficients (rows, width) and its image (m, width)."""
        if not self.right:
            lam, q = torch.linalg.eigh(self._products)
            rank = min(self.rank, len(lam))  # no more directions than the image has rows
            lam, self._q = lam.flip(0)[:rank], q.flip(1)[:, :rank]
            self._norm = lam.clamp_min(torch.finfo(lam.dtype).tiny).sqrt()[:, None]
        block_right = (self._q.T @ image) / self._norm
        contribution = coef @ block_right.T
        self.left = contribution if self.left is None else self.left + contribution
        self.right.append(block_right.cpu())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (rows, r), B (r, n_targets)) after pass 2."""
        return self.left, torch.cat(self.right, dim=1)


def reduced_rank(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-r map closest to ``weight`` in training predictions: argmin ||X (W - A B)||_F -> (A, B).

    ``gram`` is X^T X of the (standardised, centred) training data: :class:`RankReduction` in feature space, one block.
    """
    image = symmetric_sqrt(gram) @ weight
    reduction = RankReduction(rank)
    reduction.add(image)
    reduction.factor(weight, image)
    return reduction.factors()


class TrialSpaceRidge:
    """Ridge of standardised ``X`` (n, k) with an intercept, solved in the trials' space: for fewer trials than
    voxels, without any k x n_targets weights.

    With X centred and X X^T = U diag(e) U^T, the map of targets Y at alphas is W = X^T U D with D = U^T (Y - mean) /
    (e + alpha) (one alpha per target): :meth:`solve` gives D (the dual coefficients), the centred training
    predictions X W = U diag(e) D (n x width, like the targets) and the intercept; :meth:`left` turns dual
    coefficients (n, r) into the map's (k, r).
    """

    def __init__(self, X: torch.Tensor):
        self.X_mean = X.mean(0)
        self.centred = X - self.X_mean
        e, self.u = torch.linalg.eigh(self.centred @ self.centred.T)
        self.e = e.clamp_min(0)
        self._mean_row = (self.X_mean @ self.centred.T) @ self.u  # the training mean in the eigenbasis

    def solve(self, Y: torch.Tensor, alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(D (n, width), X W centred (n, width), intercept (width,)) of targets ``Y`` (n, width) at ``alphas``."""
        Y_mean = Y.mean(0)
        d = (self.u.T @ (Y - Y_mean)) / (self.e[:, None] + alphas[None, :])
        return d, self.u @ (self.e[:, None] * d), Y_mean - self._mean_row @ d

    def left(self, dual: torch.Tensor) -> torch.Tensor:
        """Dual coefficients (n, r) -> the map's coefficients X^T U dual (k, r)."""
        return self.centred.T @ (self.u @ dual)


def _to(array, like: torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
    return tensor.to(device=like.device, dtype=like.dtype)


_TF32_LOCK = threading.Lock()


@contextmanager
def _cuda_tf32(enabled: bool):
    """Let CUDA float32 matmuls use TF32 inside the block only, and only when asked: off CUDA (or with
    ``enabled`` False) the process-wide flag is not touched at all. torch has no per-call TF32 switch, so the lock
    keeps two fits in threads from restoring each other's flag out of order."""
    if not enabled or torch.backends.cuda.matmul.allow_tf32:
        yield
        return
    with _TF32_LOCK:
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False


# --- the estimator -------------------------------------------------------------------------------------------


class RidgeCV:
    """Ridge regression, alpha chosen per target by k-fold cross-validation (optionally grouped).

    Args:
        alphas: candidate penalties (all > 0). Default: the preset's.
        cv: number of folds.
        scoring: ``"correlation"`` (Pearson r on each validation fold, the default) or ``"mse"``.
        device: where to compute (default: CUDA when available). Y stays on the CPU between target batches.
        dtype: compute dtype, ``"float32"`` (default) or ``"float64"`` (for tight agreement with float64 solvers).
        target_batch_size: targets per batch; lower it if GPU memory runs out.
        random_state: seed of the fold assignment.
        tf32_cv: on CUDA, let the cross-validation matmuls use TF32 (several times faster on Ampere/Hopper; the
            scores only rank alphas). The final fit is always computed in full ``dtype`` precision.

    Attributes (after ``fit``):
        coef_: (n_features, n_targets) CPU tensor.  intercept_: (n_targets,).
        best_alphas_: (n_targets,) chosen alpha per target.  cv_scores_: (n_alphas, n_targets) mean CV score.
        cv_prediction_mean_, cv_prediction_std_: (n_targets,) mean and standard deviation of the out-of-fold
            predictions at the chosen alpha: how predictions on unseen data spread (ridge shrinks them towards
            the mean), for rescaling them to the targets' spread.
        n_features_in_: number of features seen in ``fit``.

    Follows scikit-learn's estimator contract without depending on scikit-learn: ``get_params`` / ``set_params``
    (so ``sklearn.base.clone`` works; parameters are stored as given and checked in ``fit``), ``score``, tags, and
    ``sklearn.utils.estimator_checks.check_estimator`` passes (``tests/test_ridge.py``).
    """

    def __init__(
        self,
        alphas: Sequence[float] = TAKAGI2023.alphas,
        cv: int = TAKAGI2023.cv_folds,
        scoring: str = "correlation",
        device: str | torch.device | None = None,
        dtype: str = "float32",
        target_batch_size: int = 4096,
        random_state: int = 0,
        tf32_cv: bool = True,
    ):
        self.alphas = alphas
        self.cv = cv
        self.scoring = scoring
        self.device = device
        self.dtype = dtype
        self.target_batch_size = target_batch_size
        self.random_state = random_state
        self.tf32_cv = tf32_cv

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters, as scikit-learn estimators report them."""
        return {
            name: getattr(self, name) for name in inspect.signature(type(self).__init__).parameters if name != "self"
        }

    def set_params(self, **params) -> RidgeCV:
        valid = self.get_params()
        for name, value in params.items():
            if name not in valid:
                raise InputError(f"RidgeCV has no parameter {name!r}; it has {sorted(valid)}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = type(self)().get_params()
        changed = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if repr(v) != repr(defaults[k]))
        return f"RidgeCV({changed})"

    def fit(self, X, Y, groups: Sequence | None = None, rows: Sequence[int] | None = None) -> RidgeCV:
        """Fit on X (n_samples, n_features) and Y (n_samples, n_targets) or (n_samples,); ``groups`` keeps samples
        together in CV. Arrays, tensors or anything ``np.asarray`` reads.

        ``rows`` (n_samples,): when samples share feature rows (each image shown several times), pass X's distinct
        rows only and the row of each sample here. The fit is the same as on the expanded X, with the work of the
        distinct rows (a third of it for NSD's three presentations)."""
        alphas = np.asarray(self.alphas, dtype=np.float64).ravel()
        if alphas.size == 0 or not np.all(alphas > 0):
            raise InputError(f"alphas must all be > 0, got {alphas.tolist()}")
        if self.scoring not in SCORINGS:
            raise InputError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if Y is None:
            raise InputError("RidgeCV requires y to be passed, but the target y is None")
        X, Y = _as_numbers("X", X), _as_numbers("Y", Y)
        self._single_target = Y.ndim == 1
        if self._single_target:
            Y = Y.reshape(-1, 1)
        if X.ndim != 2 or Y.ndim != 2 or (rows is None and X.shape[0] != Y.shape[0]):
            raise InputError(
                f"expected X (n_samples, n_features) and Y (n_samples, n_targets), got {tuple(X.shape)}, "
                f"{tuple(Y.shape)}; reshape a single feature with X.reshape(-1, 1)"
            )
        n_samples, n_features = Y.shape[0], X.shape[1]
        for what, n, array in (("sample", n_samples, X), ("feature", n_features, X), ("target", Y.shape[1], Y)):
            if n == 0:  # scikit-learn's wording
                raise InputError(f"0 {what}(s) (shape={tuple(array.shape)}) while a minimum of 1 is required.")
        if rows is not None:
            rows = np.asarray(rows)
            if rows.shape != (n_samples,) or rows.dtype.kind not in "iu" or not 0 <= rows.min() <= rows.max() < len(X):
                raise InputError(
                    f"rows must hold one index into X's {len(X)} rows per sample ({Y.shape[0]}), got {rows.shape} "
                    f"{rows.dtype} values"
                )
        if n_samples < max(2, self.cv):
            raise InputError(
                f"{self.cv}-fold cross-validation needs at least {max(2, self.cv)} samples, got n_samples = {n_samples}"
            )
        check_finite("X", X)
        check_finite("Y", Y)
        device = default_device(self.device)
        dtype = _torch_dtype(self.dtype)
        X_t = _to(X, torch.empty(0, device=device, dtype=dtype))
        alphas_t = torch.as_tensor(alphas, device=device, dtype=dtype)
        y_bytes = Y.shape[0] * Y.shape[1] * X_t.element_size()  # Y moves in the compute dtype (4 or 8 bytes)
        if device.type == "cuda" and 3 * y_bytes < torch.cuda.mem_get_info(device)[0]:
            Y = _to(Y, X_t)  # fits with room to spare: one transfer instead of one per fold and target batch

        folds = make_folds(n_samples, self.cv, groups, self.random_state)
        # TF32 tensor cores for the CV predictions only (where the time goes); the final refit stays full fp32.
        with _cuda_tf32(self.tf32_cv and device.type == "cuda"):
            scores, mean, std = ridge_cv_scores(
                X_t, Y, alphas_t, folds, self.scoring, self.target_batch_size, rows, prediction_moments=True
            )
        best = scores.argmax(0)
        self.cv_scores_ = scores.cpu()
        self.best_alphas_ = alphas_t[best].cpu()
        targets = torch.arange(scores.shape[1], device=scores.device)
        self.cv_prediction_mean_ = mean[best, targets].cpu()
        self.cv_prediction_std_ = std[best, targets].cpu()
        self.coef_, self.intercept_ = solve_ridge(X_t, Y, alphas_t[best], self.target_batch_size, rows)
        self.n_features_in_ = n_features
        return self

    def __sklearn_is_fitted__(self) -> bool:
        """scikit-learn's fitted-ness protocol (``sklearn.utils.validation.check_is_fitted``)."""
        return getattr(self, "coef_", None) is not None

    def __sklearn_tags__(self):
        """What scikit-learn's checks may expect: a regressor of one or many targets, dense real input."""
        from sklearn.utils import InputTags, RegressorTags, Tags, TargetTags

        return Tags(
            estimator_type="regressor",
            target_tags=TargetTags(required=True, one_d_labels=False, two_d_labels=False, multi_output=True,
                                   single_output=True),
            regressor_tags=RegressorTags(),
            input_tags=InputTags(two_d_array=True, sparse=False, allow_nan=False),
        )  # fmt: skip

    def predict(self, X):
        """X (n_samples, n_features) -> (n_samples, n_targets), or (n_samples,) if fit on a 1-D Y. A tensor in gives
        a tensor out; anything else gives a numpy array, float64 for float64 input."""
        if not self.__sklearn_is_fitted__():
            raise _not_fitted_error()
        is_tensor = isinstance(X, torch.Tensor)
        X = _as_numbers("X", X)
        if X.ndim != 2:
            raise InputError(
                f"expected X (n_samples, n_features), got shape {tuple(X.shape)}; Reshape your data with "
                "X.reshape(-1, 1) for one feature or X.reshape(1, -1) for one sample"
            )
        if X.shape[1] != self.n_features_in_:
            raise InputError(
                f"X has {X.shape[1]} features, but RidgeCV is expecting {self.n_features_in_} features as input"
            )
        check_finite("X", X)
        X_t = torch.as_tensor(X, dtype=self.coef_.dtype)
        prediction = X_t @ self.coef_ + self.intercept_
        if self._single_target:
            prediction = prediction[:, 0]
        if is_tensor:
            return prediction
        return prediction.numpy().astype(np.float64 if X.dtype == np.float64 else prediction.numpy().dtype)

    def score(self, X, y) -> float:
        """R^2 of the predictions, averaged uniformly over targets (as scikit-learn's regressors)."""
        y = np.asarray(_as_numbers("y", y), dtype=np.float64)
        pred = np.asarray(self.predict(X), dtype=np.float64).reshape(y.shape)
        y2, p2 = y.reshape(len(y), -1), pred.reshape(len(pred), -1)
        residual = ((y2 - p2) ** 2).sum(0)
        total = ((y2 - y2.mean(0)) ** 2).sum(0)
        r2 = np.where(total > 0, 1 - residual / np.where(total > 0, total, 1), np.where(residual > 0, 0.0, 1.0))
        return float(r2.mean())


def _as_numbers(name: str, values):
    """A tensor as it is, anything else as a numpy array of real numbers; sparse and complex input is refused."""
    if hasattr(values, "toarray") or type(values).__module__.startswith("scipy.sparse"):
        raise InputError(f"RidgeCV does not accept sparse {name}; pass a dense array (e.g. {name}.toarray())")
    if isinstance(values, torch.Tensor):
        if values.is_complex():
            raise InputError(f"Complex data not supported: {name} is a complex tensor")
        return values
    array = np.asarray(values)
    if array.dtype.kind == "c":
        raise InputError(f"Complex data not supported: {name} has dtype {array.dtype}")
    if array.dtype.kind not in "biuf":
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError) as err:  # TypeError, as numpy's own for a non-number
            raise TypeError(f"{name} must hold numbers, got dtype {array.dtype} ({oneline(err)})") from None
    return array


def _torch_dtype(dtype) -> torch.dtype:
    """``"float32"``, ``"float64"`` (or a torch dtype) -> the torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("float32", "float64"):
        raise InputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return getattr(torch, dtype)


def _not_fitted_error() -> Exception:
    """scikit-learn's NotFittedError where it is installed (the estimator contract names it), else one with the same
    bases; either way a bug in the caller, not bad input."""
    message = "this RidgeCV is not fitted yet; call fit first"
    try:
        from sklearn.exceptions import NotFittedError
    except ImportError:

        class NotFittedError(ValueError, AttributeError):
            pass

    return NotFittedError(message)
