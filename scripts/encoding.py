#!/usr/bin/env python
"""Voxel-wise encoding models from LDM features to whole-brain fMRI (the paper's second half).

Per feature space: PCA (<= 6,400 dims, fit on training images), ridge to every voxel (alpha per voxel, CV grouped
by image), test r, one-sided p against the Gaussian null, Benjamini-Hochberg FDR, per-ROI summaries. Writes r maps
(NIfTI), summary.json/csv and figures: an r map per feature, z vs c vs zc, and the noise / step / layer sweeps the
requested features allow, as volume slices and (--flatmaps) pycortex flatmaps. Needs the whole-brain dataset
(prepare_nsd.py --whole-brain) and the features (extract_features.py --features z,c,zc@0.2,...).

With several subjects (--subjects 1,2,5,7, the paper's four) each gets OUT/subjNN, with its flatmaps on its own
surface, and OUT holds the group summary: group_summary.json, group_rois.png (per ROI and feature space, the mean
over subjects with every subject shown) and group_sweep_*.png (each sweep the features allow, every subject's line and
their mean). With one subject, OUT is that subject's folder.
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
    cli.add_subjects(parser)
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
        help="pycortex SUBJECT/TRANSFORM of the data's grid, for every subject (default: each NSD subject's own "
        "subjNN/func1pt8_to_anat0pt8_autoFSbbr, from scripts/import_nsd_subject.py; the S1 offline world is "
        "S1/fullhead)",
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)

    from brainldm.analysis.encoding_job import GROUP_FIGURE, run_encoding, run_group_encoding
    from brainldm.analysis.surfaces import CorticalSpace
    from brainldm.data.features import parse_features

    names = [spec.name for spec in parse_features(args.names)]
    spaces = {}
    if args.flatmaps:
        given = CorticalSpace.parse(args.cortical_space) if args.cortical_space else None
        spaces = {subject: given or CorticalSpace.for_nsd(subject) for subject in args.subjects}
    options = dict(whole_brain=not args.roi_voxels, n_components=args.components, cv=args.cv, device=args.device)
    if len(args.subjects) == 1:
        (subject,) = args.subjects
        results = {subject: run_encoding(args.data, args.features, subject, names, args.out, space=spaces.get(subject),
                                         **options)}  # fmt: skip
    else:
        results = run_group_encoding(args.data, args.features, args.subjects, names, args.out, spaces, **options)
    for subject, per_feature in results.items():
        for name, result in per_feature.items():
            best = max(result.rois.items(), key=lambda item: item[1]["mean_r"])
            print(
                f"subject {subject}, {name}: {result.significant.sum()} of {len(result.r)} voxels significant "
                f"(FDR q <= {result.q:g}); best ROI {best[0]} (mean r {best[1]['mean_r']:.3f})"
            )
    if len(results) > 1:
        print(f"group summary: {args.out / GROUP_FIGURE}")
    print(f"wrote maps, summaries and figures to {args.out}")


if __name__ == "__main__":
    main()
