"""The raw Natural Scenes Dataset layout: where each file lives and what its labels mean.

Paths are relative to the NSD root, exactly as on NSD's public bucket (checked against public listings of it:
``tests/data/nsd_listing.json``). ``brainldm.offline.synthetic`` writes to these same paths, so the offline world and
real NSD go through one reader. COCO's captions are not NSD's files: :mod:`brainldm.data.coco` reads them.
"""

from __future__ import annotations

import gzip
import itertools
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import scipy.io

from brainldm.data.h5chunks import ChunkDecoder, chunk_ranges
from brainldm.data.storage import RangeFile, Storage, as_storage, cached_version, record_version
from brainldm.paths import atomic_path
from brainldm.validation import InputError, oneline

# `streams.nii.gz` labels (0 = in the brain but unlabelled; -1 = outside the brain)
STREAMS = {
    0: "unknown",
    1: "early",
    2: "midventral",
    3: "midlateral",
    4: "midparietal",
    5: "ventral",
    6: "lateral",
    7: "parietal",
}
STREAM_IDS = {name: label for label, name in STREAMS.items()}

N_SUBJECTS = 8
DESIGN_SESSIONS = 40  # NSD's design: 40 sessions of 750 trials for every subject (some subjects did fewer)
BETAS_SCALE = 300.0  # stored int16 betas are percent signal change x 300


EXPDESIGN = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIM_INFO = "nsddata/experiments/nsd/nsd_stim_info_merged.csv"
STIMULI = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"


def roi_file(subject: int, name: str) -> str:
    """`name` is an ROI file stem such as ``nsdgeneral`` or ``streams``."""
    return f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi/{name}.nii.gz"


def betas_folder(subject: int) -> str:
    return f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"


def betas_file(subject: int, session: int, suffix: str = ".nii.gz") -> str:
    """One session's betas; `session` is 1-based. `suffix` is ``.nii.gz`` or ``.hdf5``."""
    return f"{betas_folder(subject)}/betas_session{session:02d}{suffix}"


# Local paths under a root folder (what brainldm.offline.synthetic writes, and what tests open)


def expdesign_path(root: str | Path) -> Path:
    return Path(root) / EXPDESIGN


def stim_info_path(root: str | Path) -> Path:
    return Path(root) / STIM_INFO


def stimuli_path(root: str | Path) -> Path:
    return Path(root) / STIMULI


def roi_path(root: str | Path, subject: int, name: str) -> Path:
    return Path(root) / roi_file(subject, name)


def betas_path(root: str | Path, subject: int, session: int, suffix: str = ".nii.gz") -> Path:
    return Path(root) / betas_file(subject, session, suffix)


# --- readers: each validates what it reads and raises InputError naming the file -----------------------------


@dataclass(frozen=True)
class ExpDesign:
    """``nsd_expdesign.mat``, as stored: 1-based ``masterordering`` (n_trials,), ``subjectim`` (8, n), ``sharedix``."""

    masterordering: np.ndarray
    subjectim: np.ndarray
    sharedix: np.ndarray

    @property
    def trials_per_session(self) -> int:
        """Trials in every session of the design (NSD: 30,000 / 40 = 750): trial t (0-based) is volume
        ``t % trials_per_session`` of session ``t // trials_per_session + 1``."""
        n = len(self.masterordering)
        if n == 0 or n % DESIGN_SESSIONS:
            raise InputError(
                f"nsd_expdesign.mat's masterordering lists {n} trials, not {DESIGN_SESSIONS} sessions' worth; "
                "the file is damaged or not NSD's: download it again"
            )
        return n // DESIGN_SESSIONS

    def session_trials(self, session: int) -> np.ndarray:
        """The 0-based trial numbers of one session's volumes, in volume order."""
        if not 1 <= session <= DESIGN_SESSIONS:
            raise InputError(f"NSD's design has sessions 1..{DESIGN_SESSIONS}, not {session}")
        per = self.trials_per_session
        return np.arange((session - 1) * per, session * per)

    def trial_images(self, subject: int, trials: np.ndarray) -> np.ndarray:
        """0-based 73k image id shown in each of the subject's given 0-based ``trials``."""
        return self.subjectim[subject - 1, self.masterordering[np.asarray(trials)] - 1] - 1

    @property
    def shared(self) -> np.ndarray:
        """0-based ids of the shared images (the test set)."""
        return self.sharedix - 1


def read_expdesign(root: str | Path | Storage) -> ExpDesign:
    storage = as_storage(root)
    path = storage.local(EXPDESIGN, "NSD experiment design")
    try:
        mat = scipy.io.loadmat(path)
        design = ExpDesign(
            masterordering=np.asarray(mat["masterordering"]).astype(np.int64).ravel(),
            subjectim=np.asarray(mat["subjectim"]).astype(np.int64),
            sharedix=np.asarray(mat["sharedix"]).astype(np.int64).ravel(),
        )
    except (KeyError, ValueError, OSError, TypeError) as err:
        raise InputError(
            f"could not read {storage.url(EXPDESIGN)}: {err!r}; expected masterordering, subjectim and sharedix"
        ) from err
    if design.subjectim.ndim != 2 or design.subjectim.shape[0] != N_SUBJECTS:
        raise InputError(f"{path}: subjectim should be {N_SUBJECTS} x n, got shape {design.subjectim.shape}")
    if design.masterordering.min() < 1 or design.masterordering.max() > design.subjectim.shape[1]:
        raise InputError(
            f"{path}: masterordering must hold 1-based indices into subjectim's {design.subjectim.shape[1]}"
        )
    return design


def read_stim_info(root: str | Path | Storage) -> pd.DataFrame:
    """``nsd_stim_info_merged.csv`` indexed by 0-based ``nsdId``."""
    storage = as_storage(root)
    path = storage.local(STIM_INFO, "NSD stimulus info")
    try:
        info = pd.read_csv(path, index_col=0)
    except (ValueError, pd.errors.ParserError) as err:
        raise InputError(f"could not read {storage.url(STIM_INFO)}: {oneline(err)}; download it again") from err
    missing = [column for column in ("nsdId", "cocoId", "cocoSplit") if column not in info.columns]
    if missing:
        raise InputError(
            f"{storage.url(STIM_INFO)} has no {', '.join(missing)} column(s); is it NSD's nsd_stim_info_merged.csv?"
        )
    return info.set_index("nsdId", drop=False)


def _complete_npy(path: Path) -> bool:
    """Whether ``path`` is a whole ``.npy`` file: its header reads and its size is the header's plus the data's."""
    try:
        with open(path, "rb") as f:
            np.lib.format.read_magic(f)
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            return path.stat().st_size == f.tell() + int(np.prod(shape)) * dtype.itemsize
    except (OSError, ValueError):
        return False


class Stimuli:
    """Random access to ``nsd_stimuli.hdf5``'s ``imgBrick`` (n, H, W, 3 uint8). Use as a context manager.

    From a remote root, only the pictures ``nsd_ids`` name are fetched (each one's byte range of the file, many at
    a time), once: they are kept in the storage's cache, so a resumed or repeated run fetches none again, as long as
    the bucket's file is the one they came from (its size and ETag) and each cached picture is whole.
    """

    def __init__(self, root: str | Path | Storage, nsd_ids=None):
        self.storage = as_storage(root)
        self.url = self.storage.url(STIMULI)
        self._file = None
        if not self.storage.remote:
            try:
                self._file = h5py.File(self.storage.local(STIMULI, "NSD stimuli"), "r")
                self.brick = self._file["imgBrick"]
            except (OSError, KeyError) as err:
                raise InputError(f"could not read imgBrick from {self.url}: {oneline(err)}") from err
            return
        if nsd_ids is None:
            raise ValueError("a remote root needs the nsd_ids to fetch")
        self.folder = self.storage.cache / f"{STIMULI}.images"
        self._fetch(sorted({int(i) for i in nsd_ids}))

    def _fetch(self, nsd_ids: list[int], batch: int = 64) -> None:
        version = self.storage.version(STIMULI)
        cached = cached_version(self.folder)
        if self.folder.exists() and cached != version:
            said = "no record of what they came from" if cached is None else f"from {cached}, now {version}"
            self.storage.note(f"{self.url} is not what its cached pictures came from ({said}); fetching them again")
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        record_version(self.folder, version)  # every picture in the folder is of this version
        missing = [i for i in nsd_ids if not _complete_npy(self.folder / f"{i}.npy")]
        if not missing:
            return
        with self.storage.open_hdf5(STIMULI, "NSD stimuli") as f:
            if "imgBrick" not in f:
                raise InputError(f"{self.url} has no imgBrick; is it NSD's nsd_stimuli.hdf5?")
            brick = f["imgBrick"]
            if brick.ndim != 4 or brick.shape[3] != 3 or brick.dtype != np.uint8:
                raise InputError(
                    f"{self.url}: imgBrick is {brick.shape} {brick.dtype}, not pictures x H x W x 3 uint8 as NSD's"
                )
            if max(missing) >= len(brick):
                raise InputError(f"{self.url} holds {len(brick):,} pictures, not picture {max(missing)}")
            filtered = brick.id.get_create_plist().get_nfilters() > 0
            if brick.chunks in (None, (1, *brick.shape[1:])) and not filtered:
                self._fetch_pictures(brick, missing, batch)
            else:
                self._fetch_chunks(brick, missing, batch)

    def _write(self, nsd_id: int, picture: np.ndarray) -> None:
        with atomic_path(self.folder / f"{nsd_id}.npy") as tmp:
            np.save(tmp, picture)

    def _fetch_pictures(self, brick, missing: list[int], batch: int) -> None:
        """NSD's layout (contiguous, or one picture a chunk, unfiltered): each picture is one byte range."""
        shape = brick.shape[1:]
        coords = np.zeros((len(missing), brick.ndim), dtype=np.int64)
        coords[:, 0] = missing
        offsets, sizes, _ = chunk_ranges(self.storage, STIMULI, brick, coords)
        if (offsets < 0).any():
            raise InputError(f"{self.url} holds no picture {missing[int(np.argmax(offsets < 0))]}")
        for start in range(0, len(missing), batch):
            part = slice(start, start + batch)
            blocks = self.storage.read_ranges(STIMULI, offsets[part], sizes[part])
            for nsd_id, block in zip(missing[part], blocks):
                self._write(nsd_id, np.frombuffer(block, np.uint8).reshape(shape))

    def _fetch_chunks(self, brick, missing: list[int], batch: int) -> None:
        """Any other chunking (several pictures a chunk, parts of pictures, partial chunks at the edges) and any
        filters (gzip, shuffle, ...): the chunks that hold the pictures are fetched and decoded, nothing else."""
        chunks, shape = brick.chunks, brick.shape
        grid = [range(-(-n // c)) for n, c in zip(shape[1:], chunks[1:])]
        rows = sorted({i // chunks[0] for i in missing})
        coords = np.array([(r, *rest) for r in rows for rest in itertools.product(*grid)], dtype=np.int64)
        offsets, sizes, masks = chunk_ranges(self.storage, STIMULI, brick, coords)
        if (offsets < 0).any():
            row = int(coords[np.argmax(offsets < 0), 0])
            wanted = [i for i in missing if i // chunks[0] == row]
            raise InputError(f"{self.url} holds no picture {wanted[0]} (its chunk was never written)")
        plist = brick.id.get_create_plist()
        filters = ", ".join(plist.get_filter(k)[3].decode() for k in range(plist.get_nfilters())) or "no filters"
        picture_bytes = int(np.prod(shape[1:]))
        self.storage.note(
            f"{self.url}: imgBrick is stored in chunks of {chunks} ({filters}), not one picture a chunk: fetching "
            f"the {len(coords):,} chunks that hold the {len(missing):,} pictures, "
            f"{sizes.sum() / 2**20:,.1f} MiB for {len(missing) * picture_bytes / 2**20:,.1f} MiB of pictures"
        )
        decode = ChunkDecoder(brick)
        per_row = len(coords) // len(rows)  # the chunks across one picture row of the chunk grid
        rows_a_batch = max(1, batch // chunks[0])
        wanted = set(missing)
        try:
            for first in range(0, len(rows), rows_a_batch):
                part = slice(first * per_row, (first + rows_a_batch) * per_row)
                blocks = self.storage.read_ranges(STIMULI, offsets[part], sizes[part])
                pictures: dict[int, np.ndarray] = {}
                for coord, block, mask in zip(coords[part], blocks, masks[part]):
                    values = decode(block, mask)  # a whole chunk: an edge chunk's values beyond the brick are padding
                    start = coord * chunks
                    stop = np.minimum(start + chunks, shape)
                    inside = tuple(slice(0, n) for n in stop[1:] - start[1:])
                    where = tuple(slice(a, b) for a, b in zip(start[1:], stop[1:]))
                    for nsd_id in wanted.intersection(range(start[0], stop[0])):
                        picture = pictures.setdefault(nsd_id, np.empty(shape[1:], np.uint8))
                        picture[where] = values[(nsd_id - start[0], *inside)]
                for nsd_id, picture in pictures.items():
                    self._write(nsd_id, picture)
        finally:
            decode.close()

    def __getitem__(self, nsd_id: int) -> np.ndarray:
        try:
            if self._file is not None:
                return self.brick[int(nsd_id)]
            return np.load(self.folder / f"{int(nsd_id)}.npy")
        except (OSError, IndexError, ValueError) as err:
            raise InputError(f"could not read image {nsd_id} from {self.url}: {oneline(err)}") from err

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> Stimuli:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_roi(root: str | Path | Storage, subject: int, name: str) -> nib.Nifti1Image:
    storage = as_storage(root)
    path = storage.local(roi_file(subject, name), f"subj{subject:02d} {name} ROI")
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
    except Exception as err:  # nibabel raises many types for a bad file
        raise InputError(
            f"could not read {storage.url(roi_file(subject, name))}: {oneline(err)}; the file may be truncated or "
            "corrupt: download it again"
        ) from err
    return nib.Nifti1Image(np.round(data).astype(np.int16), image.affine)


def list_sessions(root: str | Path | Storage, subject: int, first: int | None = None) -> list[int]:
    """The subject's sessions 1, 2, ... (each a ``betas_sessionNN.nii.gz`` or its ``.hdf5`` twin), or only the
    ``first`` of them.

    A missing session before a later one is an error naming it, unless ``first`` stops before the gap.
    """
    storage = as_storage(root)
    folder = storage.url(betas_folder(subject))
    present = _present_sessions(storage, subject)
    wanted = range(1, (first or max(present)) + 1)
    missing = [s for s in wanted if s not in present]
    if missing and (first is None or first <= max(present)):
        raise InputError(
            f"betas of session {missing[0]} are missing from {folder} (sessions up to {max(present)} are there); "
            f"download betas_session{missing[0]:02d}.nii.gz, or pass --sessions {missing[0] - 1} to use only the "
            "sessions before it"
            if missing[0] > 1
            else f"{folder} has betas but not betas_session01"
        )
    if first is not None and first > max(present):
        raise InputError(
            f"--sessions {first} asks for more sessions than subject {subject} has ({max(present)}, in {folder})"
        )
    return list(wanted)


def check_sessions(root: str | Path | Storage, subject: int, sessions) -> list[int]:
    """The given session numbers (any order, any subset, as NSD's withheld sessions leave) as a list, each checked
    to be there, once."""
    storage = as_storage(root)
    sessions = [int(s) for s in sessions]
    present = _present_sessions(storage, subject)
    repeated = sorted({s for s in sessions if sessions.count(s) > 1})
    if not sessions or repeated:
        raise InputError(f"--sessions must name each session once, got {sessions}")
    missing = [s for s in sessions if s not in present]
    if missing:
        raise InputError(
            f"session {missing[0]} of subject {subject} is not in {storage.url(betas_folder(subject))} (sessions "
            f"there: {', '.join(map(str, sorted(present)))})"
        )
    return sessions


def _present_sessions(storage: Storage, subject: int) -> set[int]:
    folder = storage.url(betas_folder(subject))
    present = {
        int(name[len("betas_session") :].split(".")[0])
        for name in storage.listdir(betas_folder(subject))
        if name.startswith("betas_session") and name.endswith((".nii.gz", ".hdf5"))
    }
    if not present:
        raise InputError(f"no betas for subject {subject}: no betas_sessionNN.nii.gz or .hdf5 in {folder}")
    return present


def betas_source(root: str | Path | Storage, subject: int, session: int) -> str:
    """The file one session's betas are read from: the ``.hdf5`` twin where it exists (it can be read in parts),
    else the ``.nii.gz``."""
    storage = as_storage(root)
    hdf5 = betas_file(subject, session, ".hdf5")
    return hdf5 if storage.exists(hdf5) else betas_file(subject, session)


def betas_shape(root: str | Path | Storage, subject: int, session: int) -> tuple[int, ...]:
    """(X, Y, Z, n_trials) of one session's betas, read from the header only."""
    storage = as_storage(root)
    rel = betas_source(storage, subject, session)
    try:
        if rel.endswith(".hdf5"):
            with storage.open_hdf5(rel) as f:
                shape = tuple(reversed(f["betas"].shape))  # MATLAB-written: h5py sees the axes reversed
        else:
            with _open_nifti(storage, rel) as (header, _):
                shape = header.get_data_shape()
    except InputError:
        raise
    except Exception as err:
        raise InputError(
            f"could not read the header of {storage.url(rel)}: {oneline(err)}; "
            "the file may be truncated or corrupt: download it again"
        ) from err
    if len(shape) != 4:
        raise InputError(f"{storage.url(rel)}: expected X x Y x Z x trials betas, got shape {shape}")
    return shape


def read_betas(root: str | Path | Storage, subject: int, session: int, ijk: np.ndarray) -> np.ndarray:
    """One session's betas at voxels ``ijk`` (n_voxels, 3) -> (n_trials, n_voxels) float32 percent signal change.

    Reads the ``.hdf5`` twin when present: only the chunks of the wanted voxels (NSD stores each voxel's trials as
    one chunk), as few large byte ranges, so a remote root fetches a few percent of the file. Else it streams the
    NIfTI one volume at a time, so memory stays at a volume, not the session's 1 GB.
    """
    storage = as_storage(root)
    rel = betas_source(storage, subject, session)
    try:
        values = _read_hdf5_betas(storage, rel, ijk) if rel.endswith(".hdf5") else _read_nifti_betas(storage, rel, ijk)
    except InputError:
        raise
    except Exception as err:
        raise InputError(
            f"could not read betas from {storage.url(rel)}: {oneline(err)}; the file may be truncated or corrupt: "
            "download it again"
        ) from err
    return values / np.float32(BETAS_SCALE)


@contextmanager
def _open_nifti(storage: Storage, rel: str):
    """(header, stream positioned at the data) of a gzipped NIfTI, local or remote, without reading its data."""
    # read front to back: a few 4 MB blocks at a time, not the whole session kept in memory
    raw = open(storage.local(rel), "rb") if not storage.remote else RangeFile(storage, rel, block=4 * 2**20, keep=2)
    with raw, gzip.GzipFile(fileobj=raw) as stream:
        header = nib.Nifti1Header.from_fileobj(stream)
        stream.seek(int(header.get_data_offset()))
        yield header, stream


def _read_nifti_betas(storage: Storage, rel: str, ijk: np.ndarray) -> np.ndarray:
    """Stream a (X, Y, Z, T) NIfTI volume by volume: NIfTI is column-major, so each volume is contiguous."""
    with _open_nifti(storage, rel) as (header, stream):
        shape, dtype = header.get_data_shape(), header.get_data_dtype()
        n_voxels = int(np.prod(shape[:3]))
        flat = np.ravel_multi_index(tuple(ijk.T), shape[:3], order="F")
        slope, inter = header.get_slope_inter()
        values = np.empty((shape[3], len(ijk)), dtype=np.float32)
        for t in range(shape[3]):
            chunk = stream.read(n_voxels * dtype.itemsize)
            if len(chunk) != n_voxels * dtype.itemsize:
                raise OSError(f"the file ends at volume {t + 1} of {shape[3]}")
            values[t] = np.frombuffer(chunk, dtype=dtype)[flat]
    if slope is not None and not np.isnan(slope) and (slope, inter) != (1.0, 0.0):
        values = values * np.float32(slope) + np.float32(inter or 0.0)
    return values


def _read_hdf5_betas(storage: Storage, rel: str, ijk: np.ndarray) -> np.ndarray:
    with storage.open_hdf5(rel) as f:
        data = f["betas"]  # (T, Z, Y, X)
        n_trials = data.shape[0]
        if data.chunks == (n_trials, 1, 1, 1) and not data.id.get_create_plist().get_nfilters():
            # NSD's layout: each voxel's trials are one chunk; read those chunks, nothing else
            coords = np.zeros((len(ijk), 4), dtype=np.int64)
            coords[:, 1:] = ijk[:, ::-1]
            offsets, sizes, _ = chunk_ranges(storage, rel, data, coords)
            values = np.full((len(ijk), n_trials), data.fillvalue, dtype=data.dtype)
            stored = np.flatnonzero(offsets >= 0)
            if len(stored):
                blocks = storage.read_ranges(rel, offsets[stored], sizes[stored])
                values[stored] = np.frombuffer(b"".join(blocks), dtype=data.dtype).reshape(len(stored), n_trials)
            return values.T.astype(np.float32)
        # any other layout: h5py reads blocks of whole volumes
        values = np.empty((n_trials, len(ijk)), dtype=np.float32)
        for start in range(0, n_trials, 32):
            volumes = data[start : start + 32]
            values[start : start + len(volumes)] = volumes[:, ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    return values
