#!/usr/bin/env python
"""Train `toy`, the offline world's small Stable-Diffusion-shaped LDM, from scratch (see brainldm/toy.py).

Phases: draw pictures and captions -> CLIP pair (contrastive) -> VAE -> encode latents -> U-Net (noise prediction,
conditioned on the frozen text tower, EMA) -> save in diffusers format (fp16 safetensors) -> score on held-out
pairs -> model card. Seeded and resumable: every phase checkpoints into --work, and a rerun continues where a killed
run stopped. The defaults (the shipped model's recipe) take 7.4 minutes on an H100 and 4 to 5 hours on a 2-core CPU;
a CPU-sized run (below) takes 45 minutes there and scores lower (see the README).

    python scripts/train_toy_ldm.py --out brainldm/models/toy
    python scripts/train_toy_ldm.py --out /tmp/toy-cpu --n-train 10000 --clip-batch 128 --clip-steps 600 \
        --vae-batch 16 --vae-steps 1500 --unet-batch 32 --unet-steps 6000
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import fields, replace
from pathlib import Path

from brainldm import cli
from brainldm.presets import TAKAGI2023


@cli.script
def main(argv: list[str] | None = None) -> None:
    from brainldm.ldm import TOY_DIR
    from brainldm.toy import ToyConfig

    defaults = ToyConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=cli.output_folder, default=str(TOY_DIR), help=f"where the model goes (default {TOY_DIR})"
    )
    parser.add_argument(
        "--work", type=cli.output_folder, help="checkpoint folder (default: OUT.work); delete it to start over"
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
                type=cli.integer(0, 2**32 - 1) if f.name == "seed" else cli.positive,
                default=f.default,
                help=f"(default {f.default})",
            )
        elif f.type in ("float", float):
            parser.add_argument(
                f"--{f.name.replace('_', '-')}", type=cli.number(0), default=f.default, help=f"(default {f.default})"
            )
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields(ToyConfig) if hasattr(args, f.name)}
    config = replace(defaults, **overrides, n_heldout=args.eval_pairs)
    out = Path(args.out)
    work = args.work or out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    train(config, out, work, args.device, args.eval_steps)


def _save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _load(path: Path):
    import torch

    return torch.load(path, weights_only=True) if path.exists() else None


def train(
    config, out: Path, work: Path, device: str | None, eval_steps: int = TAKAGI2023.sampling.num_inference_steps
) -> None:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from brainldm import toy
    from brainldm.cards import toy_card
    from brainldm.ldm import ddim_scheduler
    from brainldm.torch_utils import default_device
    from brainldm.validation import InputError

    t0 = time.time()
    device = default_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    stamp = work / "config.json"
    stored, settings = (json.loads(stamp.read_text()) if stamp.exists() else None), toy.config_dict(config)
    if stored is not None and stored != settings:
        changed = ", ".join(
            f"--{k.replace('_', '-')} {settings.get(k)} (the checkpoints': {stored.get(k)})"
            for k in sorted(set(stored) | set(settings))
            if stored.get(k) != settings.get(k)
        )
        raise InputError(
            f"{work} holds checkpoints of a run with other settings: {changed}; resume with the same settings, or "
            "delete it or pass another --work to start again"
        )
    stamp.write_text(json.dumps(toy.config_dict(config), indent=1))
    print(f"training toy on {device}; checkpoints in {work}")

    # 1. pictures and captions
    data = work / "pairs.npz"
    if not data.exists():
        train_pics, train_caps = toy.draw_pairs(config.n_train, config.seed, config.image_size)
        held_pics, held_caps = toy.draw_pairs(config.n_heldout, config.seed + 1_000_000, config.image_size)
        tmp = work / "pairs.tmp.npz"
        np.savez(
            tmp, train=train_pics, heldout=held_pics, captions=json.dumps({"train": train_caps, "heldout": held_caps})
        )
        tmp.replace(data)
    with np.load(data) as f:
        pictures, heldout = f["train"], f["heldout"]
        captions = json.loads(str(f["captions"]))
    print(f"{len(pictures)} training and {len(heldout)} held-out pictures ({time.time() - t0:.0f} s)")

    tokenizer = toy.caption_tokenizer(captions["train"])
    owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(captions["train"])])
    token_ids = toy.tokenize(tokenizer, [c for caps in captions["train"] for c in caps])

    # 2. CLIP pair
    torch.manual_seed(config.seed)
    clip = toy.build_clip(tokenizer, config).to(device)
    opt = torch.optim.AdamW(clip.parameters(), lr=config.clip_lr, weight_decay=0.1)
    start = _resume(work / "clip.pt", clip, opt)
    vision_pics = toy.resize(pictures, config.vision_size)
    with tqdm(total=config.clip_steps, initial=start, desc="CLIP pair") as bar:
        toy.train_clip(
            clip,
            opt,
            token_ids,
            owner,
            vision_pics,
            config,
            start,
            device,
            _checkpointer(work / "clip.pt", clip, opt),
            progress=bar,
        )
    text_encoder, image_encoder = (m.to(device) for m in toy.split_clip(clip.cpu()))

    # 3. VAE
    torch.manual_seed(config.seed + 1)
    vae = toy.build_vae(config).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start = _resume(work / "vae.pt", vae, opt)
    with tqdm(total=config.vae_steps, initial=start, desc="VAE") as bar:
        toy.train_vae(vae, opt, pictures, config, start, device, _checkpointer(work / "vae.pt", vae, opt), progress=bar)

    # 4. latents of the training pictures, and the scaling factor that gives them unit variance
    latents_path = work / "latents.pt"
    if not latents_path.exists():
        with tqdm(total=len(pictures), desc="latents") as bar:
            _save(toy.encode_latents(vae, pictures, device, progress=bar), latents_path)
    latents = _load(latents_path)
    scaling_factor = float(1.0 / latents.std())
    latents = latents * scaling_factor

    # 5. U-Net
    torch.manual_seed(config.seed + 2)
    unet = toy.build_unet(config).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.01)
    ema = toy.EMA(unet, config.ema_decay)
    start = _resume(work / "unet.pt", unet, opt, ema)
    with tqdm(total=len(token_ids), desc="caption states") as bar:
        states = toy.encode_text(text_encoder, token_ids, device, progress=bar)
    empty = toy.encode_text(text_encoder, toy.tokenize(tokenizer, [""]), device)[0]
    if device.type == "cuda":
        states = states.to(device)
    with tqdm(total=config.unet_steps, initial=start, desc="U-Net") as bar:
        toy.train_unet(
            unet,
            opt,
            ema,
            latents,
            states,
            owner,
            empty,
            ddim_scheduler(),
            config,
            start,
            device,
            _checkpointer(work / "unet.pt", unet, opt, ema),
            progress=bar,
        )
    ema.copy_to(unet)
    minutes = (time.time() - t0) / 60

    # 6. save (fp16), reload as any diffusers model is loaded, score, write the card
    from diffusers import StableDiffusionImg2ImgPipeline

    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    ).to(dtype=torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)

    from brainldm.ldm import load_ldm

    ldm = load_ldm(str(tmp), device=device, dtype=torch.float32)
    print("scoring on held-out pairs ...")
    scores = toy.score_toy(ldm, ldm.image_encoder, heldout, captions["heldout"], steps=eval_steps, seed=config.seed)
    for k, v in scores.items():
        print(f"  {k}: {v:.3f}")
    size_mb = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 1e6
    (tmp / "README.md").write_text(toy_card(config, scores, minutes, str(device), size_mb))
    (tmp / "training.json").write_text(
        json.dumps(
            {"config": toy.config_dict(config), "scores": scores, "train_minutes": minutes, "device": str(device)},
            indent=1,
        )
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    print(f"wrote {out} ({size_mb:.1f} MB) in {(time.time() - t0) / 60:.1f} min")


def _resume(path: Path, model, optimizer, ema=None) -> int:
    state = _load(path)
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return int(state["step"])


def _checkpointer(path: Path, model, optimizer, ema=None):
    def checkpoint(step: int, loss: float) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "loss": loss}
        if ema is not None:
            state["ema"] = ema.state_dict()
        _save(state, path)

    return checkpoint


if __name__ == "__main__":
    main()
