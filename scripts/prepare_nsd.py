#!/usr/bin/env python
"""Prepare one NSD subject as a Hugging Face `datasets` dataset (train/test Parquet shards + voxel table).

Reads the raw NSD layout (betas, experiment design, stimuli, COCO captions, ROIs) one session at a time, resumes a
killed run, and optionally pushes the subject to a Hub dataset repo (one config per subject).
"""

from __future__ import annotations

import argparse

from brainldm import cli


@cli.script
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsd-root", required=True, help="NSD root folder (holds nsddata/, nsddata_betas/, ...)")
    parser.add_argument(
        "--subject", type=cli.integer(1, 8), required=True, help="NSD subject, 1-8 (the paper: 1, 2, 5, 7)"
    )
    parser.add_argument(
        "--out", type=cli.output_folder, required=True, help="dataset folder; the subject lands in OUT/subjNN"
    )
    parser.add_argument("--sessions", type=cli.positive, help="use the first K sessions (default: all)")
    parser.add_argument("--no-zscore", action="store_true", help="keep raw percent signal change")
    parser.add_argument("--overwrite", action="store_true", help="rebuild OUT/subjNN if it exists")
    parser.add_argument(
        "--whole-brain", action="store_true", help="store every in-brain voxel (OUT/subjNN-wholebrain), for encoding"
    )
    parser.add_argument("--push", metavar="REPO_ID", help="upload to this Hub dataset repo when done")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    args = parser.parse_args(argv)

    from brainldm.data import prepare_subject, push_to_hub

    folder = prepare_subject(
        args.nsd_root,
        args.subject,
        args.out,
        sessions=args.sessions,
        zscore=not args.no_zscore,
        overwrite=args.overwrite,
        whole_brain=args.whole_brain,
    )
    print(f"wrote {folder}")
    if args.push:
        url = push_to_hub(args.out, args.subject, args.push, private=args.private, whole_brain=args.whole_brain)
        print(f"pushed to {url}")


if __name__ == "__main__":
    main()
