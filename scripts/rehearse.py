#!/usr/bin/env python
"""Rehearse the real run before renting a GPU: every step of the README's pipeline at full size, with random weights.

Writes a synthetic subject at NSD's real size (the 81 x 104 x 83 grid, ~16k nsdgeneral voxels, HDF5 betas of 750
trials a session, 425-px pictures in a 73,000-slot stimuli file), serves it as s3://natural-scenes-dataset from a
local S3 endpoint, and runs prepare_nsd.py, extract_features.py (z, c, blip, dpt), fit_maps.py (z, c, blip, dpt),
reconstruct.py (Xz, Xc, Xzc, Xzt, Xztd at 512 px, --rescale target), evaluate.py, encoding.py and app.py (one
reconstruction through its API), each in its own process, with the real models' architectures and seeded random
weights (random-sd14, random-blip, random-dpt-large, random-sd2-depth; evaluate scores them with random networks).

Prints, step by step, wall time, peak memory (RSS; GPU where nvidia-smi is), bytes fetched and written and the shapes
written, and stops at the first step that fails or writes another shape than the real models give. Then the table of
what the real run needs: checkpoints, disk per subject, GPU memory per step. With --report, also writes both tables.
The data are written once into --work and reused. On a 2-core CPU the defaults take well over an hour (the DPT
fit's cross-validation, 2.4 million targets a picture); --sessions 1 --trials-per-session 30 --steps 2
--strength 0.5 (the suite's size: full grid, full models, 10 pictures) takes about 8 minutes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from brainldm import cli


@cli.script
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=cli.output_folder, required=True, help="where the data and every output go")
    parser.add_argument("--sessions", type=cli.positive, default=2, help="sessions of betas (default: 2)")
    parser.add_argument(
        "--trials-per-session", type=cli.positive, default=750, help="trials a session (default: 750, NSD's)"
    )
    parser.add_argument(
        "--test-images", type=cli.positive, default=2, help="test images to reconstruct, >= 2 (default: 2)"
    )
    parser.add_argument("--steps", type=cli.positive, default=4, help="DDIM steps of reconstruct.py (default: 4)")
    parser.add_argument("--strength", type=float, default=0.8, help="img2img strength of reconstruct.py")
    parser.add_argument(
        "--app-steps", type=cli.positive, default=10, help="DDIM steps of the app's request (default: 10, its least)"
    )
    parser.add_argument("--app-strength", type=float, default=0.1, help="the app request's strength (default: 0.1)")
    parser.add_argument(
        "--from-step",
        help="start at this step (prepare, features, fit, reconstruct, evaluate, encoding or app), reusing the "
        "earlier steps' outputs from the last rehearsal in --work",
    )
    parser.add_argument("--report", help="also write the step and needs tables to this markdown file")
    args = parser.parse_args(argv)

    from brainldm.offline.rehearsal import StepFailed, rehearse, steps_table

    scripts = Path(__file__).resolve().parent
    try:
        steps, needs = rehearse(
            args.work, scripts, sessions=args.sessions, trials_per_session=args.trials_per_session,
            test_images=args.test_images, steps=args.steps, strength=args.strength, app_steps=args.app_steps,
            app_strength=args.app_strength, from_step=args.from_step,
            echo=lambda line: print(line, flush=True),
        )  # fmt: skip
    except StepFailed as err:
        print(f"rehearsal stopped: {err}", file=sys.stderr)
        sys.exit(1)
    report = f"## The rehearsal, step by step\n\n{steps_table(steps)}\n\n## What the real run needs\n\n{needs}\n"
    print("\n" + report)
    if args.report:
        Path(args.report).write_text(report)


if __name__ == "__main__":
    main()
