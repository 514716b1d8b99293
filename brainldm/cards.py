"""The cards brainldm publishes on the Hub: the subject maps' model card and the trials' dataset card, with what every
card shares (NSD's terms, the tags, the paper; the offline wing's model card uses them too).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

LIBRARY = "brainldm"
TAGS = ["fmri", "neuroscience", "natural-scenes-dataset", LIBRARY]
NSD_TERMS = ("nsd-terms-and-conditions", "https://cvnlab.slite.page/p/IB6BSeW_7o/Terms-and-Conditions")
PAPER_URL = "https://doi.org/10.1101/2022.11.18.517004"  # Takagi & Nishimoto, the preprint of the CVPR 2023 paper
# (licence name, link) of LDMs on the Hub, for the model cards of maps fitted to their features
MODEL_LICENSES = {
    "CompVis/stable-diffusion-v1-4": (
        "creativeml-openrail-m",
        "https://huggingface.co/spaces/CompVis/stable-diffusion-license",
    ),
}
# NSD's Terms and Conditions, clause 3: why a trials dataset (betas) is pushed private unless asked otherwise
NSD_CLAUSE_3 = "I will not distribute this dataset or its components to any other individual or entity."
PUBLIC_WARNING = (
    f'NSD\'s Terms and Conditions (clause 3) say: "{NSD_CLAUSE_3}" A public repo, even gated, hands these betas to '
    "anyone who ticks its box; make it public only if your agreement with NSD allows it."
)
GATED_PROMPT = (
    "These are data of the Natural Scenes Dataset (NSD). NSD is shared under the NSD Terms and Conditions; to "
    "access these files you must agree to them."
)


def maps_card(cfg, repo_id: str) -> ModelCard:
    """The card of subject maps described by ``cfg`` (a :class:`~brainldm.decoding.maps.MapsConfig`); ``repo_id`` fills
    in its
    usage example."""

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
from brainldm.data.trials import load_trials, load_voxels
from brainldm.decoding.maps import SubjectMaps

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


def dataset_card(infos: dict[str, dict], repo_id: str = "<user>/nsd-trials", public: bool = False) -> DatasetCard:
    """The dataset card: one config per prepared subject (the first is the default) and NSD's terms: for a private
    repo (the default) why it is private, for a ``public`` one the gate's form and clause 3 beside it."""
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
        **(
            dict(
                extra_gated_prompt=GATED_PROMPT,
                extra_gated_fields={f"I agree to the NSD Terms and Conditions ({NSD_TERMS[1]})": "checkbox"},
            )
            if public
            else {}
        ),
    )
    if public:
        access = f"which is why access to this repo is gated. {PUBLIC_WARNING}"
    else:
        access = (
            f'and their clause 3 says: "{NSD_CLAUSE_3}" So this repo is private: give access only to people '
            "covered by your agreement with NSD (a Space reads it with an `HF_TOKEN` secret)."
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
must agree to them, {access} COCO images and captions are under their own licences.

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
`brainldm.data.trials.load_voxels`.
`subjNN-wholebrain` configs hold every voxel inside the brain instead (for whole-brain encoding models).

```python
from brainldm.data.trials import load_trials, load_voxels
test = load_trials("{repo_id}", subject=1, split="test")  # downloads only subj01's test shards
voxels = load_voxels("{repo_id}", subject=1)
```
"""
    return DatasetCard(content)
