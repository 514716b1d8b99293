"""``toy``: the offline world's trained latent diffusion model, and how it is trained.

A Stable-Diffusion-shaped model small enough to train in minutes on a GPU (a CPU-sized run takes 45 minutes on 2
cores and scores lower), on the offline world's pictures and captions
(:func:`brainldm.offline.synthetic.draw_picture`). Its
parts are the ones SD has, in the classes diffusers and transformers use for SD, so every code path of brainldm
runs on it unchanged:

- a CLIP pair (``CLIPModel``) trained contrastively on (picture, caption) pairs; its text tower
  (``text_encoder``, last hidden states = c) conditions the U-Net, its vision tower with projection
  (``image_encoder``) is the offline stand-in for the CLIP ViT-L/14 metric;
- a VAE (``AutoencoderKL``, downsampling by 8) with ``scaling_factor`` set so scaled latents have unit variance;
- a ``UNet2DConditionModel`` trained with the noise-prediction loss on VAE latents, conditioned on the frozen
  text tower, with 10% empty captions so classifier-free guidance works; SD's DDIM scheduler, every timestep's
  signal-to-noise ratio multiplied by ``snr_shift`` (written into the saved scheduler's ``trained_betas``).

Sizes keep the paper's proportions at 128 px output: z from the picture at 80 px (SD: 320 of 512). They travel
with the model (the U-Net's ``sample_size`` times the VAE's factor, see :func:`brainldm.ldm.loading.ldm_sizes`).

Here is the whole run (:func:`train_toy`: every phase, checkpointed and resumable, then the model saved with its card
and scores, :func:`score_toy`). Its parts are :mod:`brainldm.offline.toy_parts`, its training phases
:mod:`brainldm.offline.toy_training` (each a pure loop over the models passed in; every step's randomness comes from
``(seed, phase, step)``, so a resumed run continues exactly where a killed one stopped), and continuing a saved toy
:mod:`brainldm.offline.toy_growth`.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from brainldm.analysis.extractors import clip_extractor
from brainldm.ldm.features import encode_c, encode_z
from brainldm.ldm.loading import load_ldm
from brainldm.ldm.reconstruct import Reconstructor
from brainldm.metrics import pixcorr, two_way_identification
from brainldm.offline.toy_card import toy_card
from brainldm.offline.toy_parts import (
    EMA,
    ToyConfig,
    build_clip,
    build_unet,
    build_vae,
    caption_tokenizer,
    config_dict,
    draw_pairs,
    load_checkpoint,
    resize,
    save_checkpoint,
    split_clip,
)
from brainldm.offline.toy_training import (
    Stage,
    encode_latents,
    encode_text,
    tokenize,
    train_clip,
    train_unet,
    train_vae,
    train_vae_refine,
)
from brainldm.offline.twins import ddim_scheduler
from brainldm.paths import atomic_path
from brainldm.presets import TAKAGI2023, Sampling
from brainldm.torch_utils import default_device
from brainldm.validation import InputError

# --- scores ------------------------------------------------------------------------------------------------


def score_toy(
    ldm,
    image_encoder,
    pictures: np.ndarray,
    captions: list[list[str]],
    steps: int = TAKAGI2023.sampling.num_inference_steps,
    guidance_scale: float = TAKAGI2023.sampling.guidance_scale,
    seed: int = 0,
) -> dict[str, float]:
    """The model card's figures on held-out pairs (uint8 pictures at the output size and their captions):

    - ``vae_pixcorr``: mean PixCorr of VAE round trips at the output size (and ``vae_pixcorr_z`` at z's size);
    - ``t2i_clip_id`` / ``t2i_pixel_id``: 2-way identification of text-to-image generations from the mean
      caption embedding (c), in the toy vision tower's space and in pixel space (chance 0.5);
    - ``t2i_steps`` / ``t2i_guidance``: the sampling settings of those generations.
    """

    recon = Reconstructor(ldm)
    size, z_size = recon.output_size, recon.z_image_size
    scores = {}
    for key, s in (("vae_pixcorr", size), ("vae_pixcorr_z", z_size)):
        originals = resize(pictures, s) if s != pictures.shape[1] else pictures
        vae = ldm.vae
        with torch.no_grad():
            z = encode_z(ldm, list(originals), image_size=s)
            out = vae.decode(z.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
        back = ((out.float().clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(0, 2, 3, 1).cpu().numpy()
        scores[key] = float(np.mean([pixcorr(a, b) for a, b in zip(back, originals)]))
    c = encode_c(ldm, captions)
    z = encode_z(ldm, list(pictures), image_size=z_size)
    sampling = Sampling(guidance_scale=guidance_scale, num_inference_steps=steps, seed=seed)
    generated = recon(z, c, sampling, include_xzc=False).Xc[:, 0]
    scores["t2i_steps"], scores["t2i_guidance"] = steps, guidance_scale

    extract = clip_extractor(image_encoder)
    scores["t2i_clip_id"] = float(two_way_identification(extract(list(generated)), extract(list(pictures))).mean())
    scores["t2i_pixel_id"] = float(
        two_way_identification(generated.reshape(len(generated), -1), pictures.reshape(len(pictures), -1)).mean()
    )
    return scores


def train_toy(
    config: ToyConfig,
    out: str | Path,
    work: str | Path,
    device: str | None = None,
    eval_steps: int = TAKAGI2023.sampling.num_inference_steps,
) -> None:
    """Train toy with ``config`` into the diffusers folder ``out``, checkpointing every phase into ``work``.

    Phases: draw pictures and captions -> CLIP pair (contrastive) -> VAE (and its refinement, if
    ``vae_refine_steps``) -> encode latents -> U-Net (noise
    prediction, conditioned on the frozen text tower, EMA) -> save in diffusers format (fp16 safetensors) -> score on
    held-out pairs (``eval_steps`` DDIM steps) -> model card. Seeded and resumable: a rerun continues where a killed
    run stopped, and does nothing if it finished and ``out`` still holds its model; a rerun with other settings into
    the same ``work`` is refused, naming them. A ``work`` seeded by :func:`seed_work_from_model` continues a saved
    toy's U-Net.
    """
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    t0 = time.time()
    device = default_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    stamp = work / "config.json"
    stored, settings = (json.loads(stamp.read_text()) if stamp.exists() else None), config_dict(config)
    history_path = work / "unet_history.json"  # the U-Net step counts earlier runs in ``work`` were continued from
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    if stored is not None and {k for k in settings if stored.get(k) != settings.get(k)} == {"unet_steps"}:
        if settings["unet_steps"] > stored["unet_steps"]:  # a longer U-Net: every earlier phase is reused
            print(f"continuing the U-Net from {stored['unet_steps']} steps to {config.unet_steps}")
            history.append(stored["unet_steps"])
            history_path.write_text(json.dumps(history))
            stored = settings
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
    stamp.write_text(json.dumps(settings, indent=1))
    finished = work / "finished.json"  # where the last run in ``work`` to finish saved its model, and its record
    if finished.exists():
        last = json.loads(finished.read_text())
        record = out / "training.json"
        if (
            last["out"] == str(out.resolve())
            and last["record"]["config"] == settings
            and record.is_file()
            and json.loads(record.read_text()) == last["record"]
        ):
            print(f"{out} already holds the model this run makes (finished in {work}): nothing to do")
            return
    print(f"training toy on {device}; checkpoints in {work}")

    # 1. pictures and captions
    data = work / "pairs.npz"
    if not data.exists():
        train_pics, train_caps = draw_pairs(config.n_train, config.seed, config.image_size)
        held_pics, held_caps = draw_pairs(config.n_heldout, config.seed + 1_000_000, config.image_size)
        tmp = work / "pairs.tmp.npz"
        np.savez(
            tmp, train=train_pics, heldout=held_pics, captions=json.dumps({"train": train_caps, "heldout": held_caps})
        )
        tmp.replace(data)
    with np.load(data) as f:
        pictures, heldout = f["train"], f["heldout"]
        captions = json.loads(str(f["captions"]))
    print(f"{len(pictures)} training and {len(heldout)} held-out pictures ({time.time() - t0:.0f} s)")

    tokenizer = caption_tokenizer(captions["train"])
    owner = np.concatenate([np.full(len(c), i) for i, c in enumerate(captions["train"])])
    token_ids = tokenize(tokenizer, [c for caps in captions["train"] for c in caps])

    # 2. CLIP pair
    torch.manual_seed(config.seed)
    clip = build_clip(tokenizer, config).to(device)
    opt = torch.optim.AdamW(clip.parameters(), lr=config.clip_lr, weight_decay=0.1)
    start = _resume(work / "clip.pt", clip, opt)
    vision_pics = resize(pictures, config.vision_size)
    with tqdm(total=config.clip_steps, initial=start, desc="CLIP pair") as bar:
        stage = Stage(opt, config, device, start, _checkpointer(work / "clip.pt", clip, opt), progress=bar)
        train_clip(clip, token_ids, owner, vision_pics, stage)
    text_encoder, image_encoder = (m.to(device) for m in split_clip(clip.cpu()))

    # 3. VAE
    torch.manual_seed(config.seed + 1)
    vae = build_vae(config).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start = _resume(work / "vae.pt", vae, opt)
    with tqdm(total=config.vae_steps, initial=start, desc="VAE") as bar:
        stage = Stage(opt, config, device, start, _checkpointer(work / "vae.pt", vae, opt), progress=bar)
        train_vae(vae, pictures, stage)
    if config.vae_refine_steps:
        anchor = copy.deepcopy(vae).requires_grad_(False)  # the VAE as its own phase left it
        opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr / 4, weight_decay=0.0)
        start = _resume(work / "vae_refine.pt", vae, opt)
        with tqdm(total=config.vae_refine_steps, initial=start, desc="VAE refinement") as bar:
            stage = Stage(opt, config, device, start, _checkpointer(work / "vae_refine.pt", vae, opt), progress=bar)
            train_vae_refine(vae, anchor, pictures, stage)

    # 4. latents of the training pictures, and the scaling factor that gives them unit variance
    latents_path = work / "latents.pt"
    if not latents_path.exists():
        with tqdm(total=len(pictures), desc="latents") as bar:
            save_checkpoint(encode_latents(vae, pictures, device, progress=bar), latents_path)
    latents = load_checkpoint(latents_path)
    scaling_factor = float(1.0 / latents.std())
    latents = latents * scaling_factor

    # 5. U-Net
    torch.manual_seed(config.seed + 2)
    unet = build_unet(config).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.01)
    ema = EMA(unet, config.ema_decay)
    start = _resume(work / "unet.pt", unet, opt, ema)
    with tqdm(total=len(token_ids), desc="caption states") as bar:
        states = encode_text(text_encoder, token_ids, device, progress=bar)
    empty = encode_text(text_encoder, tokenize(tokenizer, [""]), device)[0]
    if device.type == "cuda":
        states = states.to(device)
    with tqdm(total=config.unet_steps, initial=start, desc="U-Net") as bar:
        stage = Stage(opt, config, device, start, _checkpointer(work / "unet.pt", unet, opt, ema), progress=bar)
        train_unet(unet, ema, latents, states, owner, empty, ddim_scheduler(config.snr_shift), stage)
    ema.copy_to(unet)
    minutes_path = work / "minutes.json"  # training time of earlier runs in ``work`` that finished the U-Net
    init_path = work / "init.json"  # written by seed_work_from_model: the saved toy this run continued
    init = json.loads(init_path.read_text()) if init_path.exists() else None
    carried = minutes_path.exists() and (history or init and "runs" in init)
    earlier = json.loads(minutes_path.read_text())["minutes"] if carried else 0.0
    minutes = earlier + (time.time() - t0) / 60
    minutes_path.write_text(json.dumps({"minutes": minutes}))

    # 6. save (fp16), reload as any diffusers model is loaded, score, write the card
    from diffusers import StableDiffusionImg2ImgPipeline

    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim_scheduler(config.snr_shift),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    ).to(dtype=torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)

    ldm = load_ldm(str(tmp), device=device, dtype=torch.float32)
    print("scoring on held-out pairs ...")
    scores = score_toy(ldm, ldm.image_encoder, heldout, captions["heldout"], steps=eval_steps, seed=config.seed)
    for k, v in scores.items():
        print(f"  {k}: {v:.3f}")
    size_mb = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()) / 1e6
    (tmp / "README.md").write_text(toy_card(config, scores, minutes, str(device), size_mb, history, init))
    record = {
        "config": config_dict(config),
        "scores": scores,
        "train_minutes": minutes,
        "device": str(device),
        "unet_continued_from": history,
        "init": init,
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    with atomic_path(finished) as tmp_finished:  # a half-written record would stop every later rerun
        tmp_finished.write_text(json.dumps({"out": str(out.resolve()), "record": record}))
    print(f"wrote {out} ({size_mb:.1f} MB) in {(time.time() - t0) / 60:.1f} min")


def _resume(path: Path, model, optimizer, ema=None) -> int:
    state = load_checkpoint(path)
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    if state["optimizer"] is not None:  # None: seeded from a saved model (seed_work_from_model)
        optimizer.load_state_dict(state["optimizer"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return int(state["step"])


def _checkpointer(path: Path, model, optimizer, ema=None):
    def checkpoint(step: int, loss: float) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "loss": loss}
        if ema is not None:
            state["ema"] = ema.state_dict()
        save_checkpoint(state, path)

    return checkpoint
