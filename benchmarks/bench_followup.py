#!/usr/bin/env python
"""Benchmark the follow-up pipeline per image: what its features and maps weigh, and its GPU time.

Full-size models built from their configs with random weights (speed does not depend on the weights): BLIP ViT-B
(transformers' BlipConfig defaults, embeddings at the reference code's 240 px), DPT-large (Intel/dpt-large's config,
384 px) and Stable Diffusion 2 depth (stabilityai/stable-diffusion-2-depth's U-Net with a fifth, depth, input channel
and its OpenCLIP ViT-H text tower). Times, per image at batch 1 after a warm-up:

- features: BLIP's image embedding and DPT's four hidden states of one picture;
- caption: BLIP's beam search (3 beams, 5-20 tokens) from an embedding;
- depth: DPT's neck and head from four states;
- Xztd: SD-2-depth img2img at 512 px (50 DDIM steps x strength 0.8 = 40 run, guidance 5).

It also prints the bytes per picture of the blip and dpt features (float32, as the store holds them) and of a
subject's maps (dense and at reduced ranks) for --voxels voxels, by arithmetic on the shapes.

    python benchmarks/bench_followup.py --device cuda            # a GPU machine
    python benchmarks/bench_followup.py --steps 2 --repeats 1    # CPU: a check that it runs, not a figure
"""

from __future__ import annotations

import argparse
import math
import time


def random_models(seed: int = 0):
    """(captioner, DPT, SD-2-depth) at full size with seeded random weights (the offline wing's random twins)."""
    from brainldm.offline.twins import random_blip_captioner, random_dpt_large, random_sd2_depth_ldm

    return random_blip_captioner(seed), random_dpt_large(seed), random_sd2_depth_ldm(seed)


def map_bytes(n_voxels: int, n_targets: int, rank: int | None, itemsize: int) -> int:
    """Bytes of one map's weights: dense (k x T) or the rank-r product (k x r + r x T)."""
    return (n_voxels * n_targets if rank is None else rank * (n_voxels + n_targets)) * itemsize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of Xztd (default 50, the paper's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default 3)")
    parser.add_argument("--voxels", type=int, default=15724, help="voxels of the six streams (default: NSD subj01's "
                        "nsdgeneral, 15,724)")  # fmt: skip
    parser.add_argument("--ranks", default="64,256,1024", help="ranks to size the maps at (default 64,256,1024)")
    args = parser.parse_args(argv)

    import torch

    from brainldm.ldm.captioner import blip_embeddings, captions_from_embeddings
    from brainldm.ldm.depth import depth_from_states, depth_img2img, dpt_states, states_shape
    from brainldm.presets import Sampling
    from brainldm.torch_utils import default_device

    device = default_device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    name = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    captioner, dpt, pipe = random_models()
    captioner.model.to(device, dtype)
    dpt.to(device, dtype)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):  # nn.Module.to: diffusers' .to warns on every cast
        torch.nn.Module.to(model, device=device, dtype=dtype)

    blip_shape = captioner.embedding_shape
    shapes = {"blip": blip_shape, "dpt": states_shape(dpt)}
    per_picture = ", ".join(f"{k} {s} {_mb(math.prod(s) * 4)}" for k, s in shapes.items())
    print(f"features per picture (float32): {per_picture}")
    ranks = [int(r) for r in args.ranks.split(",")]
    for target, shape in shapes.items():
        sizes = [f"dense {_mb(map_bytes(args.voxels, math.prod(shape), None, 2))}"]
        sizes += [f"rank {r} {_mb(map_bytes(args.voxels, math.prod(shape), r, 2))}" for r in ranks]
        print(f"{target} map of {args.voxels} voxels, float16: {', '.join(sizes)}")

    def timed(run) -> float:
        run()
        if gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            run()
        if gpu:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.repeats

    picture = [torch.randint(0, 256, (425, 425, 3), dtype=torch.uint8).numpy()]
    embedding = torch.randn(1, *blip_shape)
    states = torch.randn(1, *states_shape(dpt))
    depth = depth_from_states(dpt, states)
    init = torch.rand(1, 3, 512, 512)
    sampling = Sampling(num_inference_steps=args.steps)
    print(f"per image on {name}, {dtype}:")
    with torch.no_grad():
        features = timed(lambda: (blip_embeddings(captioner, picture), dpt_states(dpt, picture)))
        print(f"  features (BLIP + DPT): {features:.3f} s")
        print(f"  caption from an embedding: {timed(lambda: captions_from_embeddings(captioner, embedding)):.3f} s")
        print(f"  depth from states: {timed(lambda: depth_from_states(dpt, states)):.3f} s")
        xztd = timed(lambda: depth_img2img(pipe, init, ["w1 w2"], depth, sampling))
        print(f"  Xztd ({int(args.steps * sampling.strength)} of {args.steps} steps, guidance 5, 512 px): {xztd:.3f} s")


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.1f} MB" if n_bytes < 1e9 else f"{n_bytes / 1e9:,.1f} GB"


if __name__ == "__main__":
    main()
