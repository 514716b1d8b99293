"""The trials dataset: NSD betas, stimuli and captions as a Hugging Face ``datasets`` dataset, one config per subject.

Layout of a prepared folder (and of its Hub dataset repo)::

    OUT/README.md                       dataset card, one config per subject
    OUT/subj01/train-00000-of-00037.parquet ...   single trials of non-shared images, one shard per session
    OUT/subj01/test-00000-of-00001.parquet        one row per shared image, betas averaged over its repetitions
    OUT/subj01/voxels.safetensors                 the voxel table (ijk, grid, affine, nsdgeneral, streams)
    OUT/subj01/info.json                          how it was made (sessions, z-scoring, split sizes)

Columns: ``nsd_id`` (0-based 73k id), ``coco_id``, ``image``, ``captions``, ``n_reps``, ``trials`` (1-based trial
numbers used), ``betas`` (float32 over the stored voxels: nsdgeneral == 1 or streams > 0).
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, snapshot_download
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from . import nsd
from .validation import InputError

SPLITS = ("train", "test")
FEATURES = datasets.Features(
    {
        "nsd_id": datasets.Value("int64"),
        "coco_id": datasets.Value("int64"),
        "image": datasets.Image(),
        "captions": datasets.List(datasets.Value("string")),
        "n_reps": datasets.Value("int32"),
        "trials": datasets.List(datasets.Value("int32")),
        "betas": datasets.List(datasets.Value("float32")),
    }
)
TEST_SHARD_ROWS = 500
VOXELS_FILE = "voxels.safetensors"
INFO_FILE = "info.json"


def subject_name(subject: int, whole_brain: bool = False) -> str:
    """The subject's folder and config name: ``subj01``, or ``subj01-wholebrain`` for every in-brain voxel."""
    return f"subj{int(subject):02d}" + ("-wholebrain" if whole_brain else "")


# --- the voxel table -----------------------------------------------------------------------------------------


@dataclass
class VoxelTable:
    """A subject's stored voxels. ``ijk`` (n_voxels, 3) indexes the X, Y, Z axes of the betas grid."""

    subject: int
    ijk: np.ndarray
    grid_shape: tuple[int, int, int]
    affine: np.ndarray
    nsdgeneral: np.ndarray  # (n_voxels,) bool
    streams: np.ndarray  # (n_voxels,) int: 0 none, 1 early ... 7 parietal (see nsd.STREAMS)

    def __len__(self) -> int:
        return len(self.ijk)

    def roi(self, name: str) -> np.ndarray:
        """Indices of the voxels in a ``streams`` ROI (``"early"``, ``"ventral"``, ...) or ``"nsdgeneral"``."""
        if name == "nsdgeneral":
            return np.flatnonzero(self.nsdgeneral)
        if name not in nsd.STREAM_IDS:
            raise InputError(f"unknown ROI {name!r}; expected 'nsdgeneral' or one of {sorted(nsd.STREAM_IDS)}")
        return np.flatnonzero(self.streams == nsd.STREAM_IDS[name])

    def to_volume(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """Scatter per-voxel ``values`` (n_voxels,) into the grid -> (X, Y, Z) float32."""
        volume = np.full(self.grid_shape, fill, dtype=np.float32)
        volume[tuple(self.ijk.T)] = values
        return volume

    def save(self, path: str | Path) -> None:
        tensors = {
            "ijk": np.ascontiguousarray(self.ijk, dtype=np.int32),
            "affine": np.ascontiguousarray(self.affine, dtype=np.float64),
            "nsdgeneral": self.nsdgeneral.astype(np.uint8),
            "streams": self.streams.astype(np.int8),
        }
        metadata = {"subject": str(self.subject), "grid_shape": json.dumps(list(self.grid_shape))}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> VoxelTable:
        try:
            with safe_open(str(path), framework="numpy") as f:
                metadata = f.metadata()
            tensors = load_file(str(path))
            return cls(
                subject=int(metadata["subject"]),
                ijk=tensors["ijk"].astype(np.int64),
                grid_shape=tuple(json.loads(metadata["grid_shape"])),
                affine=tensors["affine"],
                nsdgeneral=tensors["nsdgeneral"].astype(bool),
                streams=tensors["streams"].astype(np.int64),
            )
        except Exception as err:
            raise InputError(f"could not read the voxel table {path}: {err}") from err


def voxel_table_from_rois(root: str | Path, subject: int, whole_brain: bool = False) -> VoxelTable:
    """Stored voxels of a subject, in C order of the grid: every voxel with nsdgeneral == 1 or streams > 0, or
    with ``whole_brain`` every voxel inside the brain (ROI labels >= 0), for whole-brain encoding models."""
    general, streams = nsd.read_roi(root, subject, "nsdgeneral"), nsd.read_roi(root, subject, "streams")
    if general.shape != streams.shape:
        raise InputError(
            f"nsdgeneral {general.shape} and streams {streams.shape} ROIs of subject {subject} differ in grid"
        )
    g, s = np.asarray(general.dataobj), np.asarray(streams.dataobj)
    ijk = np.argwhere(((g >= 0) | (s >= 0)) if whole_brain else ((g == 1) | (s > 0)))
    return VoxelTable(
        subject=subject,
        ijk=ijk,
        grid_shape=tuple(int(n) for n in g.shape),
        affine=np.asarray(general.affine, dtype=np.float64),
        nsdgeneral=g[tuple(ijk.T)] == 1,
        streams=np.maximum(s[tuple(ijk.T)], 0).astype(np.int64),
    )


# --- preparing a subject -------------------------------------------------------------------------------------


def zscore_sessionwise(betas: np.ndarray) -> np.ndarray:
    """z-score each voxel (column) over the session's trials (rows); a constant voxel gives 0, never NaN."""
    betas = betas.astype(np.float64)  # float32 rounding would give a constant voxel a tiny, nonzero std
    mean = betas.mean(axis=0, keepdims=True)
    std = betas.std(axis=0, keepdims=True)
    constant = std <= 1e-9 * np.maximum(np.abs(mean), 1.0)
    return ((betas - mean) / np.where(constant, 1.0, std)).astype(np.float32) * ~constant


def _png(image: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _write_shard(rows: dict, path: Path) -> None:
    # the Arrow schema carries the datasets features, so the shard loads back with Image and List columns
    pq.write_table(datasets.Dataset.from_dict(rows, features=FEATURES).data.table, path)


def prepare_subject(
    nsd_root: str | Path,
    subject: int,
    out: str | Path,
    sessions: int | None = None,
    zscore: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    whole_brain: bool = False,
) -> Path:
    """Build ``OUT/subjNN`` from raw NSD: the train and test splits as Parquet shards, plus the voxel table.

    Reads one session of betas at a time. Finished sessions are cached in ``OUT/.subjNN.partial`` so a killed run
    restarted with the same arguments resumes; ``OUT/subjNN`` appears (by one rename) only when complete.

    Args:
        nsd_root: the NSD root folder (see ``shared/PAPER.md`` for the layout).
        subject: 1-based NSD subject.
        out: the dataset folder; other subjects already in it are kept.
        sessions: use the first ``sessions`` sessions (default: all the subject's consecutive sessions).
        zscore: z-score each voxel within each session (the default); else raw percent signal change.
        overwrite: rebuild ``OUT/subjNN`` if it exists.
        whole_brain: store every in-brain voxel (as ``OUT/subjNN-wholebrain``), for the encoding analysis.
    Returns:
        The subject folder.
    """
    out = Path(out)
    final = out / subject_name(subject, whole_brain)
    if final.exists() and not overwrite:
        raise InputError(f"{final} already exists; pass --overwrite to rebuild it")
    created_out = not out.exists()
    try:
        return _prepare_subject(nsd_root, subject, out, sessions, zscore, progress, whole_brain)
    except InputError:
        # bad input leaves nothing behind; a kill (any other exception) keeps finished sessions for a resume
        shutil.rmtree(out / f".{final.name}.partial", ignore_errors=True)
        if created_out:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare_subject(nsd_root, subject, out: Path, sessions, zscore: bool, progress: bool, whole_brain: bool) -> Path:
    name = subject_name(subject, whole_brain)
    final = out / name

    # Everything is validated before any betas are read.
    design = nsd.read_expdesign(nsd_root)
    info = nsd.read_stim_info(nsd_root)
    if sessions is not None and sessions < 1:
        raise InputError(f"--sessions must be >= 1, got {sessions}")
    used = nsd.list_sessions(nsd_root, subject, sessions)
    voxels = voxel_table_from_rois(nsd_root, subject, whole_brain)
    shapes = [nsd.betas_shape(nsd_root, subject, s) for s in used]
    for session, shape in zip(used, shapes):
        if tuple(shape[:3]) != voxels.grid_shape:
            raise InputError(
                f"{nsd.betas_path(nsd_root, subject, session)} has grid {tuple(shape[:3])} but the ROIs of "
                f"subject {subject} have grid {voxels.grid_shape}; are they from the same resolution (func1pt8mm)?"
            )
    session_of_trial = np.concatenate([np.full(shape[3], s) for s, shape in zip(used, shapes)])
    n_trials = len(session_of_trial)
    images = design.trial_images(subject, n_trials)
    _cross_check(info, subject, images)
    coco_ids = info.loc[np.unique(images), "cocoId"].astype(np.int64)
    captions = nsd.read_captions(nsd_root, coco_ids.to_numpy())
    is_test = np.isin(images, design.shared)

    params = {
        "nsd_root": str(Path(nsd_root).resolve()),
        "subject": subject,
        "sessions": used,
        "zscore": zscore,
        "whole_brain": whole_brain,
        "n_voxels": len(voxels),
    }
    work = out / f".{name}.partial"
    if work.exists() and _read_json(work / "params.json") != params:
        shutil.rmtree(work)  # a run with other arguments: its sessions cannot be reused
    (work / "sessions").mkdir(parents=True, exist_ok=True)
    _write_json(work / "params.json", params)

    first_trial = {s: int(np.flatnonzero(session_of_trial == s)[0]) for s in used}

    # 1. betas, one session at a time, cached as float32 (n_trials_in_session, n_voxels)
    for session in tqdm(used, desc=f"{name} betas", unit="session", disable=not progress):
        cached = work / "sessions" / f"session{session:02d}.npy"
        if cached.exists():
            continue
        betas = nsd.read_betas(nsd_root, subject, session, voxels.ijk)
        bad = np.argwhere(~np.isfinite(betas))
        if len(bad):
            trial, voxel = bad[0]
            ijk = tuple(int(i) for i in voxels.ijk[voxel])
            raise InputError(
                f"{nsd.betas_path(nsd_root, subject, session)} holds {len(bad)} NaN or infinite betas, the first at "
                f"voxel {ijk} (i, j, k) in trial {trial + 1} of session {session}; "
                "download the session again, or leave such voxels out of the ROIs"
            )
        if zscore:
            betas = zscore_sessionwise(betas)
        _save_npy_atomic(cached, betas)

    def session_betas(session: int) -> np.ndarray:
        return np.load(work / "sessions" / f"session{session:02d}.npy", mmap_mode="r")

    def trial_betas(trial: int) -> np.ndarray:
        session = session_of_trial[trial]
        return session_betas(session)[trial - first_trial[session]]

    # 2. Parquet shards, written into a staging folder and moved into place at the end
    staging = work / name
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    with nsd.Stimuli(nsd_root) as stimuli:
        train_sessions = [s for s in used if (~is_test[session_of_trial == s]).any()]
        for shard, session in enumerate(tqdm(train_sessions, desc=f"{name} train", disable=not progress)):
            trials = np.flatnonzero((session_of_trial == session) & ~is_test)
            betas = session_betas(session)[trials - first_trial[session]]
            rows = _rows(images[trials], [[t + 1] for t in trials], betas, info, captions, stimuli)
            _write_shard(rows, staging / f"train-{shard:05d}-of-{len(train_sessions):05d}.parquet")

        test_ids = np.unique(images[is_test])
        n_shards = max(1, -(-len(test_ids) // TEST_SHARD_ROWS))
        for shard, chunk in enumerate(np.array_split(test_ids, n_shards)):
            trial_lists = [np.flatnonzero(images == i) for i in chunk]
            betas = [np.mean([trial_betas(t) for t in ts], axis=0) for ts in trial_lists]
            rows = _rows(chunk, [(ts + 1).tolist() for ts in trial_lists], betas, info, captions, stimuli)
            _write_shard(rows, staging / f"test-{shard:05d}-of-{n_shards:05d}.parquet")

    voxels.save(staging / VOXELS_FILE)
    summary = dict(params, n_train=int((~is_test).sum()), n_test=int(len(np.unique(images[is_test]))))
    summary["nsd_root"] = "(local)"  # the card is public; the local path is not its business
    _write_json(staging / INFO_FILE, summary)

    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    shutil.rmtree(work)
    write_dataset_card(out)
    return final


def _rows(nsd_ids, trials, betas, info, captions, stimuli) -> dict:
    coco = info.loc[nsd_ids, "cocoId"].to_numpy().astype(np.int64)
    return {
        "nsd_id": [int(i) for i in nsd_ids],
        "coco_id": coco.tolist(),
        "image": [_png(stimuli[i]) for i in nsd_ids],
        "captions": [captions[int(c)] for c in coco],
        "n_reps": [len(t) for t in trials],
        "trials": [list(map(int, t)) for t in trials],
        "betas": list(np.asarray(betas, dtype=np.float32)),
    }


def _cross_check(info, subject: int, images: np.ndarray) -> None:
    """The stim-info rep columns must name each trial under the image that expdesign says it showed."""
    columns = [f"subject{subject}_rep{r}" for r in range(3)]
    if not set(columns) <= set(info.columns):
        return  # an older stim-info file without rep columns: nothing to cross-check
    missing = np.setdiff1d(np.unique(images), info.index.to_numpy())
    if len(missing):
        raise InputError(f"nsd_stim_info_merged.csv has no row for nsdId {missing[0]} shown to subject {subject}")
    reps = info.loc[images, columns].to_numpy()
    trials = np.arange(1, len(images) + 1)[:, None]
    wrong = np.flatnonzero(~(reps == trials).any(axis=1))
    if len(wrong):
        t = int(wrong[0]) + 1
        raise InputError(
            f"nsd_expdesign.mat and nsd_stim_info_merged.csv disagree: trial {t} of subject {subject} shows "
            f"nsdId {images[t - 1]} by the design, but that image's {columns} do not list trial {t}"
        )


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


# --- the dataset card and the Hub ----------------------------------------------------------------------------


def write_dataset_card(out: str | Path) -> Path:
    """(Re)write ``OUT/README.md``: one config per prepared subject, split sizes, columns and NSD's terms."""
    out = Path(out)
    subjects = sorted(p.name for p in out.glob("subj[0-9][0-9]*") if (p / INFO_FILE).exists())
    card = dataset_card({name: json.loads((out / name / INFO_FILE).read_text()) for name in subjects})
    card.save(out / "README.md")
    return out / "README.md"


NSD_TERMS = ("nsd-terms-and-conditions", "https://cvnlab.slite.page/p/IB6BSeW_7o/Terms-and-Conditions")
GATED_PROMPT = (
    "These are data of the Natural Scenes Dataset (NSD). NSD is shared under the NSD Terms and Conditions; to "
    "access these files you must agree to them."
)


def dataset_card(infos: dict[str, dict], repo_id: str = "<user>/nsd-trials") -> DatasetCard:
    """The dataset card: one config per prepared subject (the first is the default), NSD's terms as gated access."""
    configs = [
        {"config_name": name, "data_files": [{"split": s, "path": f"{name}/{s}-*.parquet"} for s in SPLITS]}
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
        tags=["fmri", "neuroscience", "natural-scenes-dataset", "brainldm"],
        configs=configs,
        extra_gated_prompt=GATED_PROMPT,
        extra_gated_fields={
            "I agree to the NSD Terms and Conditions (https://cvnlab.slite.page/p/IB6BSeW_7o/Terms-and-Conditions)":
            "checkbox",
        },
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
`captions` (all COCO captions, stripped), `n_reps`, `trials` (1-based NSD trial numbers used), `betas` (float32
over the subject's stored voxels: nsdgeneral or any `streams` ROI; percent signal change, z-scored per voxel
within each session unless the table says otherwise). `subjNN/voxels.safetensors` holds the voxel table
(ijk in the func1pt8mm grid, affine, nsdgeneral and streams labels); load it with `brainldm.data.load_voxels`.
`subjNN-wholebrain` configs hold every voxel inside the brain instead (for whole-brain encoding models).

```python
from brainldm.data import load_trials, load_voxels
test = load_trials("{repo_id}", subject=1, split="test")  # downloads only subj01's test shards
voxels = load_voxels("{repo_id}", subject=1)
```
"""
    return DatasetCard(content)


def push_to_hub(
    out: str | Path,
    subject: int,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    whole_brain: bool = False,
) -> str:
    """Upload ``OUT/subjNN`` to a Hub dataset repo (as config ``subjNN``), refresh its dataset card and gate access
    behind NSD's terms; returns the card commit's URL."""
    folder = Path(out) / subject_name(subject, whole_brain)
    if not (folder / INFO_FILE).exists():
        raise InputError(f"{folder} is not a prepared subject; run scripts/prepare_nsd.py first")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.update_repo_settings(repo_id, repo_type="dataset", gated="auto")  # the card's form: agree to NSD's terms
    api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=str(folder),
        path_in_repo=folder.name,
        commit_message=f"Add {folder.name}",
    )
    # the card lists every subject on the Hub, not only those in this local folder
    infos = {}
    for path in api.list_repo_files(repo_id, repo_type="dataset"):
        if path.endswith(f"/{INFO_FILE}"):
            local = api.hf_hub_download(repo_id, path, repo_type="dataset")
            infos[path.split("/")[0]] = json.loads(Path(local).read_text())
    card = dataset_card(infos, repo_id)
    commit = api.upload_file(
        path_or_fileobj=str(card).encode(),
        path_in_repo="README.md",
        repo_id=repo_id,
        repo_type="dataset",
        commit_message="Update dataset card",
    )
    return commit.commit_url


# --- loading -------------------------------------------------------------------------------------------------


def subject_dir(
    source: str | Path,
    subject: int,
    whole_brain: bool = False,
    split: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """The local folder of a subject: ``SOURCE/subjNN`` for a local dataset, else its Hub snapshot in the cache.

    From the Hub only what is asked for is downloaded: the subject's voxel table and info, plus the shards of
    ``split`` when given (NSD's train split is many GB; the demo needs only the test split).
    """
    name = subject_name(subject, whole_brain)
    if Path(source).is_dir():
        folder = Path(source) / name
        if not (folder / INFO_FILE).exists():
            found = sorted(p.name for p in Path(source).glob("subj[0-9][0-9]*"))
            raise InputError(f"no prepared {name} in {source} (found: {found or 'none'}); run scripts/prepare_nsd.py")
        return folder
    try:
        wanted = [f"{name}/{INFO_FILE}", f"{name}/{VOXELS_FILE}"] + ([f"{name}/{split}-*.parquet"] if split else [])
        snapshot = snapshot_download(
            str(source), repo_type="dataset", allow_patterns=wanted, revision=revision, token=token
        )
    except Exception as err:
        raise InputError(
            f"{source!r} is neither a local folder nor a Hub dataset we can reach ({err.__class__.__name__}: {err}). "
            "With HF_HUB_OFFLINE=1 the dataset must already be in the Hugging Face cache."
        ) from err
    folder = Path(snapshot) / name
    if not (folder / INFO_FILE).exists():
        raise InputError(f"Hub dataset {source!r} has no config {name}")
    return folder


def load_trials(
    source: str | Path,
    subject: int,
    split: str,
    whole_brain: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
) -> datasets.Dataset:
    """One subject's ``train`` or ``test`` split as a :class:`datasets.Dataset`.

    ``source`` is a folder written by ``scripts/prepare_nsd.py`` or a Hub dataset repo id (only this split's
    shards are downloaded, at ``revision``, with ``token`` for the gated repo, through the Hugging Face cache, so
    ``HF_HUB_OFFLINE=1`` works once it is cached). ``whole_brain`` loads the whole-brain variant
    (``scripts/prepare_nsd.py --whole-brain``).
    """
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    folder = subject_dir(source, subject, whole_brain, split=split, revision=revision, token=token)
    files = sorted(str(p) for p in folder.glob(f"{split}-*.parquet"))
    return datasets.load_dataset("parquet", data_files={split: files}, split=split, features=FEATURES)


def load_voxels(
    source: str | Path,
    subject: int,
    whole_brain: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
) -> VoxelTable:
    """The subject's voxel table (see :class:`VoxelTable`), from a local dataset folder or a Hub dataset repo."""
    return VoxelTable.load(subject_dir(source, subject, whole_brain, revision=revision, token=token) / VOXELS_FILE)


class SubjectStimuli:
    """The unique images a subject saw, across splits: ``nsd_ids`` and ``stimuli[nsd_id] -> (image, captions)``."""

    def __init__(self, source: str | Path, subject: int, splits: tuple[str, ...] = SPLITS):
        self._rows: dict[int, tuple[datasets.Dataset, int]] = {}
        for split in splits:
            table = load_trials(source, subject, split).select_columns(["nsd_id", "image", "captions"])
            for row, nsd_id in enumerate(table["nsd_id"]):
                self._rows.setdefault(int(nsd_id), (table, row))
        self.nsd_ids = sorted(self._rows)

    def __len__(self) -> int:
        return len(self.nsd_ids)

    def __getitem__(self, nsd_id: int) -> tuple[Image.Image, list[str]]:
        table, row = self._rows[int(nsd_id)]
        item = table[row]
        return item["image"], item["captions"]
