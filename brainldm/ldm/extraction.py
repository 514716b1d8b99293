"""The feature-extraction job: every stimulus of a prepared subject through the LDM (and the follow-up's BLIP and
DPT), into :class:`~brainldm.data.features.FeatureStore` folders, resumable and sharded over processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from brainldm.data.features import AUXILIARY, REDUCTIONS, FeatureSpec, FeatureStore, check_step
from brainldm.images import PREPROCESSING
from brainldm.ldm.captioner import BLIP_IMAGE_SIZE, BLIP_MODEL, blip_feature, load_captioner
from brainldm.ldm.depth import DPT_MODEL, dpt_feature, load_depth_model
from brainldm.ldm.features import encode_c, encode_z, img2img_latents
from brainldm.ldm.loading import ldm_sizes
from brainldm.presets import TAKAGI2023
from brainldm.validation import InputError, check_sampling

# --- extraction ----------------------------------------------------------------------------------------------


def auxiliary_features(
    specs: Sequence[FeatureSpec],
    captioner: str = BLIP_MODEL,
    depth_model: str = DPT_MODEL,
    device=None,
    blip_image_size: int = BLIP_IMAGE_SIZE,
) -> dict[str, tuple[dict, Callable]]:
    """The follow-up's extractors that ``specs`` need, as :func:`extract_features` takes them (``auxiliary``): BLIP's
    image embeddings from ``captioner`` at ``blip_image_size``, DPT's hidden states from ``depth_model``; each loaded
    only when a spec asks for it."""
    kinds = {spec.kind for spec in specs}
    auxiliary = {}
    if "blip" in kinds:
        model = load_captioner(captioner, device=device, image_size=blip_image_size)
        auxiliary["blip"] = blip_feature(model, captioner)
    if "dpt" in kinds:
        auxiliary["dpt"] = dpt_feature(load_depth_model(depth_model, device=device), depth_model)
    return auxiliary


def extract_features(
    ldm,
    model_id: str,
    nsd_ids: Sequence[int],
    get_item,
    specs: Sequence[FeatureSpec],
    out: str | Path,
    batch_size: int = 8,
    num_inference_steps: int = TAKAGI2023.sampling.num_inference_steps,
    guidance_scale: float = TAKAGI2023.sampling.guidance_scale,
    seed: int = TAKAGI2023.sampling.seed,
    unet_reduce: str = "mean",
    progress: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] | None = None,
    auxiliary: dict[str, tuple[dict, Callable]] | None = None,
) -> dict[str, FeatureStore]:
    """Compute the missing features of ``nsd_ids`` in batches and store them under ``out``.

    Args:
        ldm: a diffusers Stable Diffusion pipeline (see :func:`brainldm.ldm.loading.load_ldm`).
        model_id: recorded with the features, so stores of different models never mix.
        nsd_ids: unique image ids (of one subject or several: what a store holds already is not computed again).
        get_item: ``nsd_id -> (image, captions)``.
        specs: the feature spaces (see :class:`FeatureSpec`).
        process_index, num_processes, wait_for_everyone: data parallelism (accelerate's ``PartialState`` gives all
            three). The missing images are cut into the batches one process would run, and process k runs batches
            k, k + n, ...; each writes its own parts, and once ``wait_for_everyone()`` returns, process 0 merges
            them (:meth:`FeatureStore.merge_parts`) into the store one process would have written.
        auxiliary: for features of other models than the LDM (``blip``, ``dpt``), name -> (what their store records,
            such as the model id, and a function of a batch of images -> its features): :func:`auxiliary_features`.
    Returns:
        name -> FeatureStore (``written``: the images this process computed; ``reused``: those the store held).
    """
    if num_processes > 1 and wait_for_everyone is None:
        raise ValueError("several processes need wait_for_everyone, so that the parts are merged after all finish")
    if unet_reduce not in REDUCTIONS:
        raise InputError(f"unet_reduce must be one of {REDUCTIONS}, got {unet_reduce!r}")
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if any(spec.kind in ("zc", "unet") for spec in specs):
        check_sampling(ldm.scheduler, num_inference_steps, guidance_scale)

    auxiliary = auxiliary or {}
    for spec in specs:
        if spec.kind in AUXILIARY and spec.kind not in auxiliary:
            model = "BLIP captioner" if spec.kind == "blip" else "DPT depth model"
            raise InputError(f"{spec.name} features are computed by a {model}, and none was given")
    common = {"model_id": model_id, "z_image_size": ldm_sizes(ldm)[0]}
    run = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed}

    def config_of(spec: FeatureSpec) -> dict:
        """How the features are computed, as the store records it."""
        if (
            spec.kind in AUXILIARY
        ):  # wide targets, kept in half precision: DPT's are 4.7 MB a picture so, 47 GB a subject
            return dict(auxiliary[spec.kind][0], feature=spec.name, dtype="float16")
        config = dict(common, feature=spec.name, preprocessing=PREPROCESSING["c" if spec.kind == "c" else "z"])
        if spec.kind in ("zc", "unet"):
            config.update(run, strength=spec.strength)
        if spec.kind == "unet":
            config["unet_reduce"] = unet_reduce
            check_step(spec, num_inference_steps)
        return config

    # every process checks (or writes, atomically and identically) each config.json, so a mismatch stops them all
    part = process_index if num_processes > 1 else None
    stores = {spec.name: FeatureStore(out, spec.name, config_of(spec), part) for spec in specs}

    missing = {name: store.missing(nsd_ids) for name, store in stores.items()}
    for name, store in stores.items():
        store.reused = len(nsd_ids) - len(missing[name])
    todo = sorted({i for ids in missing.values() for i in ids})
    if num_processes > 1:
        wait_for_everyone()  # every process has listed the stores before any writes: all cut the same batches
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    mine = batches[process_index::num_processes]
    desc = "features" if num_processes == 1 else f"features [{process_index}]"
    bar = tqdm(total=sum(map(len, mine)), desc=desc, unit="image", disable=not progress)
    for batch in mine:
        images, captions = zip(*(get_item(i) for i in batch))
        need = {name for name, store in stores.items() if store.missing(batch)}
        from_ldm = need - {"c", *AUXILIARY}
        z = encode_z(ldm, images) if from_ldm else None
        c = encode_c(ldm, captions) if from_ldm - {"z"} or "c" in need else None
        computed = {"z": z, "c": c}
        computed.update({name: auxiliary[name][1](images) for name in need & set(AUXILIARY)})
        strengths = sorted({stores[n].config["strength"] for n in need if "strength" in stores[n].config})
        for strength in strengths:
            taps = [s for s in specs if s.name in need and s.kind == "unet" and s.strength == strength]
            zc, recorded = img2img_latents(
                ldm, z, c, batch, strength, num_inference_steps, guidance_scale, seed, taps, unet_reduce
            )
            computed.update(recorded)
            computed[f"zc@{strength:g}"] = zc
        for name in need:
            missing = set(stores[name].missing(batch))
            rows = [k for k, i in enumerate(batch) if i in missing]
            stores[name].write([batch[k] for k in rows], computed[name][rows])
        bar.update(len(batch))
    bar.close()
    if num_processes > 1:
        wait_for_everyone()
    if process_index == 0:
        for store in stores.values():
            store.merge_parts()  # also finishes the merge of an earlier killed sharded run
    if num_processes > 1:
        wait_for_everyone()  # every process returns stores that read the merged shards
        for store in stores.values():
            store.refresh()
    return stores
