#!/usr/bin/env python
"""Reconstruct seen images from a subject's test trials: original, Xz, Xc and Xzc PNGs plus a contact sheet.

When the maps also decode blip (and dpt), the paper code's follow-up pipeline runs too: BLIP writes a caption from
the decoded image embedding (caption.txt), Xzt is img2img from Xz with that caption, and Xztd is Stable Diffusion 2
depth's img2img from Xz with that caption and the depth map DPT draws from the decoded hidden states. The captioner
and depth model default to those the maps were fitted to; --no-followup skips it.

Rerunning skips finished trials. Data-parallel over GPUs and nodes with accelerate (the trial list is sharded):
  accelerate launch --multi_gpu --num_processes 4 scripts/reconstruct.py --maps weights/subj01 --data DATA \
      --subject 1 --out OUT
"""

from __future__ import annotations

import argparse

from brainldm import cli


def parse_rows(text: str) -> list[int]:
    """An argparse type: '0:10' (a slice) or '3,7,9' (a list) -> row indices (range checks come with the data)."""
    try:
        if ":" in text:
            start, stop = text.split(":")
            rows = list(range(int(start or 0), int(stop)))
        else:
            rows = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected rows as START:STOP or a comma-separated list, got {text!r}"
        ) from None
    if not rows or min(rows) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} selects no rows, or negative ones")
    return rows


@cli.script
def main(argv: list[str] | None = None) -> None:
    from brainldm.decoding.maps import RESCALE_MODES
    from brainldm.presets import MAX_SAMPLES, TAKAGI2023

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", required=True, help="SubjectMaps: local folder or Hub model repo id")
    parser.add_argument("--data", required=True, help="prepared dataset: local folder or Hub dataset repo id")
    parser.add_argument(
        "--subject", type=cli.positive, required=True, help="subject number (NSD: 1-8; your own experiment: any)"
    )
    parser.add_argument("--split", default="test", choices=["test", "train"])
    parser.add_argument("--trials", type=parse_rows, help="rows of the split: '0:10' or '3,7,9' (default: all)")
    parser.add_argument("--out", type=cli.output_folder, required=True, help="output folder")
    parser.add_argument(
        "--samples",
        type=cli.integer(1, MAX_SAMPLES),
        default=1,
        help=f"samples per image, at most {MAX_SAMPLES} (paper: {TAKAGI2023.eval_samples})",
    )
    parser.add_argument("--batch-size", type=cli.positive, default=1, help="images per diffusion batch")
    parser.add_argument("--model", help="LDM id or folder (default: the one the maps were fitted for)")
    parser.add_argument(
        "--strength",
        type=cli.number(0.0, 1.0, above=True),
        default=TAKAGI2023.sampling.strength,
        help=f"img2img noise level in (0, 1] (default: {TAKAGI2023.sampling.strength})",
    )
    parser.add_argument(
        "--guidance",
        type=cli.number(1.0),
        default=TAKAGI2023.sampling.guidance_scale,
        help="classifier-free guidance, >= 1",
    )
    parser.add_argument(
        "--steps", type=cli.positive, default=TAKAGI2023.sampling.num_inference_steps, help="DDIM steps"
    )
    parser.add_argument("--seed", type=cli.seed, default=TAKAGI2023.sampling.seed)
    parser.add_argument(
        "--output-size", type=cli.positive, help="reconstructions' size in px (default: the model's own, 512 for SD)"
    )
    parser.add_argument(
        "--rescale",
        choices=list(RESCALE_MODES),
        default=TAKAGI2023.rescale,
        help="rescale the decoded z and c to the training targets' spread (per dimension, as Brain-Diffuser, or one "
        "factor per target), with statistics fitted with the maps; default: off, as the paper",
    )
    parser.add_argument(
        "--captioner", help="BLIP captioner for decoded blip, or a registered name (default: the maps' own)"
    )
    parser.add_argument(
        "--depth-model", help="DPT model for decoded dpt, or a registered name (default: the maps' own)"
    )
    parser.add_argument(
        "--depth-ldm",
        help="SD-2 depth model for Xztd, or a registered name (default: stabilityai/stable-diffusion-2-depth)",
    )
    parser.add_argument("--no-followup", action="store_true", help="only Xz, Xc and Xzc, whatever the maps decode")
    parser.add_argument("--overwrite", action="store_true", help="remake finished trials made with other settings")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet with CUDA graphs (GPU: ~3.5x faster per image)"
    )
    args = parser.parse_args(argv)

    import torch
    from accelerate import PartialState

    from brainldm.analysis.viz import write_contact_sheet
    from brainldm.decoding.maps import SubjectMaps
    from brainldm.ldm.loading import load_ldm, optimize_ldm
    from brainldm.ldm.reconstruct import Reconstructor
    from brainldm.paths import subject_name
    from brainldm.presets import Sampling
    from brainldm.reconstruction.job import reconstruct_trials
    from brainldm.validation import InputError

    # cpu=True lets accelerate form a multi-process CPU group (gloo) when launched without GPUs
    state = PartialState(cpu=not torch.cuda.is_available())
    maps = SubjectMaps.from_pretrained(args.maps)
    if maps.subject != args.subject:
        raise InputError(f"--maps are subject {maps.subject}'s but --subject is {args.subject}")
    ldm = load_ldm(args.model or maps.model_id, device=state.device)
    ldm = optimize_ldm(ldm, compile_mode="reduce-overhead" if args.compile else None)
    targets = maps.config.targets
    followup = None
    if "blip" in targets and not args.no_followup:
        from brainldm.ldm.reconstruct import FollowUp

        followup = FollowUp.for_maps(maps, args.captioner, args.depth_model, args.depth_ldm, device=state.device)
    folders = reconstruct_trials(
        Reconstructor(ldm, args.output_size),
        maps,
        args.data,
        args.subject,
        args.out,
        split=args.split,
        rows=args.trials,
        sampling=Sampling(args.strength, args.guidance, args.steps, args.seed, args.samples),
        rescale=args.rescale,
        batch_size=args.batch_size,
        process_index=state.process_index,
        num_processes=state.num_processes,
        progress=True,
        overwrite=args.overwrite,
        followup=followup,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        from pathlib import Path

        subject_dir = Path(args.out) / subject_name(args.subject)
        every = sorted(subject_dir.glob(f"{args.split}-*"))
        sheet = write_contact_sheet(every, subject_dir / "contact_sheet.png")
        print(f"{len(every)} reconstructions in {subject_dir}; contact sheet: {sheet}")
    else:
        print(f"process {state.process_index}: {len(folders)} trials")


if __name__ == "__main__":
    main()
