"""The test-set reconstruction job: every test trial of a subject decoded by its maps and reconstructed by the LDM
(:func:`reconstruct_trials`, behind ``scripts/reconstruct.py``), one folder per trial in the format
:mod:`brainldm.reconstruction.folders` owns, resumable and sharded over processes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from brainldm.data.features import AUXILIARY
from brainldm.data.trials import load_trials, load_voxels
from brainldm.ldm.depth import depth_image
from brainldm.ldm.reconstruct import FollowUp, Reconstructor
from brainldm.presets import TAKAGI2023, Sampling
from brainldm.reconstruction.folders import (
    finished_trials,
    is_done,
    subject_folder,
    trial_folder,
    trial_row,
    write_trial,
)
from brainldm.validation import InputError

# what a trial's meta.json records of how it was made; a folder's finished trials must agree on all of it
SETTINGS = (*(f.name for f in fields(Sampling)), "model_id", "output_size", "rescale", "noise", "followup")


def reconstruct_trials(
    reconstructor: Reconstructor,
    maps,
    data: str | Path,
    subject: int,
    out: str | Path,
    split: str = "test",
    rows: Sequence[int] | None = None,
    sampling: Sampling = TAKAGI2023.sampling,
    rescale: str | None = TAKAGI2023.rescale,
    batch_size: int = 1,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    followup: FollowUp | None = None,
) -> list[Path]:
    """Reconstruct trials of a split into ``OUT/subjNN/<split>-<row>/``: original, Xz, Xc_k and Xzc_k PNGs, the
    decoded z.npy and c.npy (fp16), and meta.json. With ``followup`` (maps that decode ``blip``, and ``dpt`` for
    Xztd), also Xzt_k (and depth.png, depth.npy, Xztd_k), and the decoded caption in caption.txt and meta.json.

    The requested rows are sharded by position over ``num_processes`` before anything is skipped, so concurrent
    processes never share a trial; each skips its finished trials (resume). A finished trial made with other
    settings is refused before any work, unless ``overwrite`` (then it is made again). ``rescale`` is passed to
    :meth:`~brainldm.decoding.maps.SubjectMaps.predict`. Returns this process's folders.
    """

    reconstructor.check_sampling(sampling)  # before anything is read or written
    maps.check_rescale(rescale)
    missing = [target for target in ("z", "c") if target not in maps.config.targets]
    if missing:
        raise InputError(
            f"subject {maps.subject}'s maps decode {sorted(maps.config.targets)}, without {' and '.join(missing)}, "
            "which every reconstruction needs; fit them with scripts/fit_maps.py --decoders z=early,c=ventral"
        )
    if followup is not None:
        needed = ["blip"] + (["dpt"] if followup.depth_model is not None else [])
        missing = [target for target in needed if target not in maps.config.targets]
        if missing:
            raise InputError(
                f"the follow-up pipeline decodes {' and '.join(missing)}, but subject {maps.subject}'s maps hold only "
                f"{sorted(maps.config.targets)}; fit them with scripts/fit_maps.py --decoders (see docs/pipeline.md)"
            )
    trials = load_trials(data, subject, split)
    rows = list(range(len(trials))) if rows is None else [int(r) for r in rows]
    bad = [r for r in rows if not 0 <= r < len(trials)]
    if bad:
        raise InputError(f"trial {bad[0]} is out of range: the {split} split of subject {subject} has {len(trials)}")
    voxels = load_voxels(data, subject)
    maps.check_voxels(voxels)
    mine = rows[process_index::num_processes]
    settings = {**asdict(sampling), "model_id": maps.model_id, "output_size": reconstructor.output_size,
                "rescale": rescale, "noise": "per image"}  # fmt: skip
    if followup is not None:
        settings["followup"] = followup.ids
    todo = [r for r in mine if not is_done(trial_folder(out, subject, split, r))]
    # every finished trial of the folder, not only this run's: a folder holds one kind of reconstruction
    for folder in finished_trials(subject_folder(out, subject), split):
        made = json.loads((folder / "meta.json").read_text())
        changed = {k: (made.get(k), settings.get(k)) for k in SETTINGS if made.get(k) != settings.get(k)}
        row = trial_row(folder)
        if changed and not (overwrite and row in rows):
            said = ", ".join(f"{k} {old} (now {new})" for k, (old, new) in changed.items())
            remake = "--overwrite to make such trials again" + (
                "" if row in rows else f" (with trial {row} among --trials)"
            )
            raise InputError(f"{folder} was made with {said}; use another --out, or {remake}")
        if changed and row in mine:
            todo.append(row)
    todo.sort()
    log = subject_folder(out, subject) / f"done.process{process_index}.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=f"reconstruct [{process_index}]", unit="image", disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        items = trials.select(batch)
        decoded = maps.predict(
            np.asarray(items.with_format("numpy")["betas"]), device=reconstructor.device, rescale=rescale
        )
        z, c = decoded["z"], decoded["c"]
        keys = [int(i) for i in items["nsd_id"]]
        result = reconstructor(z, c, sampling, keys=keys)
        more = followup(reconstructor, z, decoded, sampling, keys) if followup is not None else {}
        for k, row in enumerate(batch):
            item = items[k]
            images = {"original": np.asarray(item["image"].convert("RGB")), "Xz": result.Xz[k]}
            for s in range(sampling.num_samples):
                images[f"Xc_{s}"] = result.Xc[k, s]
                images[f"Xzc_{s}"] = result.Xzc[k, s]
                images.update({f"{kind}_{s}": more[kind][k, s] for kind in ("Xzt", "Xztd") if kind in more})
            # the decoded targets, for retrieval; BLIP's and DPT's are kept as what they decode to (caption, depth)
            arrays = {
                name: t[k].cpu().numpy().astype(np.float16) for name, t in decoded.items() if name not in AUXILIARY
            }
            if "depth" in more:
                images["depth"] = depth_image(more["depth"][k])
                arrays["depth"] = more["depth"][k].astype(np.float32)  # DPT's depth runs past float16's range
            meta = {
                "subject": subject,
                "split": split,
                "row": row,
                "nsd_id": int(item["nsd_id"]),
                "captions": item["captions"],
                "sessions": item.get("sessions"),  # which test sets the image belongs to (evaluate.sets_of_test_images)
                **settings,
                "process_index": process_index,
            }
            if "captions" in more:
                meta["decoded_caption"] = more["captions"][k]
            write_trial(trial_folder(out, subject, split, row), images, arrays, meta)
            with log.open("a") as f:
                f.write(f"{row}\n")
        bar.update(len(batch))
    bar.close()
    return [trial_folder(out, subject, split, r) for r in mine]
