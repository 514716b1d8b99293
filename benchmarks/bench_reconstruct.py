#!/usr/bin/env python
"""Benchmark reconstruction: seconds per Xzc at 512 x 512 (50 DDIM steps x strength 0.8 = 40 run, guidance 5).

Ours (brainldm Reconstructor: Xz decode + img2img, fp16, fused QKV; variants with channels_last, torch.compile) against
stock diffusers StableDiffusionImg2ImgPipeline in fp32 and fp16, at batch 1 and batched, in one run. On a GPU use
--model random-sd14 (the SD-1.4 architecture with random weights: speed does not depend on the weights); on CPU
the default --model tiny.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny', 'random-sd14' or a diffusers model id/folder")
    parser.add_argument("--batch-sizes", default="1,16", help="batch sizes for fp16/bf16 runs (default: 1,16)")
    parser.add_argument("--fp32-batch-sizes", default="1", help="batch sizes for the stock fp32 run (default: 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up (default: 2)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument(
        "--variants",
        default="eager",
        help="comma-separated: eager, channels_last, compile (reduce-overhead), compile-max (max-autotune)",
    )
    parser.add_argument("--no-stock", action="store_true", help="skip the stock diffusers rows")
    args = parser.parse_args(argv)

    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from brainldm.ldm.loading import load_ldm, optimize_ldm
    from brainldm.ldm.reconstruct import Reconstructor
    from brainldm.presets import Sampling
    from brainldm.torch_utils import default_device

    device = default_device()
    gpu = device.type == "cuda"
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{args.model} on {name}; {args.steps} steps x strength {args.strength}, guidance 5, 512 x 512")

    def inputs(ldm, n: int):
        g = torch.Generator().manual_seed(0)
        latent = (ldm.vae.config.latent_channels, 40, 40)
        hidden = (ldm.tokenizer.model_max_length, ldm.unet.config.cross_attention_dim)
        return torch.randn(n, *latent, generator=g), torch.randn(n, *hidden, generator=g)

    def timed(run) -> float:
        run()  # warm-up (and compilation)
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            run()
        if gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.repeats

    rows = []

    def stock(dtype: torch.dtype, label: str, batch_sizes: list[int]) -> None:
        ldm = load_ldm(args.model, device=device, dtype=dtype)
        pipe = StableDiffusionImg2ImgPipeline(**ldm.components, requires_safety_checker=False)  # stock diffusers
        pipe.set_progress_bar_config(disable=True)
        for n in batch_sizes:
            _, c = inputs(ldm, n)
            image = torch.rand(n, 3, 512, 512, generator=torch.Generator().manual_seed(0))

            def run(image=image, c=c):
                pipe(
                    image=image.to(device, dtype),
                    prompt_embeds=c.to(device, dtype),
                    negative_prompt_embeds=torch.zeros_like(c).to(device, dtype),
                    strength=args.strength,
                    num_inference_steps=args.steps,
                    guidance_scale=5.0,
                    output_type="np",
                )

            rows.append((label, n, timed(run) / n))

    def ours(dtype: torch.dtype, label: str, variant: str) -> None:
        options = {
            "eager": {},
            "channels_last": {"channels_last": True},
            "compile": {"compile_mode": "reduce-overhead"},
            "compile-max": {"compile_mode": "max-autotune"},
        }[variant]
        ldm = optimize_ldm(load_ldm(args.model, device=device, dtype=dtype), **options)
        reconstructor = Reconstructor(ldm)
        for n in (int(b) for b in args.batch_sizes.split(",")):
            z, c = inputs(ldm, n)
            seconds = timed(
                lambda z=z, c=c: reconstructor(
                    z, c, Sampling(strength=args.strength, num_inference_steps=args.steps), include_xc=False
                )
            )
            rows.append((label, n, seconds / n))

    half = torch.float16 if gpu else torch.float32
    if not args.no_stock:
        stock(torch.float32, "diffusers img2img, fp32", [int(b) for b in args.fp32_batch_sizes.split(",")])
        if gpu:
            stock(half, "diffusers img2img, fp16", [int(b) for b in args.batch_sizes.split(",")])
    for variant in args.variants.split(","):
        ours(half, f"brainldm Reconstructor, {'fp16' if gpu else 'fp32'}, {variant}", variant)

    print("| pipeline | batch | seconds per Xzc | images/s |")
    print("|---|---|---|---|")
    for label, n, seconds in rows:
        print(f"| {label} | {n} | {seconds:.3f} | {1 / seconds:.2f} |")


if __name__ == "__main__":
    main()
