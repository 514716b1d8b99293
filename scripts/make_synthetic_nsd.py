#!/usr/bin/env python
"""Write a synthetic NSD tree (real NSD formats and paths, planted responses) for the offline pipeline."""

from __future__ import annotations

import argparse
import time

from brainldm import cli


@cli.script
def main(argv: list[str] | None = None) -> None:
    from brainldm.offline.synthetic import OFFLINE_SNR

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=cli.output_folder, required=True, help="NSD root folder to write")
    parser.add_argument(
        "--subjects",
        type=cli.names([str(s) for s in range(1, 9)]),
        default="1",
        help="comma-separated subjects, e.g. 1,2 (default: 1)",
    )
    parser.add_argument("--sessions", type=cli.positive, default=3, help="sessions per subject (default: 3)")
    parser.add_argument("--trials-per-session", type=cli.positive, default=30, help="trials per session (default: 30)")
    parser.add_argument("--shared", type=cli.positive, default=6, help="images shared by all subjects (default: 6)")
    parser.add_argument(
        "--grid", type=cli.numbers(3), default="12,14,10", help="betas grid X,Y,Z of the blob brain (default: 12,14,10)"
    )
    parser.add_argument(
        "--anatomy",
        choices=("blob", "S1"),
        default="blob",
        help="blob: a small ellipsoid brain (fast); S1: pycortex's demo subject, its cortex and ROIs (for flatmaps)",
    )
    parser.add_argument(
        "--image-size",
        type=cli.integer(8),
        default=128,
        help="stimulus size in pixels (default: 128, toy's output size)",
    )
    parser.add_argument(
        "--snr",
        type=cli.number(0.0, above=True),
        default=OFFLINE_SNR,
        help=f"planted signal-to-noise variance ratio (default: {OFFLINE_SNR}, about as hard as NSD)",
    )
    parser.add_argument("--hdf5", action="store_true", help="also write the .hdf5 twin of each betas file")
    parser.add_argument("--seed", type=cli.integer(0, 2**32 - 1), default=0)
    args = parser.parse_args(argv)

    from brainldm.offline.synthetic import write_nsd_tree

    start = time.perf_counter()
    tree = write_nsd_tree(
        args.out,
        subjects=[int(s) for s in args.subjects],
        n_sessions=args.sessions,
        trials_per_session=args.trials_per_session,
        n_shared=args.shared,
        grid_shape=tuple(int(n) for n in args.grid),
        image_size=args.image_size,
        snr=args.snr,
        write_hdf5=args.hdf5,
        seed=args.seed,
        anatomy=args.anatomy,
    )
    print(
        f"wrote a synthetic NSD tree to {tree.root} ({len(tree.subjects)} subject(s), {tree.n_sessions} sessions "
        f"x {tree.trials_per_session} trials, {tree.n_images} images) in {time.perf_counter() - start:.1f} s; COCO's "
        f"captions apart, as COCO ships them: {tree.coco_archive} (pass it to prepare_nsd.py --coco-annotations)"
    )


if __name__ == "__main__":
    main()
