"""Every card brainldm writes, in one place: the subject maps' model card, the trials' dataset card and the ``toy``
model's README, with what they share (NSD's terms, the tags, the paper).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

LIBRARY = "brainldm"
TAGS = ["fmri", "neuroscience", "natural-scenes-dataset", LIBRARY]
NSD_TERMS = ("nsd-terms-and-conditions", "https://cvnlab.slite.page/p/IB6BSeW_7o/Terms-and-Conditions")
PAPER_URL = "https://doi.org/10.1101/2022.11.18.517004"  # Takagi & Nishimoto, the preprint of the CVPR 2023 paper
GATED_PROMPT = (
    "These are data of the Natural Scenes Dataset (NSD). NSD is shared under the NSD Terms and Conditions; to "
    "access these files you must agree to them."
)


def maps_card(cfg, repo_id: str) -> ModelCard:
    """The card of subject maps described by ``cfg`` (a :class:`~brainldm.maps.MapsConfig`); ``repo_id`` fills in its
    usage example."""
    from .ldm import MODEL_LICENSES

    data_id = cfg.data or "<user>/nsd-trials"
    base_model = cfg.model_id if "/" in cfg.model_id and not Path(cfg.model_id).exists() else None
    model_licence = MODEL_LICENSES.get(cfg.model_id)
    results = [
        EvalResult(
            task_type="brain-decoding",
            task_name=f"fMRI to {name} ({t.roi} voxels)",
            dataset_type=cfg.data or "nsd",
            dataset_name=f"NSD subject {cfg.subject}, shared images",
            dataset_split="test",
            metric_type=metric,
            metric_name=f"{name}: {title}",
            metric_value=round(cfg.scores[name][key], 4),
        )  # fmt: skip
        for name, t in cfg.targets.items()
        if "identification" in cfg.scores.get(name, {})
        for key, metric, title in (
            ("dimension_r", "pearsonr", "mean r per dimension"),
            ("pattern_r", "pearsonr", "mean r per image"),
            ("identification", "accuracy", "2-way identification"),
        )
    ]
    data = ModelCardData(
        library_name=LIBRARY,
        license="other",
        license_name=NSD_TERMS[0],
        license_link=NSD_TERMS[1],
        base_model=base_model,
        datasets=[cfg.data] if cfg.data else None,
        tags=[*TAGS, "brain-decoding", "stable-diffusion"],
        metrics=["pearsonr", "accuracy"],
        model_name=f"brainldm subject {cfg.subject} maps" if results else None,
        eval_results=results or None,
    )
    targets = "\n".join(
        f"- **{name}** ({' x '.join(map(str, t.shape))}) from {t.n_voxels} {t.roi} voxels, "
        f"{'rank ' + str(t.rank) if t.rank else 'dense'}"
        for name, t in cfg.targets.items()
    )
    spreads = [
        f"{name} {100 * t.spread['prediction_std'] / t.spread['target_std']:.0f}%"
        for name, t in cfg.targets.items()
        if t.spread
    ]
    rescaling = (
        "Ridge shrinks predictions towards the mean: on held-out folds they spread "
        f"{', '.join(spreads)} as much as the training targets. The maps store the statistics to undo that (the "
        "training targets' and the out-of-fold predictions' mean and std per dimension, fitted without the test set): "
        '`maps.predict(betas, rescale="dimension")` (per dimension, as Brain-Diffuser) or `rescale="target"` (one '
        "factor per target). By default predictions are used as fitted, as Takagi & Nishimoto did."
        if spreads
        else "These maps carry no rescaling statistics (fitted before brainldm stored them)."
    )
    rows = "\n".join(
        f"| {name} | {s['dimension_r']:.3f} | {s['pattern_r']:.3f} | {100 * s['identification']:.1f}% |"
        for name, s in cfg.scores.items()
        if "identification" in s
    )
    licence = (
        f"The LDM `{cfg.model_id}` is under its own licence, [{model_licence[0]}]({model_licence[1]})."
        if model_licence
        else f"The LDM `{cfg.model_id}` is under its own licence."
    )
    content = f"""---
{data.to_yaml()}
---

# brainldm subject maps: NSD subject {cfg.subject}

Linear maps from fMRI betas to the conditioning targets of the latent diffusion model `{cfg.model_id}`, fitted
with brainldm (`scripts/fit_maps.py`) following Takagi & Nishimoto, CVPR 2023 ([paper]({PAPER_URL})):

{targets}

Ridge regression, alpha per target by grouped {cfg.cv}-fold CV over {len(cfg.alphas)} alphas; voxels standardised
on the training trials ({cfg.n_train} single trials). Weights stored in {cfg.storage_dtype}.

{rescaling}

## Test scores ({cfg.n_test} shared images, betas averaged over repetitions)

| target | mean r per dimension | mean r per image | 2-way identification |
|---|---|---|---|
{rows}

## Usage

```python
from brainldm.data import load_trials, load_voxels
from brainldm.maps import SubjectMaps

maps = SubjectMaps.from_pretrained("{repo_id}")
test = load_trials("{data_id}", subject={cfg.subject}, split="test").with_format("numpy")
decoded = maps.predict(test["betas"][:4], voxels=load_voxels("{data_id}", {cfg.subject}))
z, c = decoded["z"], decoded["c"]
```

## Licence

These maps are derived from the Natural Scenes Dataset and are shared under the
[NSD Terms and Conditions]({NSD_TERMS[1]}): anyone using them must agree to those terms. {licence}
"""
    return ModelCard(content)


def dataset_card(infos: dict[str, dict], repo_id: str = "<user>/nsd-trials") -> DatasetCard:
    """The dataset card: one config per prepared subject (the first is the default), NSD's terms as gated access."""
    configs = [
        {"config_name": name, "data_files": [{"split": s, "path": f"{name}/{s}-*.parquet"} for s in ("train", "test")]}
        for name in sorted(infos)
    ]
    if configs:
        configs[0]["default"] = True  # `load_dataset(repo)` without a config name loads the first subject
    data = DatasetCardData(
        license="other",
        license_name=NSD_TERMS[0],
        license_link=NSD_TERMS[1],
        pretty_name="NSD trials for brainldm",
        task_categories=["image-to-image"],
        tags=TAGS,
        configs=configs,
        extra_gated_prompt=GATED_PROMPT,
        extra_gated_fields={f"I agree to the NSD Terms and Conditions ({NSD_TERMS[1]})": "checkbox"},
    )
    table = "\n".join(
        f"| {name} | {i['n_train']} | {i['n_test']} | {i['n_voxels']} | {len(i['sessions'])} | "
        f"{'yes' if i['zscore'] else 'no'} |"
        for name, i in sorted(infos.items())
    )
    content = f"""---
{data.to_yaml()}
---

# NSD trials for brainldm

Single-trial fMRI responses from the [Natural Scenes Dataset](https://naturalscenesdataset.org/) (Allen et al.,
2022), with the COCO images and captions each subject saw, prepared by
brainldm's `scripts/prepare_nsd.py` for image reconstruction with latent diffusion
(Takagi & Nishimoto, CVPR 2023).

**Terms of use.** NSD is shared under the [NSD Terms and Conditions]({NSD_TERMS[1]}); anyone using these data
must agree to them, which is why access to this repo is gated. COCO images and captions are under their own
licences.

| config | train rows | test rows | voxels | sessions | z-scored |
|---|---|---|---|---|---|
{table}

- `train`: one row per single trial of an image not in NSD's shared 1000.
- `test`: one row per shared image seen in the used sessions; `betas` averaged over its `n_reps` repetitions.

Columns: `nsd_id` (0-based 73k id), `coco_id`, `image` (the stimulus as stored in nsd_stimuli.hdf5),
`captions` (all COCO captions, stripped), `n_reps`, `trials` (1-based NSD trial numbers used), `sessions` (the
session of each), `betas` (float32 over the subject's stored voxels: nsdgeneral or any `streams` ROI; percent signal
change, z-scored per voxel within each session unless the table says otherwise). `subjNN/voxels.safetensors` holds
the voxel table (ijk in the func1pt8mm grid, affine, nsdgeneral and streams labels); load it with
`brainldm.data.load_voxels`.
`subjNN-wholebrain` configs hold every voxel inside the brain instead (for whole-brain encoding models).

```python
from brainldm.data import load_trials, load_voxels
test = load_trials("{repo_id}", subject=1, split="test")  # downloads only subj01's test shards
voxels = load_voxels("{repo_id}", subject=1)
```
"""
    return DatasetCard(content)


def toy_reproduce(config, continued: list[int] = (), init: dict | None = None) -> list[str]:
    """The commands that made a toy (``config``: its :class:`~brainldm.toy.ToyConfig`; ``continued`` and ``init`` as
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
    """The shipped ``toy`` model's README (``config``: its :class:`~brainldm.toy.ToyConfig`): how it was trained and
    what it scores. ``continued``: the U-Net step counts of earlier runs it was continued from; ``init``: the saved
    toy (``{"from", "unet_steps"}``) whose weights a run started from (``--init``), if any; a grown U-Net's
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
(`brainldm.synthetic.draw_picture`). It exists so that offline reconstructions, encoding maps and tests can check
meaning, not only shapes. It knows nothing of natural images.

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
