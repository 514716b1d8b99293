#!/usr/bin/env python
"""Benchmark brainldm's RidgeCV against himalaya's RidgeCV (torch backend) and scikit-learn's RidgeCV.

Default problem (the issue's): n=3000 samples, p=1000 features, T=2000 targets, 8 alphas, 5 folds, on the CPU,
plus held-out correlation on 500 new samples. --full-scale times NSD-sized fits on the GPU instead
(27,750 trials x 6,000 voxels -> 6,400 and -> 59,136 targets) and reports seconds and peak GPU memory.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def make_problem(n: int, p: int, t: int, n_test: int = 500, seed: int = 0):
    """A linear problem with structure like fMRI decoding: low-rank signal, repeated stimuli (groups of 3)."""
    rng = np.random.default_rng(seed)
    n_images = -(-n // 3)
    latent = rng.standard_normal((n_images + n_test, 50)).astype(np.float32)
    mixing = rng.standard_normal((50, p)).astype(np.float32) / np.sqrt(50)
    readout = rng.standard_normal((50, t)).astype(np.float32) / np.sqrt(50)
    groups = np.repeat(np.arange(n_images), 3)[:n]
    X = latent[groups] @ mixing + rng.standard_normal((n, p)).astype(np.float32) * 2.0
    Y = latent[groups] @ readout + rng.standard_normal((n, t)).astype(np.float32)
    X_test = latent[n_images:] @ mixing + rng.standard_normal((n_test, p)).astype(np.float32) * 2.0
    Y_test = latent[n_images:] @ readout
    return X, Y, groups, X_test, Y_test


def mean_r(Y_true: np.ndarray, Y_pred: np.ndarray) -> float:
    a = Y_true - Y_true.mean(0)
    b = Y_pred - Y_pred.mean(0)
    return float(np.mean((a * b).sum(0) / np.sqrt((a**2).sum(0) * (b**2).sum(0))))


def cpu_comparison(n: int, p: int, t: int, alphas: np.ndarray, cv: int, repeats: int) -> None:
    import torch

    from brainldm.decoding.ridge import RidgeCV

    X, Y, groups, X_test, Y_test = make_problem(n, p, t)
    print(f"CPU ({torch.get_num_threads()} threads), n={n}, p={p}, T={t}, {len(alphas)} alphas, {cv} folds")
    rows = []

    def timed(name, fit, predict):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model = fit()
            times.append(time.perf_counter() - start)
        rows.append((name, min(times), mean_r(Y_test, np.asarray(predict(model, X_test)))))

    timed(
        "brainldm RidgeCV (torch, grouped 5-fold)",
        lambda: RidgeCV(alphas=alphas, cv=cv, device="cpu").fit(X, Y, groups=groups),
        lambda m, x: m.predict(x),
    )

    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV as HimalayaRidgeCV

    backend = set_backend("torch", on_error="raise")
    timed(
        "himalaya RidgeCV (torch backend, 5-fold)",
        lambda: HimalayaRidgeCV(alphas=alphas, cv=cv, fit_intercept=True).fit(X, Y),
        lambda m, x: backend.to_numpy(m.predict(x)),
    )

    from sklearn.linear_model import RidgeCV as SklearnRidgeCV

    timed(
        "scikit-learn RidgeCV (efficient LOO, alpha per target)",
        lambda: SklearnRidgeCV(alphas=alphas, alpha_per_target=True).fit(X, Y),
        lambda m, x: m.predict(x),
    )
    ours = rows[0][1]
    print(f"| solver | fit seconds (best of {repeats}) | speed-up of brainldm | held-out mean r |")
    print("|---|---|---|---|")
    for name, seconds, r in rows:
        print(f"| {name} | {seconds:.2f} | {seconds / ours:.1f}x | {r:.4f} |")


def gpu_full_scale(alphas: np.ndarray, cv: int, targets: list[int], n: int, p: int) -> None:
    import torch

    from brainldm.decoding.ridge import RidgeCV

    print(
        f"GPU {torch.cuda.get_device_name()}: n={n} trials x p={p} voxels, {len(alphas)} alphas, {cv} folds, "
        "fp32 (TF32 for the CV matmuls)"
    )
    print("| targets | fit seconds | peak GPU memory (GB) |")
    print("|---|---|---|")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, p), dtype=np.float32)
    groups = np.repeat(np.arange(-(-n // 3)), 3)[:n]
    for t in targets:
        Y = rng.standard_normal((n, t), dtype=np.float32)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        RidgeCV(alphas=alphas, cv=cv, device="cuda").fit(X, Y, groups=groups)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        print(f"| {t} | {seconds:.1f} | {torch.cuda.max_memory_allocated() / 1e9:.2f} |")
        del Y


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--p", type=int, default=1000)
    parser.add_argument("--targets", type=int, default=2000)
    parser.add_argument("--n-alphas", type=int, default=8)
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-scale", action="store_true", help="NSD-scale fits on the GPU instead")
    parser.add_argument("--full-targets", default="6400,59136", help="target counts for --full-scale")
    args = parser.parse_args(argv)
    alphas = np.logspace(-1, 6, args.n_alphas)
    if args.full_scale:
        gpu_full_scale(alphas, args.cv, [int(t) for t in args.full_targets.split(",")], n=27750, p=6000)
    else:
        cpu_comparison(args.n, args.p, args.targets, alphas, args.cv, args.repeats)


if __name__ == "__main__":
    main()
