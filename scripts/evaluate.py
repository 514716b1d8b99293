#!/usr/bin/env python
"""Evaluate reconstructions with the standard metrics: PixCorr, SSIM, 2-way identification (AlexNet 2/5, Inception,
CLIP), EffNet-B1 and SwAV distance; per subject and averaged; plus Takagi's protocol (mean over samples).

Writes OUT/metrics.json, OUT/metrics.md (a table laid out like the published ones, with quoted reference rows)
and OUT/metrics.png. A metric whose network cannot be loaded (torchvision not installed: pip install -e ".[gpu]";
a checkpoint not cached offline) stops the run at once, saying what to install or to leave out with --metrics.
"""

from __future__ import annotations

import argparse

from brainldm import cli


@cli.script
def main(argv: list[str] | None = None) -> None:
    from brainldm.analysis.evaluate import FIRST_SESSIONS
    from brainldm.analysis.protocol import METRICS, PROTOCOLS
    from brainldm.ldm.reconstruct import KINDS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recon", required=True, help="output folder of scripts/reconstruct.py")
    parser.add_argument("--out", type=cli.output_folder, required=True, help="where the metrics go")
    parser.add_argument(
        "--metrics",
        type=cli.names(["all", *METRICS]),
        default="all",
        help=f"comma-separated from {','.join(METRICS)} (default: all)",
    )
    parser.add_argument(
        "--kinds",
        type=cli.names(list(KINDS)),
        help=f"which reconstructions to score, from {','.join(KINDS)} (default: every kind the trials hold); Xzt and "
        "Xztd come from the follow-up pipeline (decoded captions and depth)",
    )
    parser.add_argument("--features", help="feature folder with true z and c: adds brain/image retrieval top-1")
    parser.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default="mindeye2",
        help="mindeye2 (default): sample 0 of each image, as the tables the field compares; takagi: each metric "
        "averaged over the samples of each image (reconstruct with --samples 5)",
    )
    parser.add_argument(
        "--first-sessions",
        type=cli.positive,
        default=FIRST_SESSIONS,
        help="also score the images shown within the first N sessions, when the data run past them (default: "
        "%(default)s, NSD's 982-image test set of Takagi & Nishimoto and Brain-Diffuser; all 40 sessions give 1,000 "
        "images)",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from brainldm.analysis.evaluate import evaluate
    from brainldm.analysis.report import metrics_table, write_report

    names = list(METRICS) if "all" in args.metrics else args.metrics
    options = dict(features=args.features, protocol=args.protocol, first_sessions=args.first_sessions)
    results = evaluate(args.recon, names, args.kinds, device=args.device, **options)
    paths = write_report(results, args.out, names)
    print(metrics_table(results, names))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
