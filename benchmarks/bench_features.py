#!/usr/bin/env python
"""Benchmark feature extraction: images/s for z (VAE at 320 px) and c (CLIP text, 5 captions/image) by batch size.

CPU: --model tiny. GPU: --model random-sd14 (the full SD-1.4 architecture with random weights; speed does not
depend on the weights) or a real checkpoint id.

--store FEATURES times the whole extraction into a feature store instead (img2img runs for zc and U-Net taps,
shards written as computed, parts merged), and under accelerate measures its scaling with processes:
  accelerate launch --multi_gpu --num_processes 4 benchmarks/bench_features.py --model random-sd14 \
      --store zc@0.5,unet.up2@0.8#20 --images 256 --batch-sizes 16
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', 'random-sd14' or a diffusers model id/folder")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma-separated (default: 1,8,32)")
    parser.add_argument("--images", type=int, default=64, help="images timed per batch size (default: 64)")
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--store", help="feature specs to extract end to end into a temporary store (see above)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the img2img runs (--store; default: 50)")
    args = parser.parse_args(argv)
    if args.store:
        return time_store(args)

    import numpy as np
    import torch

    from brainldm.ldm.features import encode_c, encode_z
    from brainldm.ldm.loading import load_ldm
    from brainldm.offline.synthetic import draw_picture

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    ldm = load_ldm(args.model, device=args.device, dtype=dtype)
    device = ldm.unet.device
    rng = np.random.default_rng(0)
    pictures = [draw_picture(rng, 425) for _ in range(args.images)]  # NSD stimuli are 425 x 425
    images = [p for p, _ in pictures]
    captions = [(caps * 2)[:5] for _, caps in pictures]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"model {args.model}, {name}, {ldm.unet.dtype}, {args.images} images per batch size")
    print("| batch | z images/s | c images/s |")
    print("|---|---|---|")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        rates = []
        for encode, inputs in ((encode_z, images), (encode_c, captions)):
            encode(ldm, inputs[:batch_size])  # warm-up: kernels, allocator
            sync()
            start = time.perf_counter()
            for i in range(0, len(inputs), batch_size):
                encode(ldm, inputs[i : i + batch_size])
            sync()
            rates.append(len(inputs) / (time.perf_counter() - start))
        print(f"| {batch_size} | {rates[0]:.1f} | {rates[1]:.1f} |")


def time_store(args) -> None:
    """Images/s of :func:`brainldm.ldm.extraction.extract_features` into a fresh store, over all processes."""
    import tempfile

    import numpy as np
    import torch
    from accelerate import PartialState

    from brainldm.data.features import parse_features
    from brainldm.ldm.extraction import extract_features
    from brainldm.ldm.loading import load_ldm
    from brainldm.offline.synthetic import draw_picture

    state = PartialState(cpu=not torch.cuda.is_available())
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype)
    ldm = load_ldm(args.model, device=state.device if state.num_processes > 1 else args.device, dtype=dtype)
    rng = np.random.default_rng(0)
    items = {i: draw_picture(rng, 425) for i in range(args.images)}
    specs = parse_features(args.store)
    batch_size = int(args.batch_sizes.split(",")[-1])
    out = [tempfile.mkdtemp() if state.is_main_process else None]
    if state.num_processes > 1:  # one store for all processes: process 0 makes the folder and tells the others
        from accelerate.utils import broadcast_object_list

        out = broadcast_object_list(out)
    out = out[0]
    state.wait_for_everyone()
    start = time.perf_counter()
    extract_features(
        ldm, args.model, list(items), items.__getitem__, specs, out, batch_size=batch_size,
        num_inference_steps=args.steps, progress=False, process_index=state.process_index,
        num_processes=state.num_processes, wait_for_everyone=state.wait_for_everyone,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if state.is_main_process:
        import shutil

        shutil.rmtree(out)
        cuda = torch.cuda.is_available()
        where = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
        print(
            f"| {args.store} | {where} x {state.num_processes} process(es), batch {batch_size}, {args.steps} steps "
            f"| {args.images} images in {seconds:.1f} s: {args.images / seconds:.2f} images/s |"
        )


if __name__ == "__main__":
    main()
