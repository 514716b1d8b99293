#!/usr/bin/env python
"""Prepare one NSD subject as a Hugging Face `datasets` dataset (train/test Parquet shards + voxel table).

Reads the raw NSD layout (betas, experiment design, stimuli, ROIs) one session at a time, and the pictures' COCO
captions, resumes a killed run, and optionally pushes the subject to a Hub dataset repo (one config per subject).

--nsd-root is a local NSD folder, or NSD's public bucket s3://natural-scenes-dataset (or any fsspec URL): then only
what the subject needs is fetched (its voxels' bytes of each session's HDF5 betas, the pictures it saw, the small
files), read anonymously unless AWS credentials are configured, and kept in --cache-dir.

COCO's captions are not in NSD's bucket: they come from COCO's own annotations archive (--coco-annotations; by default
the JSONs where nsd_access unpacks them in a local NSD root, else COCO's site, from which only the two caption
members' bytes are fetched, once). You must agree to NSD's terms of use (https://naturalscenesdataset.org) before
using its data.
"""

from __future__ import annotations

import argparse

from brainldm import cli
from brainldm.cards import NSD_CLAUSE_3
from brainldm.data.coco import ARCHIVE_NAME, COCO_ANNOTATIONS_URL, NSD_ANNOTATIONS


def sessions_argument(text: str) -> int | list[int]:
    """An argparse type: K (the first K sessions) or a comma-separated list of session numbers."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or a list such as 1,2,5, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sessions are numbered from 1, got {text!r}")
    return values[0] if "," not in text else values


@cli.script
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--nsd-root",
        required=True,
        help="NSD root: a folder (holds nsddata/, nsddata_betas/, ...) or a URL such as s3://natural-scenes-dataset",
    )
    parser.add_argument(
        "--subject", type=cli.integer(1, 8), required=True, help="NSD subject, 1-8 (the paper: 1, 2, 5, 7)"
    )
    parser.add_argument(
        "--out", type=cli.output_folder, required=True, help="dataset folder; the subject lands in OUT/subjNN"
    )
    parser.add_argument(
        "--sessions",
        type=sessions_argument,
        help="use the first K sessions (e.g. 37, as the paper), or the sessions listed (e.g. 1,2,5); default: all",
    )
    parser.add_argument("--no-zscore", action="store_true", help="keep raw percent signal change")
    parser.add_argument("--overwrite", action="store_true", help="rebuild OUT/subjNN if it exists")
    parser.add_argument(
        "--whole-brain", action="store_true", help="store every in-brain voxel (OUT/subjNN-wholebrain), for encoding"
    )
    parser.add_argument(
        "--cache-dir", help="where files fetched from a URL are kept (default: $BRAINLDM_CACHE or ~/.cache/brainldm)"
    )
    parser.add_argument(
        "--coco-annotations",
        metavar="SOURCE",
        help="where COCO's captions come from: a folder holding captions_train2017.json and captions_val2017.json, a "
        f"local copy of {ARCHIVE_NAME}, or its URL (a mirror); default: NSD_ROOT/{NSD_ANNOTATIONS} if it holds them, "
        f"else {COCO_ANNOTATIONS_URL}",
    )
    parser.add_argument(
        "--push", metavar="REPO_ID", help="upload to this Hub dataset repo when done (created private: see --public)"
    )
    parser.add_argument(
        "--public",
        action="store_true",
        help="make the pushed repo public, gated behind a form on NSD's terms. NSD's Terms and Conditions (clause 3) "
        f'say: "{NSD_CLAUSE_3}" Use it only if your agreement with NSD allows it',
    )
    args = parser.parse_args(argv)

    from brainldm.data.coco import CocoCaptions
    from brainldm.data.storage import Storage
    from brainldm.data.trials import prepare_subject, push_to_hub

    nsd_root = Storage(args.nsd_root, cache_dir=args.cache_dir, progress=True)
    captions = CocoCaptions.for_nsd(nsd_root, args.coco_annotations, cache_dir=args.cache_dir, progress=True)
    folder = prepare_subject(
        nsd_root,
        args.subject,
        args.out,
        sessions=args.sessions,
        zscore=not args.no_zscore,
        overwrite=args.overwrite,
        whole_brain=args.whole_brain,
        coco_annotations=captions,
    )
    print(f"wrote {folder}")
    for source in (nsd_root, captions):
        if source.remote:
            print(f"fetched {cli.byte_size(source.bytes_fetched)} in {source.requests:,} requests from {source}")
    if not captions.remote:
        print(f"captions read from {captions}")
    if args.push:
        url = push_to_hub(args.out, args.subject, args.push, public=args.public, whole_brain=args.whole_brain)
        print(f"pushed to {url}")


if __name__ == "__main__":
    main()
