#!/usr/bin/env python
"""What a reduced rank costs the follow-up pipeline's maps on the planted world: blip and dpt decoded from six streams.

Builds the offline world of docs/offline-world.md (toy, 6 sessions x 45 trials, 20 test images, the default noise
level), extracts blip and dpt with the tiny captioner and depth model (their features are fixed nonlinear functions of
the pictures, which the world's voxels see through z and c), and fits each map dense and at each --ranks. Prints, per
target and rank, the stored weights and the test split's decoding scores (2-way identification, per-image pattern r).

    python benchmarks/followup_ranks.py --seed 7
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from brainldm import cli


@cli.script
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=cli.numbers(1), default=[64, 16, 4], help="(default 64,16,4)")
    parser.add_argument("--seed", type=cli.integer(0, 2**32 - 1), default=7, help="world seed (default 7)")
    args = parser.parse_args(argv)

    from brainldm.data.features import parse_features
    from brainldm.data.trials import SubjectStimuli, load_trials
    from brainldm.decoding.fit import fit_subject_maps
    from brainldm.ldm.extraction import auxiliary_features, extract_features
    from brainldm.ldm.loading import load_ldm
    from brainldm.offline.world import build_offline_world
    from brainldm.presets import TAKAGI2023

    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        ldm = load_ldm("toy", device="cpu")
        world = build_offline_world(root, ldm, "toy", n_sessions=6, trials_per_session=45, n_shared=20, seed=args.seed)
        specs = parse_features("blip,dpt")
        auxiliary = auxiliary_features(specs, captioner="tiny", depth_model="tiny", device="cpu")
        stimuli = SubjectStimuli(world.data, (1,))
        extract_features(
            ldm, "toy", stimuli.nsd_ids, stimuli.__getitem__, specs, world.features, progress=False, auxiliary=auxiliary
        )
        print(f"{len(load_trials(world.data, 1, 'test'))} test images")
        print("| target | rank | weights (float32) | 2-way identification | pattern r |")
        print("|---|---|---|---|---|")
        for rank in [None, *args.ranks]:  # None: dense
            ranks = dict.fromkeys(("blip", "dpt"), None if rank is None else int(rank))
            decoders = TAKAGI2023.followup_decoders  # blip and dpt from the six streams
            maps = fit_subject_maps(world.data, world.features, 1, decoders=decoders, ranks=ranks, device="cpu")
            for target in ("blip", "dpt"):
                linear, scores = maps[target], maps.config.scores[target]
                cells = [
                    target,
                    "dense" if linear.rank is None else str(linear.rank),
                    f"{linear.n_weights * 4 / 1e6:.2f} MB",
                    f"{100 * scores['identification']:.1f}%",
                    f"{scores['pattern_r']:.3f}",
                ]
                print(f"| {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
