"""Fitting a subject's maps: ridge from training betas to each target's features, block-wise, with the
rescaling statistics and each test image's decoding scores (:func:`fit_subject_maps`, the job behind
``scripts/fit_maps.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from brainldm.data.features import AUXILIARY, FeatureStore
from brainldm.data.trials import load_trials, load_voxels
from brainldm.decoding.maps import STORAGE_DTYPES, LinearMap, MapsConfig, SubjectMaps, TargetConfig, voxel_fingerprint
from brainldm.decoding.ridge import (
    RankReduction,
    RidgeCV,
    TrialSpaceRidge,
    make_folds,
    ridge_cv_scores,
    solve_ridge,
    symmetric_sqrt,
)
from brainldm.metrics import dimension_correlation, identification, pattern_correlation
from brainldm.presets import TAKAGI2023
from brainldm.torch_utils import default_device
from brainldm.validation import InputError, check_finite


def fit_linear_map(
    betas: np.ndarray,
    targets: np.ndarray | Callable[[], Iterator[np.ndarray]],
    voxels: np.ndarray,
    ijk: np.ndarray,
    groups: np.ndarray,
    alphas=TAKAGI2023.alphas,
    cv: int = TAKAGI2023.cv_folds,
    rank: int | None = None,
    device: str | torch.device | None = None,
) -> tuple[LinearMap, float]:
    """Standardise ``betas[:, voxels]`` (n, k) on their training statistics, then RidgeCV to the targets -> the map
    and its CV r (each target's best, averaged).

    ``targets``: (n, T), or a function that returns an iterator over blocks of its columns in order ((n, width)
    arrays; called twice for a reduced-rank map), so that targets of any width (DPT's 2.4 million values per image)
    are fitted a block at a time: each target's ridge is its own. With ``rank`` below k and T, the map is stored as
    the rank-r product closest to the ridge map in training predictions
    (:class:`~brainldm.decoding.ridge.RankReduction`, from the blocks without holding the dense map; in the trials'
    space when there are fewer trials than voxels). The map keeps the training targets' mean and std and the
    out-of-fold predictions' (from the cross-validated fit, so no test data), from which :meth:`LinearMap.rescale`
    undoes ridge's shrinkage."""
    x = np.ascontiguousarray(betas[:, voxels], dtype=np.float32)
    check_finite("betas", x)
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    x = (x - mean) / std
    blocks = targets if callable(targets) else lambda: iter([targets])
    if rank is not None and (rank >= x.shape[1] or (not callable(targets) and rank >= targets.shape[1])):
        rank = None  # a rank-r map of k voxels to T targets is the dense one when r >= min(k, T)
    compute = default_device(device)
    common = dict(voxels=torch.as_tensor(voxels, dtype=torch.int64), ijk=torch.as_tensor(ijk, dtype=torch.int32),
                  mean=torch.from_numpy(mean), std=torch.from_numpy(std))  # fmt: skip
    if rank is not None and len(x) <= x.shape[1]:
        return _reduced_rank_in_trial_space(x, blocks, groups, alphas, cv, rank, compute, common)
    reduction = None
    if rank is not None:
        x_t = torch.from_numpy(x).to(compute)
        centred = x_t - x_t.mean(0)  # the ridge fit centres X; so does the Gram of the predictions it must preserve
        sqrt_gram = symmetric_sqrt(centred.T @ centred)
        reduction = RankReduction(rank)
    fitted: dict[str, list[torch.Tensor]] = {}
    for y in blocks():
        ridge = RidgeCV(alphas=alphas, cv=cv, device=device).fit(x, y, groups=groups)
        parts = dict(
            intercept=ridge.intercept_.float(),
            best_alphas=ridge.best_alphas_.float(),
            **dict(zip(("target_mean", "target_std"), column_moments(y))),
            prediction_mean=ridge.cv_prediction_mean_.float(),
            prediction_std=ridge.cv_prediction_std_.float(),
            cv_r=ridge.cv_scores_.max(0).values.float(),
        )
        if reduction is None:
            parts["weight"] = ridge.coef_.float()
        else:
            reduction.add(sqrt_gram @ ridge.coef_.to(compute, sqrt_gram.dtype))
        for key, value in parts.items():
            fitted.setdefault(key, []).append(value)
    joined = {key: torch.cat(values, dim=-1) for key, values in fitted.items()}
    cv_r = float(joined.pop("cv_r").mean())
    common.update(joined)
    if reduction is None:
        return LinearMap(**common), cv_r
    done = 0  # pass 2: each block's weights solved again at its chosen alphas
    for y in blocks():
        weight = solve_ridge(x_t, y, common["best_alphas"][done : done + y.shape[1]].to(compute))[0].to(compute)
        reduction.factor(weight, sqrt_gram @ weight)
        done += y.shape[1]
    left, right = reduction.factors()
    return LinearMap(left=left.cpu(), right=right, **common), cv_r


def _reduced_rank_in_trial_space(x, blocks, groups, alphas, cv, rank, compute, common) -> tuple[LinearMap, float]:
    """:func:`fit_linear_map`'s reduced-rank map when there are fewer trials n than voxels k, without any k x T weights:
    :class:`~brainldm.decoding.ridge.TrialSpaceRidge` solves each block, and the predictions X W (n x T, like the
    targets) are the :class:`~brainldm.decoding.ridge.RankReduction`'s images, so its eigenproblem is n x n. The same
    map as the k x k path's, at a fraction of the work (the follow-up's DPT targets: 2.4 million per picture).
    """
    x_t = torch.from_numpy(x).to(compute)
    trial_space = TrialSpaceRidge(x_t)
    alphas_t = torch.as_tensor(np.asarray(alphas, dtype=np.float32), device=compute)
    folds = make_folds(len(x), cv, groups)

    def as_tensor(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)).to(compute)

    fitted: dict[str, list[torch.Tensor]] = {}
    reduction = RankReduction(rank)
    for y in blocks():
        check_finite("targets", y)
        scores, prediction_mean, prediction_std = ridge_cv_scores(x_t, y, alphas_t, folds, prediction_moments=True)
        best = scores.argmax(0)
        columns = torch.arange(scores.shape[1], device=scores.device)
        _, predictions, intercept = trial_space.solve(as_tensor(y), alphas_t[best])
        reduction.add(predictions)
        parts = dict(
            intercept=intercept.cpu(),
            best_alphas=alphas_t[best].cpu(),
            **dict(zip(("target_mean", "target_std"), column_moments(y))),
            prediction_mean=prediction_mean[best, columns].cpu(),
            prediction_std=prediction_std[best, columns].cpu(),
            cv_r=scores.max(0).values.cpu(),
        )
        for key, value in parts.items():
            fitted.setdefault(key, []).append(value)
    joined = {key: torch.cat(values, dim=-1) for key, values in fitted.items()}
    cv_r = float(joined.pop("cv_r").mean())
    done = 0
    for y in blocks():
        d, predictions, _ = trial_space.solve(as_tensor(y), joined["best_alphas"][done : done + y.shape[1]].to(compute))
        reduction.factor(d, predictions)
        done += y.shape[1]
    dual, right = reduction.factors()
    return LinearMap(left=trial_space.left(dual).cpu(), right=right, **common, **joined), cv_r


def block_values(n_images: int, n_voxels: int, budget: int = 2**28) -> int:
    """How many target values to read per block so that a block of targets (n_images x width) and its ridge weights
    (n_voxels x width) each hold at most ``budget`` values (1 GiB of float32). Sizing by the images alone let a
    subject with few trials and many voxels fit DPT's 2.4 million targets in one block: 16,188 x 2.4M weights, 150 GB.
    """
    return max(1, budget * n_images // max(n_images, n_voxels))


def column_moments(values: np.ndarray, block: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each column of ``values`` (n, T) -> (T,), (T,) float32, a block of columns at
    a time (NSD's c targets are GBs; their centred copy need not be)."""
    mean, std = np.empty(values.shape[1], np.float32), np.empty(values.shape[1], np.float32)
    for start in range(0, values.shape[1], block):
        columns = np.asarray(values[:, start : start + block], dtype=np.float64)
        mean[start : start + block], std[start : start + block] = columns.mean(0), columns.std(0)
    return torch.from_numpy(mean), torch.from_numpy(std)


def fit_subject_maps(
    data: str | Path,
    features: str | Path,
    subject: int,
    decoders: tuple[tuple[str, str], ...] = TAKAGI2023.decoders,
    alphas=TAKAGI2023.alphas,
    cv: int = TAKAGI2023.cv_folds,
    ranks: dict[str, int] | None = None,
    storage_dtype: str = "float32",
    model_id: str | None = None,
    device: str | torch.device | None = None,
) -> SubjectMaps:
    """Fit one map per (target, ROI) in ``decoders`` on the train split; score each on the test split.

    Args:
        data: the prepared trials dataset (local folder or Hub repo id).
        features: the feature folder written by ``scripts/extract_features.py`` (one store per target).
        decoders: (target, ROI) pairs; the paper's are z from ``early`` and c from ``ventral`` voxels.
        ranks: {target: rank} stores that map as a low-rank product (see :func:`fit_linear_map`); others stay dense,
            except ``blip`` and ``dpt``, which default to ``TAKAGI2023.followup_rank`` (pass None for a dense map).
        storage_dtype: ``float32`` or ``float16`` for the saved weights.
        model_id: the LDM the features came from (default: read from the feature store).
    """
    ranks = dict(ranks or {})
    if storage_dtype not in STORAGE_DTYPES:
        raise InputError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
    targets = [target for target, _ in decoders]
    twice = sorted({target for target in targets if targets.count(target) > 1})
    if twice:
        raise InputError(
            f"decoders name target {twice[0]!r} more than once ({', '.join(f'{t}={r}' for t, r in decoders)}); "
            "give each target one ROI"
        )
    decoders = dict(decoders)
    unknown = sorted(set(ranks) - set(decoders))
    if unknown:
        raise InputError(f"ranks given for {unknown}, which are not decoded targets ({sorted(decoders)})")
    for name, rank in ranks.items():
        if rank is not None and rank < 1:
            raise InputError(f"--{name}-rank must be >= 1 (or left out for a dense map), got {rank}")
    if cv < 2:
        raise InputError(f"cv must be >= 2 folds, got {cv}")
    voxels = load_voxels(data, subject)
    train = load_trials(data, subject, "train").select_columns(["nsd_id", "betas"]).with_format("numpy")
    test = load_trials(data, subject, "test").select_columns(["nsd_id", "betas"]).with_format("numpy")
    train_ids, test_ids = np.asarray(train["nsd_id"]), np.asarray(test["nsd_id"])
    train_betas, test_betas = np.asarray(train["betas"], dtype=np.float32), np.asarray(test["betas"], dtype=np.float32)
    stores = {name: FeatureStore(features, name) for name in decoders}
    models = {name: store.config.get("model_id") for name, store in stores.items() if name not in AUXILIARY}
    if len(set(models.values())) > 1:
        said = " but ".join(f"the {name} features from {model!r}" for name, model in models.items())
        raise InputError(
            f"in {features}, {said}; extract them all with one model (scripts/extract_features.py --model)"
        )

    fitted, targets, scores = {}, {}, {}
    for name, roi in decoders.items():
        store = stores[name]
        shape = store.feature_shape
        selection = voxels.roi(roi)
        if len(selection) == 0:
            raise InputError(f"subject {subject} has no {roi} voxels in its voxel table")
        n_dims = int(np.prod(shape))
        limit = min(len(selection), n_dims)
        rank = ranks.get(name)  # None: dense
        if rank is not None and rank > limit:
            raise InputError(
                f"--ranks {name}={rank} is above what the {name} map can hold: it maps {len(selection)} {roi} voxels "
                f"to {n_dims} dimensions, so its rank is at most {limit}"
            )
        if name not in ranks and name in AUXILIARY and TAKAGI2023.followup_rank < limit:
            rank = TAKAGI2023.followup_rank  # the follow-up pipeline's wide targets: reduced rank unless told otherwise
        # blocks of targets sized so that their ridge weights fit too, where weights are formed (the trial-space
        # path of a reduced-rank map with fewer trials than voxels forms none)
        weights_formed = rank is None or len(train_ids) > len(selection)
        budget = block_values(len(train_ids), len(selection) if weights_formed else 0)

        def blocks(store=store, budget=budget):
            return (block for (block,) in store.blocks(train_ids, max_values=budget))

        fitted[name], cv_r = fit_linear_map(
            train_betas, blocks, selection,
            voxels.ijk[selection], train_ids, alphas=alphas, cv=cv, rank=rank, device=device,
        )  # fmt: skip
        spread = {
            "target_std": float(fitted[name].target_std.square().mean().sqrt()),
            "prediction_std": float(fitted[name].prediction_std.square().mean().sqrt()),
        }
        source = store.config.get("model_id") if name in AUXILIARY else None
        targets[name] = TargetConfig(
            roi, tuple(shape), len(selection), fitted[name].rank, spread, source, store.config.get("preprocessing")
        )
        scores[name] = {"cv_r": cv_r}
    config = MapsConfig(
        subject=int(subject),
        model_id=model_id or next(iter(models.values()), None),
        data=None if Path(data).exists() else str(data),  # a Hub id is public; a local path is not
        n_voxels=len(voxels),
        voxel_fingerprint=voxel_fingerprint(voxels),
        targets=targets,
        alphas=tuple(float(a) for a in alphas),
        cv=cv,
        n_train=len(train_ids),
        n_test=len(test_ids),
        storage_dtype=storage_dtype,
        scores=scores,
    )
    maps = SubjectMaps(fitted, config)
    if len(test_ids) >= 2:
        per_image = {"nsd_id": test_ids.astype(np.int64)}
        for name, pred in maps.predict(test_betas, voxels=voxels).items():
            means, images = decoding_scores(pred.numpy(), stores[name].load(test_ids))
            scores[name].update(means)
            per_image.update({f"{name}.{key}": values for key, values in images.items()})
        maps = SubjectMaps(fitted, replace(config, scores=scores), per_image)
    return maps


def decoding_scores(pred: np.ndarray, true: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """How well predicted features (n, ...) match the true ones: the means (per-dimension r, per-image pattern r,
    2-way identification) and each image's pattern r and identification rank (``r``, ``rank``)."""
    pattern = pattern_correlation(pred, true)
    two_way, rank = identification(pred, true)  # one correlation matrix for both
    means = {
        "dimension_r": float(np.mean(dimension_correlation(pred, true))),
        "pattern_r": float(np.mean(pattern)),
        "identification": float(np.mean(two_way)),
    }
    return means, {"r": pattern.astype(np.float32), "rank": rank.astype(np.int32)}
