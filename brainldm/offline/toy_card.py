"""The model card of ``toy``, the offline LDM (:mod:`brainldm.offline.toy`): how it was trained and what it scores,
with the command that reproduces it.
"""

from __future__ import annotations

from dataclasses import asdict

from brainldm.cards import LIBRARY


def toy_reproduce(config, continued: list[int] = (), init: dict | None = None) -> list[str]:
    """The commands that made a toy (``config``: its :class:`~brainldm.offline.toy_parts.ToyConfig`; ``continued`` and
    ``init`` as
    :func:`toy_card` takes them), in order."""
    steps = [*continued, config.unet_steps]
    defaults = type(config)()
    flags = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in asdict(config).items()
        if k not in ("n_heldout", "unet_steps") and v != getattr(defaults, k)
    ]
    command = "python scripts/train_toy_ldm.py --out brainldm/models/toy " + " ".join(flags)
    runs = [f"{command} --unet-steps {n}".replace("  ", " ") for n in steps]
    if init:
        # the run that started from the saved toy (after its step count; a grown U-Net's first) took --init; any
        # later run resumed in the same work folder
        first = 0 if "runs" in init else steps.index(init["unet_steps"]) + 1
        runs[first] += f" --init {init['from']} --work NEW_FOLDER"
        for i in range(first + 1, len(runs)):
            runs[i] += " --work NEW_FOLDER"
        runs = [*init.get("runs", []), *runs]
    return runs


def toy_card(
    config,
    scores: dict[str, float],
    minutes: float,
    device: str,
    size_mb: float,
    continued: list[int] = (),
    init: dict | None = None,
) -> str:
    """The shipped ``toy`` model's README (``config``: its :class:`~brainldm.offline.toy_parts.ToyConfig`): how it was
    trained and what it scores. ``continued``: the U-Net step counts of earlier runs it was continued from; ``init``:
    the saved toy (``{"from", "unet_steps"}``) whose weights a run started from (``--init``), if any; a grown U-Net's
    also holds ``grown_from_levels`` and ``runs``, the commands that made that toy."""
    settings = "\n".join(f"| `{k}` | {v} |" for k, v in asdict(config).items())
    runs = toy_reproduce(config, continued, init)
    reproduce = " then ".join(f"`{run}`" for run in runs)
    legs = " -> ".join(str(n) for n in [*continued, config.unet_steps])
    then_continued = (
        f" then continued with a longer `--unet-steps`, {legs} steps (each continuation restarts the learning-rate "
        "schedule at its step on the longer run's cosine)."
        if continued
        else ""
    )
    continuation = f" The U-Net was trained to {continued[0]} steps,{then_continued}" if continued else ""
    own_schedule = bool(init and "runs" in init)  # a U-Net grown or fine-tuned from a saved toy
    # this run refined the saved toy's VAE (rather than its recipe refining its own)
    refined_here = own_schedule and init.get("vae_refine_from", 0) != config.vae_refine_steps
    if own_schedule:
        first = continued[0] if continued else config.unet_steps
        grown = config.unet_attention_levels - init["grown_from_levels"]
        made = f"the toy the first {len(init['runs'])} commands below make ({init['unet_steps']} steps"
        how = (
            f"grown from {made}, cross-attention at its {init['grown_from_levels']} coarsest levels): cross-attention "
            f"added at {grown} finer level(s), their output projections zeroed so that it started as that model, then"
            if grown
            else f"fine-tuned from {made}):"
        )
        continuation = (
            f" Its U-Net was {how} trained {first} steps on a schedule of its own (`--init`, a fresh optimizer, the "
            "EMA started from the saved weights, the latents encoded again by the "
            + ("refined" if refined_here else "saved")
            + " VAE)."
            + (f" That U-Net was{then_continued}" if continued else "")
        )
    elif init:
        later = init["unet_steps"] != continued[-1]  # runs after the one --init started resumed its work folder
        continuation += (
            f" The run from {init['unet_steps']} steps started from the saved float16 weights (`--init`: a fresh "
            "optimizer, the EMA started from the saved weights, the latents encoded again by the saved VAE)"
            + ("; later runs resumed its work folder." if later else ".")
        )
    if config.caption_mix:
        continuation += (
            f" {'That schedule' if own_schedule else 'Training'} moved each condition by up to "
            f"{config.caption_mix:g} x the difference of two random pictures' mean captions (`caption_mix`): a "
            "decoded c is off by other pictures' meaning, and must still draw its own picture."
        )
    if config.snr_shift != 1:
        side = config.image_size // 8
        retimed = bool(init) and init.get("snr_shift_from", config.snr_shift) != config.snr_shift
        continuation += (
            f" Its noise schedule is SD's with every timestep's signal-to-noise ratio x {config.snr_shift:g} "
            f"(`snr_shift`): its {side} x {side} latents have {(64 / side) ** 2:g} x fewer pixels than SD's 64 x 64, "
            "so the same noise hides more of their layout: under SD's schedule img2img at the paper's strength kept "
            "less of Xz."
            + (
                f" The saved U-Net's time embedding was first refitted (`retime_unet`) to read each new timestep as it "
                f"read the one with the same signal-to-noise ratio under x {init['snr_shift_from']:g}, so that it "
                "started as that model."
                if retimed
                else ""
            )
        )
    if config.vae_refine_steps:
        when = "For that fine-tune" if refined_here else "After its own steps,"
        continuation += (
            f" {when} its VAE was refined {config.vae_refine_steps} steps (`vae_refine_steps`): trained on crops "
            "mirrored left-right half the time, its latents pulled towards the unrefined encoder's so that they barely "
            "moved. Snakes' stripes run one diagonal, giraffes' chequerboards both, so a VAE trained on the pictures "
            "alone saw the second diagonal only inside chequerboards, kept little of it, and drew giraffes as snakes."
        )
    return f"""---
license: mit
library_name: diffusers
pipeline_tag: text-to-image
tags: [{LIBRARY}, toy, offline]
---

# toy: brainldm's offline latent diffusion model

A small Stable-Diffusion-shaped model (CLIP text and vision towers, `AutoencoderKL`, `UNet2DConditionModel`, DDIM)
trained from scratch by `scripts/train_toy_ldm.py` on the offline world's synthetic pictures and captions
(`brainldm.offline.synthetic.draw_picture`). It exists so that offline reconstructions, encoding maps and tests can
check meaning, not only shapes. It knows nothing of natural images.

- Output {config.image_size} px; z is encoded at {config.image_size * 5 // 8} px (SD: 320 of 512).
- Text tower: `CLIPTextModel`, hidden size {config.text_hidden}, so c is 77 x {config.text_hidden}; BPE merges learnt
  from the captions. Vision tower with projection (`image_encoder`): the offline stand-in for CLIP ViT-L/14.
- Weights stored in float16 ({size_mb:.1f} MB in all).
- Trained on {device} in {minutes:.1f} minutes, seed {config.seed}.{continuation}

## Scores on {config.n_heldout} held-out pairs

| figure | value |
|---|---|
| VAE PixCorr at {config.image_size} px (round trip) | {scores["vae_pixcorr"]:.3f} |
| VAE PixCorr at {config.image_size * 5 // 8} px (z's size) | {scores["vae_pixcorr_z"]:.3f} |
| text-to-image from true captions, toy-CLIP 2-way identification | {100 * scores["t2i_clip_id"]:.1f}% |
| text-to-image from true captions, pixel 2-way identification | {100 * scores["t2i_pixel_id"]:.1f}% |

Text-to-image: c = the mean caption embedding, {scores.get("t2i_steps", 50)} DDIM steps, guidance \
{scores.get("t2i_guidance", 5.0):g}, seed {config.seed}; chance is 50%.

## Training settings

| setting | value |
|---|---|
{settings}

Reproduce: {reproduce} (seeded; resumable from its `.work` folder).
"""
