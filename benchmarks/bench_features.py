#!/usr/bin/env python
"""Benchmark feature extraction: images/s for z (VAE at 320 px) and c (CLIP text, 5 captions/image) by batch size.

CPU: --model tiny. GPU: --model random-sd14 (the full SD-1.4 architecture with random weights; speed does not
depend on the weights) or a real checkpoint id.
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
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from brainldm.features import encode_c, encode_z
    from brainldm.ldm import load_ldm
    from brainldm.synthetic import draw_picture

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


if __name__ == "__main__":
    main()
