#!/usr/bin/env python
"""Fit a subject's decoding maps (z from early voxels, c from ventral voxels), score them on the test split, save.

Needs the prepared trials (scripts/prepare_nsd.py) and z, c features (scripts/extract_features.py). The maps land
in OUT as maps.safetensors + config.json + a model card, loadable with SubjectMaps.from_pretrained(OUT).
"""

from __future__ import annotations

import argparse

from brainldm import cli


@cli.script
def main(argv: list[str] | None = None) -> None:
    from brainldm.presets import TAKAGI2023

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset: local folder or Hub dataset repo id")
    parser.add_argument("--features", required=True, help="feature folder with z and c")
    parser.add_argument(
        "--subject", type=cli.positive, required=True, help="subject number (NSD: 1-8; your own experiment: any)"
    )
    parser.add_argument("--out", type=cli.output_folder, required=True, help="output folder, e.g. weights/subj01")
    parser.add_argument(
        "--alphas",
        type=cli.numbers(0.0, above=True),
        default=",".join(f"{a:g}" for a in TAKAGI2023.alphas),
        help="comma-separated ridge penalties, each > 0",
    )
    parser.add_argument(
        "--decoders",
        type=cli.name_values(str, example="z=early,c=ventral"),
        default=dict(TAKAGI2023.decoders),
        help="which ROI each target is decoded from, as target=roi pairs (default: the paper's, "
        f"{','.join(f'{t}={roi}' for t, roi in TAKAGI2023.decoders)}); ROI names are the dataset's own (NSD "
        "streams, or your experiment's masks), and a+b+c is their union (the follow-up pipeline: "
        "blip=early+ventral+midventral+midlateral+lateral+parietal, dpt=...)",
    )
    parser.add_argument("--cv", type=cli.integer(2), default=TAKAGI2023.cv_folds, help="CV folds (grouped by image)")
    parser.add_argument(
        "--ranks",
        type=cli.name_values(cli.positive),
        default={},
        help="store these targets' maps at a reduced rank, as target=rank pairs (e.g. c=1024); default dense, except "
        f"blip and dpt at rank {TAKAGI2023.followup_rank}",
    )
    parser.add_argument("--fp16", action="store_true", help="store weights in float16 (half the size)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--push", metavar="REPO_ID", help="also upload to this Hub model repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    args = parser.parse_args(argv)

    from brainldm.decoding.fit import fit_subject_maps

    if not all(args.decoders.values()):
        parser.error(f"--decoders: every target needs an ROI (target=roi), got {args.decoders}")
    needed = [f"{target}={roi}" for target, roi in TAKAGI2023.decoders if target not in args.decoders]
    if needed:  # maps are made here to reconstruct from, and every reconstruction starts from z and c
        given = ",".join(f"{t}={roi}" for t, roi in args.decoders.items())
        parser.error(f"--decoders {given} leaves out what every reconstruction needs: add {','.join(needed)}")

    maps = fit_subject_maps(
        args.data,
        args.features,
        args.subject,
        decoders=tuple(args.decoders.items()),
        alphas=args.alphas,
        cv=args.cv,
        ranks=args.ranks,
        storage_dtype="float16" if args.fp16 else "float32",
        device=args.device,
    )
    folder = maps.save_pretrained(args.out)
    for name, s in maps.config.scores.items():
        line = f"{name}: CV r {s['cv_r']:.3f}"
        if "identification" in s:
            line += (
                f", test r per dimension {s['dimension_r']:.3f}, per image {s['pattern_r']:.3f}, "
                f"2-way identification {100 * s['identification']:.1f}%"
            )
        print(line)
    print(f"wrote {folder} ({maps.nbytes / 1e6:.1f} MB of weights)")
    if args.push:
        print(f"pushed to {maps.push_to_hub(args.push, private=args.private)}")


if __name__ == "__main__":
    main()
