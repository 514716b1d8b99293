#!/usr/bin/env python
"""Benchmark scripts/prepare_nsd.py at NSD's full size: peak RSS and wall time for one subject.

Writes (or reuses) a synthetic NSD tree of real size: 40 sessions x 750 trials, an 81 x 104 x 83 grid, ~16k stored
voxels, gzipped int16 NIfTI betas; then prepares subject 1 in a child process and reports the child's peak RSS.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path


def _prepare(tree: str, out: str) -> None:
    from brainldm.data.trials import prepare_subject
    from brainldm.offline.synthetic import COCO_PATH, default_coco_root

    prepare_subject(tree, 1, out, overwrite=True, coco_annotations=default_coco_root(tree) / COCO_PATH)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", help="synthetic NSD root to use or create (default: a temp folder)")
    parser.add_argument("--out", help="dataset folder (default: a temp folder)")
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--trials-per-session", type=int, default=750)
    parser.add_argument("--grid", default="81,104,83", help="X,Y,Z (subj01: 81,104,83)")
    parser.add_argument("--cortex-thickness", type=float, default=0.032, help="ROI shell depth (0.032 -> ~16k voxels)")
    parser.add_argument("--image-size", type=int, default=32, help="stimulus size (small: images are not measured)")
    args = parser.parse_args(argv)

    from brainldm.data import nsd
    from brainldm.offline.synthetic import write_nsd_tree

    tree = Path(args.tree or tempfile.mkdtemp(prefix="bench-nsd-"))
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-trials-"))
    if not nsd.betas_path(tree, 1, args.sessions).exists():
        start = time.perf_counter()
        write_nsd_tree(
            tree,
            subjects=(1,),
            n_sessions=args.sessions,
            trials_per_session=args.trials_per_session,
            n_shared=1000,
            grid_shape=tuple(int(n) for n in args.grid.split(",")),
            image_size=args.image_size,
            cortex_thickness=args.cortex_thickness,
            features="random",
        )
        print(f"wrote the synthetic tree to {tree} in {time.perf_counter() - start:.0f} s")

    start = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(target=_prepare, args=(str(tree), str(out)))
    child.start()
    child.join()
    wall = time.perf_counter() - start
    if child.exitcode != 0:
        raise SystemExit(f"prepare failed with exit code {child.exitcode}")
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux

    from brainldm.data.trials import load_trials, load_voxels

    n_train, n_test = len(load_trials(out, 1, "train")), len(load_trials(out, 1, "test"))
    print(
        f"prepare_nsd: {args.sessions} sessions x {args.trials_per_session} trials, grid {args.grid}, "
        f"{len(load_voxels(out, 1))} stored voxels -> {n_train} train + {n_test} test rows\n"
        f"  wall time {wall:.0f} s, peak RSS {peak_gb:.2f} GB (target <= 4 GB)"
    )


if __name__ == "__main__":
    main()
