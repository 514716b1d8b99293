#!/usr/bin/env python
"""Your own experiment -> trials dataset: the same dataset prepare_nsd.py makes from NSD, from a JSON manifest.

The manifest names, relative to itself: the betas (one 4D NIfTI per session, or one .npy of trials x X x Y x Z),
a trials list (the image file each trial showed, one line per trial), the images folder, a captions JSON
({"image file": ["a caption", ...]}), ROI masks in the betas grid ({"early": "...", "ventral": "..."}) and a test
list (image files, one per line). See brainldm.data.readers.ExperimentReader for the format. Then run
extract_features.py, fit_maps.py (--decoders to pick other ROI names) and reconstruct.py on OUT as for NSD.
"""

from __future__ import annotations

import argparse

from brainldm import cli


@cli.script
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="the experiment's JSON manifest")
    parser.add_argument(
        "--out", type=cli.output_folder, required=True, help="dataset folder; the subject lands in OUT/subjNN"
    )
    parser.add_argument("--no-zscore", action="store_true", help="keep the betas as they are (default: z-score "
                        "each voxel within each session)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="rebuild OUT/subjNN if it exists")
    args = parser.parse_args(argv)

    from brainldm.data.readers import ExperimentReader
    from brainldm.data.trials import prepare

    reader = ExperimentReader(args.manifest)
    folder = prepare(reader, args.out, zscore=not args.no_zscore, overwrite=args.overwrite)
    rois = ", ".join(f"{name} {len(reader.voxels.roi(name))}" for name in reader.voxels.roi_names.values()
                     if name != "unknown")  # fmt: skip
    print(f"wrote {folder}: {len(reader.trial_stimuli)} trials, {len(reader.voxels)} voxels ({rois})")


if __name__ == "__main__":
    main()
