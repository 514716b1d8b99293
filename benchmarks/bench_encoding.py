#!/usr/bin/env python
"""Benchmark one encoding feature space: brainldm (PCA + RidgeCV, torch) against himalaya's RidgeCV, same problem.

Default (CPU, reduced): 3,000 trials, 1,000 training images x 6,400-dim features -> PCA 1,000, 5,000 voxels.
--full-scale (GPU): 27,750 trials, 9,250 images x 6,400 features -> PCA 6,400, 100,000 voxels, brainldm only.
Times include the PCA fit, the ridge fit with alpha per voxel by 5-fold CV, prediction and test r.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def make_problem(n_trials: int, n_features: int, n_voxels: int, n_test: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_images = n_trials // 3
    latent = rng.standard_normal((n_images + n_test, 64), dtype=np.float32)
    features = latent @ rng.standard_normal((64, n_features), dtype=np.float32)
    features += rng.standard_normal(features.shape, dtype=np.float32)
    weights = rng.standard_normal((64, n_voxels), dtype=np.float32) / 8
    ids = np.repeat(np.arange(n_images), 3)
    betas = latent[ids] @ weights + rng.standard_normal((n_trials, n_voxels), dtype=np.float32)
    test_betas = latent[n_images:] @ weights + rng.standard_normal((n_test, n_voxels), dtype=np.float32) / 1.7
    return features[:n_images], betas, ids, features[n_images:], test_betas


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3000)
    parser.add_argument("--features", type=int, default=6400)
    parser.add_argument("--components", type=int, default=1000)
    parser.add_argument("--voxels", type=int, default=5000)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--full-scale", action="store_true", help="27,750 trials -> 100,000 voxels on the GPU")
    parser.add_argument("--no-himalaya", action="store_true")
    args = parser.parse_args(argv)
    if args.full_scale:
        args.trials, args.components, args.voxels, args.test, args.no_himalaya = 27750, 6400, 100_000, 982, True

    import torch

    from brainldm.analysis.encoding import fit_encoding, pca_scores
    from brainldm.data.nsd import STREAMS as NSD_STREAMS
    from brainldm.metrics import dimension_correlation
    from brainldm.presets import TAKAGI2023

    device = "cuda" if torch.cuda.is_available() else "cpu"
    alphas = np.logspace(-1, 6, 8)
    train_f, train_b, ids, test_f, test_b = make_problem(args.trials, args.features, args.voxels, args.test)
    streams = np.zeros(args.voxels, dtype=int)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"{where}: {args.trials} trials, {args.features} features -> PCA {args.components}, {args.voxels} voxels, "
        f"{len(alphas)} alphas, {TAKAGI2023.cv_folds} folds"
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    ours = fit_encoding(
        [(train_f, test_f)],
        train_b,
        ids,
        test_b,
        streams,
        NSD_STREAMS,
        n_components=args.components,
        alphas=alphas,
        device=device,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB" if device == "cuda" else ""
    print(f"| brainldm (PCA + RidgeCV, {device}) | {seconds:.1f} s | mean test r {ours.r.mean():.4f}{peak} |")

    if not args.no_himalaya:
        from himalaya.backend import set_backend
        from himalaya.ridge import RidgeCV as HimalayaRidgeCV

        backend = set_backend("torch", on_error="raise")
        start = time.perf_counter()
        train_scores, test_scores = pca_scores([(train_f, test_f)], args.components, "cpu")  # the same PCA step
        model = HimalayaRidgeCV(alphas=alphas, cv=5, fit_intercept=True).fit(
            train_scores[ids],
            train_b,  # one row per trial, as himalaya takes them
        )
        prediction = backend.to_numpy(model.predict(test_scores))
        r = dimension_correlation(prediction, test_b)
        himalaya_seconds = time.perf_counter() - start
        print(f"| himalaya RidgeCV (torch backend, CPU) | {himalaya_seconds:.1f} s | mean test r {r.mean():.4f} |")
        print(f"brainldm is {himalaya_seconds / seconds:.1f}x faster")


if __name__ == "__main__":
    main()
