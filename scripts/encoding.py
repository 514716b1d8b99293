#!/usr/bin/env python
"""Voxel-wise encoding models from LDM features to whole-brain fMRI (the paper's second half).

Per feature space: PCA (<= 6,400 dims, fit on training images), ridge to every voxel (alpha per voxel, CV grouped
by image), test r, one-sided p against the Gaussian null, Benjamini-Hochberg FDR, per-ROI summaries. Writes r maps
(NIfTI), summary.json/csv and figures: an r map per feature, z vs c vs zc, and the noise / step / layer sweeps the
requested features allow, as volume slices and (--flatmaps) pycortex flatmaps. Needs the whole-brain dataset
(prepare_nsd.py --whole-brain) and the features (extract_features.py --features z,c,zc@0.2,...).
"""

from __future__ import annotations

import argparse

from brainldm import cli


@cli.script
def main(argv: list[str] | None = None) -> None:
    from brainldm.presets import TAKAGI2023

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset (local folder or Hub dataset repo id)")
    parser.add_argument("--features", required=True, help="feature folder from extract_features.py")
    parser.add_argument(
        "--subject", type=cli.positive, required=True, help="subject number (NSD: 1-8; your own experiment: any)"
    )
    parser.add_argument(
        "--names", "--feature-names", dest="names", default="z,c", help="feature spaces, e.g. z,c,zc@0.5"
    )
    parser.add_argument(
        "--out", type=cli.output_folder, required=True, help="output folder for maps, summaries and figures"
    )
    parser.add_argument("--roi-voxels", action="store_true", help="use the stored ROI voxels, not the whole brain")
    parser.add_argument("--components", type=cli.positive, default=TAKAGI2023.n_pca, help="PCA components (max)")
    parser.add_argument("--cv", type=cli.integer(2), default=TAKAGI2023.cv_folds, help="CV folds (grouped by image)")
    parser.add_argument(
        "--flatmaps", action="store_true", help='also draw pycortex flatmaps (needs pip install "brainldm[cortex]")'
    )
    parser.add_argument(
        "--cortical-space",
        help="pycortex SUBJECT/TRANSFORM of the data's grid (default: NSD's subjNN/func1pt8_to_anat0pt8_autoFSbbr, "
        "from scripts/import_nsd_subject.py; the S1 offline world is S1/fullhead)",
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)

    from brainldm.encoding import run_encoding
    from brainldm.features import parse_features
    from brainldm.surfaces import CorticalSpace

    names = [spec.name for spec in parse_features(args.names)]
    space = None
    if args.flatmaps:
        space = CorticalSpace.parse(args.cortical_space) if args.cortical_space else CorticalSpace.for_nsd(args.subject)
    results = run_encoding(
        args.data,
        args.features,
        args.subject,
        names,
        args.out,
        whole_brain=not args.roi_voxels,
        n_components=args.components,
        cv=args.cv,
        device=args.device,
        space=space,
    )
    for name, result in results.items():
        best = max(result.rois.items(), key=lambda item: item[1]["mean_r"])
        print(
            f"{name}: {result.significant.sum()} of {len(result.r)} voxels significant (FDR q <= {result.q:g}); "
            f"best ROI {best[0]} (mean r {best[1]['mean_r']:.3f})"
        )
    print(f"wrote maps, summaries and figures to {args.out}")


if __name__ == "__main__":
    main()
