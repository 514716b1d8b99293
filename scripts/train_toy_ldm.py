#!/usr/bin/env python
"""Train `toy`, the offline world's small Stable-Diffusion-shaped LDM, from scratch (see brainldm/offline/toy.py).

Phases: draw pictures and captions -> CLIP pair (contrastive) -> VAE -> encode latents -> U-Net (noise prediction,
conditioned on the frozen text tower, EMA) -> save in diffusers format (fp16 safetensors) -> score on held-out
pairs -> model card. Seeded and resumable: every phase checkpoints into --work, and a rerun continues where a killed
run stopped. The defaults (the shipped model's recipe) take 7.4 minutes on an H100 and 4 to 5 hours on a 2-core CPU;
a CPU-sized run (below) takes 45 minutes there and scores lower (see docs/offline-world.md). ``--init`` continues a
saved toy's U-Net (the shipped one, say) when its ``.work`` folder is gone, grows it (cross-attention at more levels),
or fine-tunes it with another caption mix or noise schedule, or on the latents of its VAE refined
(``--vae-refine-steps``).

    python scripts/train_toy_ldm.py --out brainldm/models/toy
    python scripts/train_toy_ldm.py --out /tmp/toy-cpu --n-train 10000 --clip-batch 128 --clip-steps 600 \
        --vae-batch 16 --vae-steps 1500 --unet-batch 32 --unet-steps 6000
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

from brainldm import cli
from brainldm.presets import TAKAGI2023


@cli.script
def main(argv: list[str] | None = None) -> None:
    from brainldm.offline.toy import train_toy
    from brainldm.offline.toy_growth import seed_work_from_model
    from brainldm.offline.toy_parts import ToyConfig
    from brainldm.offline.twins import TOY_DIR

    defaults = ToyConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=cli.output_folder, default=str(TOY_DIR), help=f"where the model goes (default {TOY_DIR})"
    )
    parser.add_argument(
        "--work", type=cli.output_folder, help="checkpoint folder (default: OUT.work); delete it to start over"
    )
    parser.add_argument(
        "--init",
        type=Path,
        help="continue a saved toy's U-Net (its folder, e.g. brainldm/models/toy) with a longer --unet-steps and "
        "otherwise its recipe, or grow it with more --unet-attention-levels, or fine-tune it with another "
        "--caption-mix or --snr-shift, or on the latents of its VAE refined with --vae-refine-steps (then --unet-steps "
        "is that U-Net's own schedule), in a new --work folder (rerun the same command to resume)",
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--eval-pairs", type=cli.positive, default=defaults.n_heldout, help="held-out pairs scored for the model card"
    )
    parser.add_argument(
        "--eval-steps",
        type=cli.positive,
        default=TAKAGI2023.sampling.num_inference_steps,
        help="DDIM steps of the scored generations (default: the paper's 50)",
    )
    for f in fields(ToyConfig):
        if f.type in ("int", int) and f.name != "n_heldout":
            parser.add_argument(
                f"--{f.name.replace('_', '-')}",
                type=cli.integer(0, 2**32 - 1) if f.name in ("seed", "vae_refine_steps") else cli.positive,
                default=f.default,
                help=f"(default {f.default})",
            )
        elif f.type in ("float", float):
            parser.add_argument(
                f"--{f.name.replace('_', '-')}",
                type=cli.number(0, above=f.name == "snr_shift"),
                default=f.default,
                help=f"(default {f.default})",
            )
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(ToyConfig) if hasattr(args, f.name)}
    config = replace(defaults, **overrides, n_heldout=args.eval_pairs)
    out = Path(args.out)
    work = args.work or out.with_name(out.name + ".work")
    if args.init:
        seed_work_from_model(args.init, work, config)
    train_toy(config, out, work, args.device, args.eval_steps)


if __name__ == "__main__":
    main()
