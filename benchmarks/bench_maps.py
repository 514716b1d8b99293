#!/usr/bin/env python
"""Benchmark compact subject maps: map size vs held-out decoding correlation (dense fp32, fp16, low rank).

A c-like decoding problem (default on GPU: 27,750 trials, 7,000 voxels -> 59,136 targets = 77 x 768) with a
power-law spectrum of shared latent structure, fitted once by ridge; each compact form is then scored on
held-out trials: mean r per target dimension and mean r per item pattern, relative to the dense fp32 map.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def make_problem(n: int, p: int, t: int, n_latent: int, n_test: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_images = -(-n // 3)
    scale = (1.0 + np.arange(n_latent)) ** -0.5  # a decaying spectrum, like image/text embeddings
    latent = (rng.standard_normal((n_images + n_test, n_latent)) * scale).astype(np.float32)
    groups = np.repeat(np.arange(n_images), 3)[:n]
    mixing = rng.standard_normal((n_latent, p), dtype=np.float32)
    readout = rng.standard_normal((n_latent, t), dtype=np.float32)
    X = latent[groups] @ mixing + 3.0 * rng.standard_normal((n, p), dtype=np.float32)
    Y = latent[groups] @ readout + 1.0 * rng.standard_normal((n, t), dtype=np.float32)
    X_test = latent[n_images:] @ mixing + 3.0 * rng.standard_normal((n_test, p), dtype=np.float32)
    Y_test = latent[n_images:] @ readout
    return X, Y, groups, X_test, Y_test


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=27750)
    parser.add_argument("--p", type=int, default=7000)
    parser.add_argument("--targets", type=int, default=59136)
    parser.add_argument("--latent", type=int, default=2000, help="dimension of the shared latent structure")
    parser.add_argument("--test", type=int, default=982)
    parser.add_argument("--ranks", default="256,512,1024,2048")
    parser.add_argument("--alpha", type=float, default=1e4, help="ridge penalty (fixed: the comparison is of forms)")
    parser.add_argument("--device", help="default: cuda when available")
    args = parser.parse_args(argv)

    import torch

    from brainldm.decoding.ridge import reduced_rank, solve_ridge
    from brainldm.metrics import dimension_correlation, pattern_correlation

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    X, Y, groups, X_test, Y_test = make_problem(args.n, args.p, args.targets, args.latent, args.test)
    mean, std = X.mean(0), X.std(0)
    X, X_test = (X - mean) / std, (X_test - mean) / std
    start = time.perf_counter()
    X_t = torch.from_numpy(X).to(device)
    coef, intercept = solve_ridge(X_t, Y, torch.full((args.targets,), args.alpha, device=device))
    print(f"{device}: n={args.n}, p={args.p}, T={args.targets}; ridge fit {time.perf_counter() - start:.0f} s")
    del Y
    X_t -= X_t.mean(0)
    gram = X_t.T @ X_t
    X_test_t = torch.from_numpy(X_test).to(device)
    W, b = coef.to(device), intercept.to(device)

    def score(predict) -> tuple[float, float]:
        pred = predict(X_test_t).cpu().numpy()
        return float(np.mean(dimension_correlation(pred, Y_test))), float(np.mean(pattern_correlation(pred, Y_test)))

    base = score(lambda x: x @ W + b)
    rows = [
        ("dense fp32", W.numel() * 4, base),
        ("dense fp16", W.numel() * 2, score(lambda x: x @ W.half().float() + b)),
    ]
    for rank in (int(r) for r in args.ranks.split(",")):
        A, B = reduced_rank(W, gram, rank)
        size = (A.numel() + B.numel()) * 2
        Ah, Bh = A.half().float(), B.half().float()
        rows.append((f"rank {rank} fp16", size, score(lambda x, Ah=Ah, Bh=Bh: (x @ Ah) @ Bh + b)))
    print("| form | size (MB) | mean r per dimension | change | mean r per item | change |")
    print("|---|---|---|---|---|---|")
    for name, size, (r_dim, r_item) in rows:
        print(
            f"| {name} | {size / 1e6:.0f} | {r_dim:.4f} | {100 * (r_dim / base[0] - 1):+.2f}% | {r_item:.4f} | "
            f"{100 * (r_item / base[1] - 1):+.2f}% |"
        )


if __name__ == "__main__":
    main()
