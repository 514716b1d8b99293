#!/usr/bin/env python
"""Import an NSD subject into pycortex's database once, so encoding.py --flatmaps can draw its flatmaps.

Reads NSD's FreeSurfer folder (nsddata/freesurfer/subjNN, with its `full` flat patches) and the func1pt8mm grid
(the subject's nsdgeneral ROI file), and saves pycortex subject `subjNN` with the transform
`func1pt8_to_anat0pt8_autoFSbbr`. Needs pycortex: pip install "brainldm[cortex]". --nsd-root may be NSD's bucket
s3://natural-scenes-dataset: then only the subject's FreeSurfer files that pycortex reads are fetched.
"""

from __future__ import annotations

import argparse

from brainldm import cli


@cli.script
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--nsd-root",
        required=True,
        help="NSD root: a folder (holds nsddata/) or a URL such as s3://natural-scenes-dataset",
    )
    parser.add_argument("--cache-dir", help="where files fetched from a URL are kept (default: ~/.cache/brainldm)")
    parser.add_argument("--subject", type=cli.integer(1, 8), required=True, help="NSD subject, 1-8")
    parser.add_argument("--patch", default="full", help="FreeSurfer flat patch name (default: full)")
    args = parser.parse_args(argv)

    from brainldm.analysis.surfaces import import_nsd_subject

    space = import_nsd_subject(args.nsd_root, args.subject, args.patch, cache_dir=args.cache_dir)
    print(f"pycortex subject {space.subject} with transform {space.transform} is ready for flatmaps")


if __name__ == "__main__":
    main()
