"""Continuing a saved toy rather than training from scratch: its U-Net grown (cross-attention at more levels,
computing exactly what it did), retimed to another noise schedule, and a work folder seeded from the saved model so
that :func:`brainldm.offline.toy.train_toy` resumes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from brainldm.offline.toy_card import toy_reproduce
from brainldm.offline.toy_parts import EMA, ToyConfig, build_clip, build_unet, config_dict, save_checkpoint
from brainldm.offline.twins import ddim_scheduler, signal_to_noise
from brainldm.validation import InputError


def grow_unet(saved, config: ToyConfig):
    """``saved`` (a toy U-Net) with cross-attention at ``config.unet_attention_levels`` levels, more than it has: the
    new attention blocks are built seeded and their output projections zeroed, so the grown U-Net computes exactly
    what ``saved`` does until training teaches them something."""

    n, levels = len(config.unet_channels), config.unet_attention_levels
    had = sum(t.startswith("CrossAttn") for t in saved.config.down_block_types)
    torch.manual_seed(config.seed + 2)
    unet = build_unet(config)
    # levels run coarsest first in the up blocks and last in the down blocks
    new = [f"down_blocks.{i}" for i in range(n - levels, n - had)] + [f"up_blocks.{i}" for i in range(had, levels)]
    missing, unexpected = unet.load_state_dict(saved.state_dict(), strict=False)
    if not new or unexpected or not all(k.startswith(tuple(f"{b}.attentions." for b in new)) for k in missing):
        raise InputError(
            f"cannot grow a U-Net with cross-attention at {had} levels into one with {levels}: "
            f"{len(unexpected)} unexpected and {len(missing)} missing weights (other channels or blocks?)"
        )
    for name in new:
        for attention in unet.get_submodule(name).attentions:
            torch.nn.init.zeros_(attention.proj_out.weight)
            torch.nn.init.zeros_(attention.proj_out.bias)
    return unet


def retime_unet(unet, old, new, steps: int = 3000) -> None:
    """Refit ``unet``'s time embedding in place so that it reads ``new``'s timesteps as ``old`` read the ones with the
    same signal-to-noise ratio (``old`` and ``new``: diffusers schedulers with ``alphas_cumprod``).

    The U-Net sees the timestep only through that embedding, and its input x_t at a given SNR is the same under
    either schedule, so the refitted U-Net computes what the old one did (to the fit's error, about 0.2% of the
    embedding's size), with no training. ``steps``: full-batch Adam steps over the 1000 timesteps, deterministic.
    """

    old_snr, new_snr = (torch.log(signal_to_noise(scheduler)).numpy() for scheduler in (old, new))
    timesteps = np.arange(len(new_snr))
    # log SNR falls with t: interpolate t over -log SNR; SNRs beyond the old schedule's range take its ends
    matched = np.interp(-new_snr, -old_snr, np.arange(len(old_snr)))
    embed, project = unet.time_embedding, unet.time_proj
    dtype = next(embed.parameters()).dtype
    with torch.no_grad():
        target = embed(project(torch.as_tensor(matched, dtype=torch.float32)).to(dtype))
    x = project(torch.as_tensor(timesteps, dtype=torch.float32)).to(dtype)
    opt = torch.optim.Adam(embed.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = F.mse_loss(embed(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()


def seed_work_from_model(model_dir: str | Path, work: str | Path, config: ToyConfig) -> None:
    """Fill an empty ``work`` with checkpoints taken from a saved toy, so that :func:`train_toy` with ``config`` (its
    recipe with a longer ``unet_steps``, or with more ``unet_attention_levels``, or another ``caption_mix`` or
    ``snr_shift``, or a ``vae_refine_steps``) continues that toy's U-Net rather than training from scratch.

    The CLIP pair and the VAE count as trained. A continuation resumes the U-Net at its saved step from its saved
    (EMA, float16) weights; a grown U-Net (:func:`grow_unet`), or one fine-tuned with another ``caption_mix`` or
    ``snr_shift`` or on the latents of a refined VAE (:func:`train_vae_refine`, which a VAE gets once), and
    ``unet_lr``, if given, starts a schedule of its own, ``unet_steps`` long; with another ``snr_shift``, from the
    saved U-Net retimed to it (:func:`retime_unet`).
    Either way the optimizer is fresh and the EMA starts from the weights; the training minutes, and a
    continuation's earlier history, carry over. The text projection, which a saved toy does not keep and training
    no longer uses, stays as built. A ``work`` seeded earlier is left as it is, so that a killed run resumes.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    model_dir, work = Path(model_dir), Path(work)
    if (work / "init.json").exists():
        return
    record_path = model_dir / "training.json"
    if not record_path.is_file():
        raise InputError(f"{model_dir} has no training.json: --init takes a folder written by train_toy_ldm.py")
    record = json.loads(record_path.read_text())
    # toys saved before these settings had 2 levels, no mixing, SD's schedule and an unrefined VAE
    saved = {"unet_attention_levels": 2, "caption_mix": 0.0, "snr_shift": 1.0, "vae_refine_steps": 0}
    saved.update(record["config"])
    settings = config_dict(config)
    grown = settings["unet_attention_levels"] > saved["unet_attention_levels"]
    retimed = settings["snr_shift"] != saved["snr_shift"]
    refined = settings["vae_refine_steps"] != saved["vae_refine_steps"]
    # a U-Net with a schedule of its own: grown, or fine-tuned with another caption_mix or snr_shift or on a refined
    # VAE's latents (at its own unet_lr)
    own = grown or retimed or refined or settings["caption_mix"] != saved["caption_mix"]
    free = ("unet_steps", "n_heldout", "unet_attention_levels", "caption_mix", "snr_shift", "vae_refine_steps")
    free += ("unet_lr",) if own else ()
    changed = sorted(k for k in settings if k not in free and saved.get(k) != settings[k])
    if settings["unet_attention_levels"] < saved["unet_attention_levels"]:  # a U-Net can grow, not shrink
        changed.append("unet_attention_levels")
    if refined and saved["vae_refine_steps"]:  # a VAE is refined once
        changed.append("vae_refine_steps")
    if changed:
        raise InputError(
            f"--init {model_dir}: a continuation takes the saved recipe with a longer --unet-steps (saved "
            f"{saved['unet_steps']}), or with more --unet-attention-levels (saved {saved['unet_attention_levels']}), "
            f"or with another --caption-mix (saved {saved['caption_mix']}) or --snr-shift (saved "
            f"{saved['snr_shift']}), or with a --vae-refine-steps (saved {saved['vae_refine_steps']}; once), and then "
            "any --unet-lr; these differ: "
            + ", ".join(f"--{k.replace('_', '-')} {settings[k]} (saved {saved.get(k)})" for k in changed)
        )
    if not own and settings["unet_steps"] <= saved["unet_steps"]:
        already = (
            f"its VAE is already refined ({saved['vae_refine_steps']} steps, as --vae-refine-steps asks), so "
            if saved["vae_refine_steps"]
            else ""
        )
        raise InputError(
            f"--init {model_dir}: {already}nothing would train: --unet-steps {settings['unet_steps']} is not past the "
            f"saved {saved['unet_steps']}; continue its U-Net with a longer --unet-steps"
        )
    if any(work.glob("*.pt")):
        raise InputError(f"--init needs an empty --work folder; {work} holds checkpoints")
    work.mkdir(parents=True, exist_ok=True)

    def state(model, step: int, **extra) -> dict:  # no optimizer state: train_toy's own starts fresh
        return {"model": model.state_dict(), "optimizer": None, "step": step, "loss": float("nan"), **extra}

    clip = build_clip(CLIPTokenizer.from_pretrained(model_dir / "tokenizer"), config)
    clip.text_model.load_state_dict(CLIPTextModel.from_pretrained(model_dir / "text_encoder").float().state_dict())
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(model_dir / "image_encoder").float()
    clip.vision_model.load_state_dict(image_encoder.vision_model.state_dict())
    clip.visual_projection.load_state_dict(image_encoder.visual_projection.state_dict())
    save_checkpoint(state(clip, config.clip_steps), work / "clip.pt")
    vae = AutoencoderKL.from_pretrained(model_dir / "vae").float()
    save_checkpoint(state(vae, config.vae_steps), work / "vae.pt")
    if saved["vae_refine_steps"] and not refined:  # refined already: train_toy's refinement is done
        save_checkpoint(state(vae, config.vae_refine_steps), work / "vae_refine.pt")
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").float()
    init = {"from": str(model_dir), "unet_steps": saved["unet_steps"]}
    if own:
        if grown:
            unet = grow_unet(unet, config)
        if retimed:
            retime_unet(unet, ddim_scheduler(saved["snr_shift"]), ddim_scheduler(config.snr_shift))
        saved_config = ToyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        # how the saved toy was made, for this one's card: its U-Net is where this run's starts
        init.update(
            grown_from_levels=saved["unet_attention_levels"],
            snr_shift_from=saved["snr_shift"],
            vae_refine_from=saved["vae_refine_steps"],
            runs=toy_reproduce(saved_config, record.get("unet_continued_from", []), record.get("init")),
        )
    ema = EMA(unet, config.ema_decay).state_dict()
    start = 0 if own else saved["unet_steps"]
    save_checkpoint(state(unet, start, ema=ema), work / "unet.pt")
    # a continuation's stamp says where the saved U-Net stopped, so train_toy continues it; a new schedule's is its own
    stamp = settings if own else {**settings, "unet_steps": start}
    (work / "config.json").write_text(json.dumps(stamp, indent=1))
    (work / "unet_history.json").write_text(json.dumps([] if own else record.get("unet_continued_from", [])))
    (work / "minutes.json").write_text(json.dumps({"minutes": record["train_minutes"]}))
    (work / "init.json").write_text(json.dumps(init))
