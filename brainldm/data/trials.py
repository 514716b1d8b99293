"""The trials dataset: NSD betas, stimuli and captions as a Hugging Face ``datasets`` dataset, one config per subject.

Layout of a prepared folder (and of its Hub dataset repo)::

    OUT/README.md                       dataset card, one config per subject
    OUT/subj01/train-00000-of-00037.parquet ...   single trials of non-shared images, one shard per session
    OUT/subj01/test-00000-of-00001.parquet        one row per shared image, betas averaged over its repetitions
    OUT/subj01/voxels.safetensors                 the voxel table (ijk, grid, affine, nsdgeneral, streams)
    OUT/subj01/info.json                          how it was made (sessions, z-scoring, split sizes)

Columns: ``nsd_id`` (0-based 73k id), ``coco_id``, ``image``, ``captions``, ``n_reps``, ``trials`` (1-based trial
numbers used), ``sessions`` (the session of each of those trials), ``betas`` (float32 over the stored voxels:
nsdgeneral == 1 or streams > 0).
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
from huggingface_hub import HfApi, snapshot_download
from PIL import Image
from tqdm.auto import tqdm

from brainldm.cards import PUBLIC_WARNING, dataset_card
from brainldm.data.coco import CocoCaptions
from brainldm.data.readers import NSDReader, Reader
from brainldm.data.voxels import VoxelTable
from brainldm.paths import atomic_path, subject_name
from brainldm.validation import InputError

SPLITS = ("train", "test")
FEATURES = datasets.Features(
    {
        "nsd_id": datasets.Value("int64"),
        "coco_id": datasets.Value("int64"),
        "image": datasets.Image(),
        "captions": datasets.List(datasets.Value("string")),
        "n_reps": datasets.Value("int32"),
        "trials": datasets.List(datasets.Value("int32")),
        "sessions": datasets.List(datasets.Value("int32")),
        "betas": datasets.List(datasets.Value("float32")),
    }
)
TEST_SHARD_ROWS = 500
VOXELS_FILE = "voxels.safetensors"
INFO_FILE = "info.json"


# --- preparing a subject -------------------------------------------------------------------------------------


def zscore_sessionwise(betas: np.ndarray) -> np.ndarray:
    """z-score each voxel (column) over the session's trials (rows); a constant voxel gives 0, never NaN."""
    betas = betas.astype(np.float64)  # float32 rounding would give a constant voxel a small, nonzero std
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
    sessions: int | list[int] | None = None,
    zscore: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    whole_brain: bool = False,
    cache_dir: str | Path | None = None,
    coco_annotations: str | Path | CocoCaptions | None = None,
) -> Path:
    """Build ``OUT/subjNN`` from raw NSD: :func:`prepare` with an :class:`~brainldm.data.readers.NSDReader`.

    Args:
        nsd_root: the NSD root folder (see ``shared/PAPER.md`` for the layout), or a URL such as NSD's bucket
            ``s3://natural-scenes-dataset``: then only what the subject needs is fetched (:mod:`brainldm.data.storage`).
        subject: 1-based NSD subject.
        out: the dataset folder; other subjects already in it are kept.
        sessions: use the first K sessions, or the sessions listed (default: all the subject's consecutive sessions);
            every trial keeps the number NSD's design gives it.
        zscore: z-score each voxel within each session (the default); else raw percent signal change.
        overwrite: rebuild ``OUT/subjNN`` if it exists.
        whole_brain: store every in-brain voxel (as ``OUT/subjNN-wholebrain``), for the encoding analysis.
        cache_dir: where files fetched from a URL are kept (default :func:`brainldm.data.storage.default_cache_dir`).
        coco_annotations: where COCO's captions come from (a URL, a local archive or folder, or a
            :class:`~brainldm.data.coco.CocoCaptions`); default: as :meth:`~brainldm.data.coco.CocoCaptions.for_nsd`.
    Returns:
        The subject folder.
    """
    _check_new(Path(out) / subject_name(subject, whole_brain), overwrite)  # before any file is read
    reader = NSDReader(
        nsd_root, subject, sessions, whole_brain, cache_dir=cache_dir, progress=progress,
        coco_annotations=coco_annotations,
    )  # fmt: skip
    try:
        return prepare(reader, out, zscore, overwrite, progress)
    finally:
        reader.root.close()


def _check_new(final: Path, overwrite: bool) -> None:
    if final.exists() and not overwrite:
        raise InputError(f"{final} already exists; pass --overwrite to rebuild it")


def prepare(
    reader: Reader, out: str | Path, zscore: bool = True, overwrite: bool = False, progress: bool = True
) -> Path:
    """Build ``OUT/subjNN`` from any :class:`~brainldm.data.readers.Reader`: the train and test splits as Parquet
    shards,
    plus the voxel table (with its ROI names).

    Train rows are single trials of non-test stimuli, one shard per session; test rows average each test stimulus
    over its repetitions. Reads one session of betas at a time. Finished sessions are cached in
    ``OUT/.subjNN.partial`` so a killed run restarted with the same input resumes; ``OUT/subjNN`` appears (by one
    rename) only when complete. Bad input leaves nothing behind.
    """
    out = Path(out)
    _check_new(out / subject_name(reader.subject, reader.whole_brain), overwrite)
    created_out = not out.exists()
    try:
        return _prepare(reader, out, zscore, progress)
    except InputError:
        # bad input leaves nothing behind; a kill (any other exception) keeps finished sessions for a resume
        shutil.rmtree(out / f".{subject_name(reader.subject, reader.whole_brain)}.partial", ignore_errors=True)
        if created_out:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare(reader: Reader, out: Path, zscore: bool, progress: bool) -> Path:
    name = subject_name(reader.subject, reader.whole_brain)
    final = out / name
    voxels, used, images = reader.voxels, reader.sessions, reader.trial_stimuli
    session_of_trial = reader.session_of_trial
    is_test = np.isin(images, reader.test_stimuli)
    params = {**reader.params(), "zscore": zscore, "n_voxels": len(voxels)}
    work = out / f".{name}.partial"
    if work.exists() and _read_json(work / "params.json") != params:
        shutil.rmtree(work)  # a run with other arguments: its sessions cannot be reused
    (work / "sessions").mkdir(parents=True, exist_ok=True)
    _write_json(work / "params.json", params)
    versions, before = reader.session_versions(), _read_json(work / "sources.json") or {}
    changed = [f for f in versions if f in before and before[f] != versions[f]]
    if changed and any((work / "sessions").iterdir()):
        raise InputError(
            f"{changed[0]} changed since this prepare started (it was {before[changed[0]]}, it is "
            f"{versions[changed[0]]} as size:ETag or size:mtime); the sessions read before were dropped rather than "
            "mixed with the new file: run again to prepare from it"
        )
    _write_json(work / "sources.json", versions)

    first_trial = {s: int(np.flatnonzero(session_of_trial == s)[0]) for s in used}

    # 1. betas, one session at a time, cached as float32 (n_trials_in_session, n_voxels)
    for session in tqdm(used, desc=f"{name} betas", unit="session", disable=not progress):
        cached = work / "sessions" / f"session{session:02d}.npy"
        if cached.exists():
            continue
        betas = reader.read_session(session)
        bad = np.argwhere(~np.isfinite(betas))
        if len(bad):
            trial, voxel = bad[0]
            ijk = tuple(int(i) for i in voxels.ijk[voxel])
            raise InputError(
                f"{reader.describe_session(session)} holds {len(bad)} NaN or infinite betas, the first at "
                f"voxel {ijk} (i, j, k) in trial {trial + 1} of session {session}; "
                "download the session again, or leave such voxels out of the ROIs"
            )
        if zscore:
            betas = zscore_sessionwise(betas)
        with atomic_path(cached) as tmp:
            np.save(tmp, betas)

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
    with reader.open_stimuli() as stimuli:
        train_sessions = [s for s in used if (~is_test[session_of_trial == s]).any()]
        for shard, session in enumerate(tqdm(train_sessions, desc=f"{name} train", disable=not progress)):
            trials = np.flatnonzero((session_of_trial == session) & ~is_test)
            betas = session_betas(session)[trials - first_trial[session]]
            rows = _rows(images[trials], [[t] for t in trials], betas, reader, stimuli)
            _write_shard(rows, staging / f"train-{shard:05d}-of-{len(train_sessions):05d}.parquet")

        test_ids = np.unique(images[is_test])
        n_shards = max(1, -(-len(test_ids) // TEST_SHARD_ROWS))
        for shard, chunk in enumerate(np.array_split(test_ids, n_shards)):
            trial_lists = [np.flatnonzero(images == i) for i in chunk]
            betas = [np.mean([trial_betas(t) for t in ts], axis=0) for ts in trial_lists]
            rows = _rows(chunk, [ts.tolist() for ts in trial_lists], betas, reader, stimuli)
            _write_shard(rows, staging / f"test-{shard:05d}-of-{n_shards:05d}.parquet")

    voxels.save(staging / VOXELS_FILE)
    summary = dict(params, n_train=int((~is_test).sum()), n_test=int(len(np.unique(images[is_test]))))
    summary["root"] = "(local)"  # the card is public; the local path is not its business
    _write_json(staging / INFO_FILE, summary)

    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    shutil.rmtree(work)
    write_dataset_card(out)
    return final


def _rows(stimulus_ids, trials, betas, reader: Reader, stimuli) -> dict:
    """One row per stimulus; ``trials`` lists, per row, the positions of its trials in the reader's trial arrays."""
    coco_ids, captions = reader.stimulus_info([int(i) for i in stimulus_ids])
    return {
        "nsd_id": [int(i) for i in stimulus_ids],
        "coco_id": coco_ids,
        "image": [_png(stimuli[i]) for i in stimulus_ids],
        "captions": captions,
        "n_reps": [len(t) for t in trials],
        "trials": [[int(reader.trial_numbers[i]) for i in t] for t in trials],
        "sessions": [[int(reader.session_of_trial[i]) for i in t] for t in trials],
        "betas": list(np.asarray(betas, dtype=np.float32)),
    }


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


# --- the dataset card and the Hub ----------------------------------------------------------------------------


def write_dataset_card(out: str | Path) -> Path:
    """(Re)write ``OUT/README.md``: one config per prepared subject, split sizes, columns and NSD's terms."""
    out = Path(out)
    subjects = sorted(p.name for p in out.glob("subj[0-9][0-9]*") if (p / INFO_FILE).exists())
    card = dataset_card({name: json.loads((out / name / INFO_FILE).read_text()) for name in subjects})
    card.save(out / "README.md")
    return out / "README.md"


def push_to_hub(
    out: str | Path,
    subject: int,
    repo_id: str,
    public: bool = False,
    token: str | None = None,
    whole_brain: bool = False,
) -> str:
    """Upload ``OUT/subjNN`` to a Hub dataset repo (as config ``subjNN``) and refresh its dataset card; returns the
    card commit's URL.

    The repo is created private: NSD's terms forbid passing the data on (clause 3,
    :data:`~brainldm.cards.NSD_CLAUSE_3`).
    ``public`` makes it public with access gated behind NSD's terms, and warns, quoting that clause."""
    folder = Path(out) / subject_name(subject, whole_brain)
    if not (folder / INFO_FILE).exists():
        raise InputError(f"{folder} is not a prepared subject; run scripts/prepare_nsd.py first")
    api = HfApi(token=token)
    if public:
        warnings.warn(PUBLIC_WARNING, stacklevel=2)
    api.create_repo(repo_id, repo_type="dataset", private=not public, exist_ok=True)
    if public:
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
    card = dataset_card(infos, repo_id, public=public)
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
    # datasets prepared before a column was added (sessions) load without it
    present = set(pq.read_schema(files[0]).names) if files else set(FEATURES)
    features = datasets.Features({name: kind for name, kind in FEATURES.items() if name in present})
    return datasets.load_dataset("parquet", data_files={split: files}, split=split, features=features)


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
    """The unique images a subject (or several: NSD's shared pictures once) saw, across splits: ``nsd_ids`` and
    ``stimuli[nsd_id] -> (image, captions)``."""

    def __init__(self, source: str | Path, subject: int | Sequence[int], splits: tuple[str, ...] = SPLITS):
        self._rows: dict[int, tuple[datasets.Dataset, int]] = {}
        for one in [subject] if isinstance(subject, int) else subject:
            for split in splits:
                table = load_trials(source, one, split).select_columns(["nsd_id", "image", "captions"])
                for row, nsd_id in enumerate(table["nsd_id"]):
                    self._rows.setdefault(int(nsd_id), (table, row))
        self.nsd_ids = sorted(self._rows)

    def __len__(self) -> int:
        return len(self.nsd_ids)

    def __getitem__(self, nsd_id: int) -> tuple[Image.Image, list[str]]:
        table, row = self._rows[int(nsd_id)]
        item = table[row]
        return item["image"], item["captions"]
