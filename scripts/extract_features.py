#!/usr/bin/env python
"""Extract LDM features (z, c, zc@strength, U-Net taps) of every image the subjects saw, cached per nsd_id.

Features are written as safetensors shards under OUT/<feature>/ and shared across subjects and reruns: an image is
computed once (--subjects 1,2,5,7 computes NSD's 1,000 shared pictures once, and a later subject reuses what the
store holds), and a killed run resumes where it stopped. Data-parallel over GPUs and nodes with accelerate (each
process computes its share of the batches; process 0 merges them into the store one process would write):
  accelerate launch --multi_gpu --num_processes 4 scripts/extract_features.py --data DATA --subjects 1,2,5,7 ...
Examples of --features:
  z,c                         the decoders' targets (the paper's z and c)
  z,c,zc@0.2,zc@0.5,zc@0.8    the encoding analysis' noise-level sweep
  unet.mid@0.8#1,unet.mid@0.8#20,unet.up1@0.8#40   U-Net taps: block @ strength # step (1-based)
  blip,dpt                    the follow-up pipeline's targets: BLIP image embeddings (--captioner) and DPT's
                              hidden states (--depth-model); decoded, they give captions and depth maps
U-Net taps are reduced as they are recorded (--unet-reduce): mean over space (the default), poolN (an N x N grid of
regional means) or flatten. With SD-1.4 a flattened up2 tap is 4 MB per image, pool4 40 kB.
"""

from __future__ import annotations

import argparse

from brainldm import cli

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@cli.script
def main(argv: list[str] | None = None) -> None:
    from brainldm.data.features import REDUCTIONS
    from brainldm.ldm.captioner import BLIP_IMAGE_SIZE, BLIP_MODEL
    from brainldm.ldm.depth import DPT_MODEL
    from brainldm.presets import TAKAGI2023

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset: a local folder or a Hub dataset repo id")
    cli.add_subjects(parser)
    parser.add_argument(
        "--model", default=TAKAGI2023.model_id, help="diffusers model id or folder, or a registered name (e.g. 'tiny')"
    )
    parser.add_argument(
        "--out", type=cli.output_folder, required=True, help="feature folder (one subfolder per feature)"
    )
    parser.add_argument("--features", default="z,c", help="comma-separated feature specs (default: z,c)")
    parser.add_argument("--batch-size", type=cli.positive, default=8, help="images per batch (default: 8)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument(
        "--steps", type=cli.positive, default=TAKAGI2023.sampling.num_inference_steps, help="DDIM steps for zc/U-Net"
    )
    parser.add_argument(
        "--guidance", type=cli.number(1.0), default=TAKAGI2023.sampling.guidance_scale, help="guidance for zc/U-Net"
    )
    parser.add_argument("--seed", type=cli.seed, default=TAKAGI2023.sampling.seed)
    parser.add_argument(
        "--unet-reduce", choices=REDUCTIONS, default="mean", help="U-Net tap reduction (default: mean over space)"
    )
    parser.add_argument(
        "--captioner",
        default=BLIP_MODEL,
        help=f"BLIP captioner for blip features, or a registered name (default: {BLIP_MODEL})",
    )
    parser.add_argument(
        "--blip-image-size",
        type=cli.positive,
        default=BLIP_IMAGE_SIZE,
        help=f"image size for BLIP's embeddings (default: {BLIP_IMAGE_SIZE}, the reference code's)",
    )
    parser.add_argument(
        "--depth-model",
        default=DPT_MODEL,
        help=f"DPT model for dpt features, or a registered name (default: {DPT_MODEL})",
    )
    args = parser.parse_args(argv)

    import torch
    from accelerate import PartialState

    from brainldm.data.features import parse_features
    from brainldm.data.trials import SubjectStimuli
    from brainldm.ldm.extraction import auxiliary_features, extract_features
    from brainldm.ldm.loading import load_ldm

    specs = parse_features(args.features)
    # cpu=True lets accelerate form a multi-process CPU group (gloo) when launched without GPUs
    state = PartialState(cpu=not torch.cuda.is_available())
    stimuli = SubjectStimuli(args.data, args.subjects)
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    device = state.device if state.num_processes > 1 else args.device  # one device per process
    ldm = load_ldm(args.model, device=device, dtype=dtype)
    auxiliary = auxiliary_features(specs, args.captioner, args.depth_model, ldm.unet.device, args.blip_image_size)
    stores = extract_features(
        ldm,
        args.model,
        stimuli.nsd_ids,
        stimuli.__getitem__,
        specs,
        args.out,
        batch_size=args.batch_size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        unet_reduce=args.unet_reduce,
        process_index=state.process_index,
        num_processes=state.num_processes,
        wait_for_everyone=state.wait_for_everyone,
        auxiliary=auxiliary,
    )
    if state.is_main_process:
        for name, store in stores.items():
            subjects = ",".join(map(str, args.subjects))
            print(
                f"{name}: {len(stimuli)} images of subjects {subjects}, {store.reused} of them already in the store; "
                f"{len(store.index)} in {store.folder}"
            )


if __name__ == "__main__":
    main()
