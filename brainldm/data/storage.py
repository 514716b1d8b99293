"""Where a dataset's files live: a local folder, or any fsspec URL such as NSD's public bucket.

A :class:`Storage` reads files by their path relative to its root. A local root reads the files in place. A remote
root (``s3://natural-scenes-dataset``, or any fsspec URL) fetches only what is asked for:

- small files whole, once, into a local cache (:func:`default_cache_dir`), so a second run fetches nothing again;
  every cache entry records what the store said of its object when it was fetched (size and ETag, see
  :meth:`Storage.version`) and is trusted only while the store still says so: an object replaced in the bucket
  (even by one of the same size) or a damaged entry is fetched again, with a note on the progress line;
- large files as byte ranges: ranges closer than ``max_gap`` are merged into one request, and the requests run
  concurrently;
- an HDF5 file through :meth:`Storage.open_hdf5`, which reads its metadata in small blocks.

S3 is read anonymously unless AWS credentials are configured, from the endpoint that ``AWS_ENDPOINT_URL`` names (as
every AWS client does). Transient failures (timeouts, 5xx answers, dropped connections) are retried with back-off by
botocore's standard retry mode, in at most ``AWS_MAX_ATTEMPTS`` attempts (default 3, as in AWS's own clients). A
missing bucket or file, a refused access or no network ends in one :class:`~brainldm.validation.InputError` that
names the URL.
"""

from __future__ import annotations

import bisect
import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from brainldm.paths import atomic_path
from brainldm.validation import InputError, oneline

NSD_BUCKET = "s3://natural-scenes-dataset"
DEFAULT_MAX_GAP = 16 * 1024  # bytes: fetching a gap this small costs less than another request
MAX_REQUEST = 16 * 2**20  # bytes: merged requests stop growing here, so that they still run concurrently
METADATA_BLOCK = 64 * 1024  # bytes read at a time while h5py reads an HDF5 file's metadata


class AccessDenied(InputError):
    """The store refused to give an object it may list (no rights, or not yet released)."""


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


def default_cache_dir() -> Path:
    """``$BRAINLDM_CACHE``, else ``brainldm`` in the user cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    if os.environ.get("BRAINLDM_CACHE"):
        return Path(os.environ["BRAINLDM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "brainldm"


class Storage:
    """A dataset root (local folder or URL), read by relative path. ``bytes_fetched`` and ``requests`` count what was
    fetched (for a local root: the byte ranges read); with ``progress`` a remote root shows the bytes and the rate."""

    def __init__(self, root: str | Path, cache_dir: str | Path | None = None, progress: bool = False):
        self.remote = is_url(root)
        if self.remote:
            protocol, path = str(root).split("://", 1)
            if not path.strip("/"):
                raise InputError(
                    f"{str(root)!r} names no bucket or folder after {protocol}://; NSD's bucket is {NSD_BUCKET}"
                )
        self.root = str(root).rstrip("/") if self.remote else Path(root)
        self.bytes_fetched = 0
        self.requests = 0
        self._progress = progress
        self._bar = None
        self._listings: dict[str, dict[str, tuple[int, str]]] = {}
        self.notes: list[str] = []  # what was said on the progress line (cache entries fetched again)
        if self.remote:
            self.fs = _filesystem(self.root)
            key = self.root.split("://", 1)[1].replace(":", "_")
            self.cache = Path(cache_dir or default_cache_dir()) / "files" / key
            with self._errors(""):
                self.fs.ls(self.root, detail=False)  # one request: a missing bucket or no network fails here
        else:
            if not self.root.is_dir():
                raise InputError(f"{self.root} is not a folder; pass a local copy of NSD or a URL such as {NSD_BUCKET}")
            self.cache = None

    def __str__(self) -> str:
        return str(self.root)

    def url(self, rel: str) -> str:
        """Where ``rel`` lives: a URL, or a local path."""
        if not rel:
            return str(self.root)
        return f"{self.root}/{rel}" if self.remote else str(self.root / rel)

    # --- whole files ---------------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return (self.root / rel).is_file()
        folder, _, name = rel.rpartition("/")
        return name in self._listing(folder)

    def listdir(self, rel: str) -> list[str]:
        """File names in the folder ``rel`` (empty if it does not exist)."""
        if not self.remote:
            folder = self.root / rel
            return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        return sorted(self._listing(rel))

    def _listing(self, folder: str) -> dict[str, tuple[int, str]]:
        """Name -> (size, version) of the files in a remote folder, listed once (one request, whatever is later
        asked). The version is what the store says identifies the object's content: its ETag (S3, GCS), else its
        version id or modification time."""
        if folder not in self._listings:
            try:
                with self._errors(folder):
                    entries = self.fs.ls(self.url(folder), detail=True)
            except InputError as err:
                if not isinstance(err.__cause__, FileNotFoundError):
                    raise
                entries = []
            self._count(0, 1)
            files = [e for e in entries if e["type"] == "file"]
            self._listings[folder] = {
                e["name"].rstrip("/").rsplit("/", 1)[-1]: (int(e["size"] or 0), _object_tag(e)) for e in files
            }
        return self._listings[folder]

    def version(self, rel: str) -> str:
        """What the store says of ``rel`` now, as one string (``size:ETag``), from the folder's listing. A cache entry
        made from an object is trusted only while this is unchanged; a local file's is its size and mtime."""
        if not self.remote:
            stat = (self.root / rel).stat()
            return f"{stat.st_size}:{stat.st_mtime_ns}"
        folder, _, name = rel.rpartition("/")
        entry = self._listing(folder).get(name)
        if entry is None:
            raise InputError(f"missing file: {self.url(rel)} does not exist")
        return f"{entry[0]}:{entry[1]}"

    def note(self, message: str) -> None:
        """A line on the progress output (kept in :attr:`notes`)."""
        self.notes.append(message)
        if self._progress:
            tqdm.write(message)

    def local(self, rel: str, what: str = "file") -> Path:
        """A local path to ``rel``: the file itself, or (remote) its cached copy, fetched whole the first time."""
        if not self.remote:
            path = self.root / rel
            if not path.is_file():
                raise InputError(f"missing {what}: {path} does not exist")
            return path
        path = self.cache / rel
        if not self.exists(rel):
            raise InputError(f"missing {what}: {self.url(rel)} does not exist")
        version, size = self.version(rel), self.size(rel)
        if path.is_file():
            if cached_version(path) == version and path.stat().st_size == size:
                return path
            self.note(
                f"{self.url(rel)}: the cached copy is not the bucket's ({self._why(path, version)}); fetching it again"
            )
        _version_record(path).unlink(missing_ok=True)
        with self._errors(rel), atomic_path(path) as tmp:
            with self.fs.open(self.url(rel), "rb", block_size=MAX_REQUEST) as src, open(tmp, "wb") as dst:
                while block := src.read(MAX_REQUEST):
                    dst.write(block)
                    self._count(len(block), 1)
            if tmp.stat().st_size != size:
                raise InputError(
                    f"{self.url(rel)} changed while it was fetched ({tmp.stat().st_size:,} bytes, the listing said "
                    f"{size:,}); run again"
                )
        record_version(path, version)
        return path

    def _why(self, entry: Path, version: str) -> str:
        cached = cached_version(entry)
        if cached is None:
            return "no record of what it was fetched from"
        if cached != version:
            return f"fetched from {cached}, the bucket now holds {version}"
        return "damaged: its size is not the object's"

    # --- parts of files ------------------------------------------------------------------------------------

    def size(self, rel: str) -> int:
        if not self.remote:
            return (self.root / rel).stat().st_size
        folder, _, name = rel.rpartition("/")
        entries = self._listing(folder)
        if name not in entries:
            raise InputError(f"missing file: {self.url(rel)} does not exist")
        return entries[name][0]

    def read_ranges(
        self, rel: str, starts: Sequence[int], sizes: Sequence[int], max_gap: int = DEFAULT_MAX_GAP
    ) -> list[bytes]:
        """The bytes ``[start, start + size)`` of ``rel`` for each pair, in the order given.

        Ranges closer than ``max_gap`` bytes (or overlapping) are fetched as one request, up to :data:`MAX_REQUEST`;
        a remote root runs the requests concurrently. A file shorter than a range is an error naming it.
        """
        if len(starts) == 0:
            return []
        spans = merge_ranges(starts, sizes, max_gap)
        if self.remote:
            url = self.url(rel)
            with self._errors(rel):
                blocks = self.fs.cat_ranges([url] * len(spans), [s for s, _ in spans], [e for _, e in spans])
            for block in blocks:
                if isinstance(block, Exception):
                    with self._errors(rel):
                        raise block
        else:
            with open(self.root / rel, "rb") as f:
                blocks = []
                for start, end in spans:
                    f.seek(start)
                    blocks.append(f.read(end - start))
        self._count(sum(len(b) for b in blocks), len(spans))
        out = []
        span_starts = [s for s, _ in spans]
        for start, size in zip(starts, sizes):
            k = bisect.bisect_right(span_starts, start) - 1
            offset = start - span_starts[k]
            piece = blocks[k][offset : offset + size]
            if len(piece) != size:
                raise InputError(
                    f"{self.url(rel)} ends before byte {start + size:,}: the file is truncated; "
                    "download it again (or check the URL)"
                )
            out.append(piece)
        return out

    @contextmanager
    def open_hdf5(self, rel: str, what: str = "HDF5 file") -> Iterator:
        """``h5py.File`` on ``rel``: in place when local, over byte ranges when remote (metadata in small blocks)."""
        import h5py

        if not self.remote:
            with h5py.File(self.local(rel, what), "r") as f:
                yield f
            return
        if not self.exists(rel):
            raise InputError(f"missing {what}: {self.url(rel)} does not exist")
        raw = RangeFile(self, rel)
        # the first block before h5py sees the file: an object the store refuses (or a missing one) fails here, in
        # Python; failing inside h5py's open leaves HDF5 holding the file object, which crashes the interpreter's exit
        raw.readinto(bytearray(1))
        raw.seek(0)
        try:
            with h5py.File(raw, "r") as f:
                yield f
        except InputError:
            raise
        except Exception:
            if raw.error is not None:  # h5py turns a failed read into its own OSError: give the cause instead
                raise raw.error from None
            raise

    # --- bookkeeping ---------------------------------------------------------------------------------------

    def _count(self, n_bytes: int, n_requests: int) -> None:
        self.bytes_fetched += n_bytes
        self.requests += n_requests
        if self._progress and self.remote:
            if self._bar is None:
                self._bar = tqdm(desc=f"fetched from {self.root}", unit="B", unit_scale=True, unit_divisor=1024)
            self._bar.update(n_bytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @contextmanager
    def _errors(self, rel: str) -> Iterator[None]:
        """Turn what a remote filesystem raises (after its retries) into one InputError naming the URL."""
        url = self.url(rel)
        try:
            yield
        except InputError:
            raise
        except FileNotFoundError as err:
            raise InputError(
                f"{url} does not exist ({oneline(err)}); check the URL (NSD's bucket is {NSD_BUCKET}) or use a "
                "local copy"
            ) from err
        except PermissionError as err:
            raise AccessDenied(
                f"access to {url} was denied ({oneline(err)}); NSD's bucket is readable by anyone who has agreed to "
                "NSD's terms of use: check your AWS credentials (or unset them to read anonymously), or use a local "
                "copy"
            ) from err
        except Exception as err:  # no network, refused connections, timeouts: botocore, aiohttp or OS errors
            raise InputError(
                f"could not fetch {url}: {type(err).__name__}: {oneline(err)}; check the network and the URL (and "
                "AWS_ENDPOINT_URL if set), or use a local copy of NSD"
            ) from err


def merge_ranges(starts: Sequence[int], sizes: Sequence[int], max_gap: int) -> list[tuple[int, int]]:
    """Sorted (start, end) spans covering every ``[start, start + size)``; neighbours less than ``max_gap`` apart
    share a span, up to :data:`MAX_REQUEST` bytes each."""
    spans: list[tuple[int, int]] = []
    for start, end in sorted((int(s), int(s) + int(n)) for s, n in zip(starts, sizes)):
        if spans and start <= spans[-1][1] + max_gap and max(end, spans[-1][1]) - spans[-1][0] <= MAX_REQUEST:
            spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
        else:
            spans.append((start, end))
    return spans


class RemoteFile(io.RawIOBase):
    """A read-only, seekable file of ``length`` bytes whose :meth:`readinto` fetches what is asked: the base of
    :class:`RangeFile` and of :mod:`brainldm.data.coco`'s archive reader."""

    def __init__(self, length: int):
        super().__init__()
        self.length, self.position = length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = base + offset
        return self.position


class RangeFile(RemoteFile):
    """A read-only file over a remote object, fetched in :data:`METADATA_BLOCK` blocks and kept: what h5py needs
    to read an HDF5 file's metadata without downloading it."""

    def __init__(self, storage: Storage, rel: str, block: int = METADATA_BLOCK, keep: int = 256):
        super().__init__(storage.size(rel))
        self.storage, self.rel, self.block, self.keep = storage, rel, block, keep
        self.blocks: dict[int, bytes] = {}
        self.error: InputError | None = None

    def readinto(self, buffer) -> int:
        end = min(self.position + len(buffer), self.length)
        if end <= self.position:
            return 0
        first, last = self.position // self.block, (end - 1) // self.block
        missing = [b for b in range(first, last + 1) if b not in self.blocks]
        if missing:
            starts = [b * self.block for b in missing]
            sizes = [min(self.block, self.length - s) for s in starts]
            try:
                for b, data in zip(missing, self.storage.read_ranges(self.rel, starts, sizes, max_gap=0)):
                    self.blocks[b] = data
            except InputError as err:
                self.error = err
                raise
        data = b"".join(self.blocks[b] for b in range(first, last + 1))
        while len(self.blocks) > self.keep:  # forget the oldest blocks: a stream read front to back needs few
            del self.blocks[next(iter(self.blocks))]
        offset = self.position - first * self.block
        n = end - self.position
        memoryview(buffer)[:n] = data[offset : offset + n]
        self.position = end
        return n


def _version_record(entry: Path) -> Path:
    return entry.with_name(f".{entry.name}.version")


def cached_version(entry: Path) -> str | None:
    """The version a cache entry (file or folder) was fetched from, as its source said then; None if unknown."""
    try:
        return _version_record(entry).read_text()
    except OSError:
        return None


def record_version(entry: Path, version: str) -> None:
    """Note that the cache entry ``entry`` holds its source's object of ``version`` (written after the entry)."""
    with atomic_path(_version_record(entry)) as tmp:
        tmp.write_text(version)


def _object_tag(entry: dict) -> str:
    """What identifies an object's content in a listing entry: ETag, else version id, else modification time."""
    for key in ("ETag", "etag", "VersionId", "generation", "md5Hash", "mtime", "LastModified", "last_modified"):
        if entry.get(key):
            return str(entry[key]).strip('"')
    return ""


# --- filesystems -----------------------------------------------------------------------------------------------


def _filesystem(url: str):
    """The fsspec filesystem for ``url``: S3 anonymous unless credentials are configured, with bounded retries."""
    import fsspec

    protocol = url.split("://", 1)[0]
    options: dict = {"skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        options.update(
            anon=not _aws_credentials_configured(),
            config_kwargs={
                "retries": {"mode": "standard", "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", 3))},
                "connect_timeout": 10,
                "read_timeout": 60,
                "max_pool_connections": 32,
            },
        )
    from fsspec.registry import known_implementations

    if protocol not in known_implementations and protocol not in fsspec.available_protocols():
        raise InputError(
            f"cannot read {url}: fsspec knows no protocol {protocol!r}; use a local folder or a URL such as "
            f"{NSD_BUCKET} (s3, gs, https, ... each through the package that adds it to fsspec)"
        )
    try:
        return fsspec.filesystem(protocol, **options)
    except ImportError as err:
        package = known_implementations.get(protocol, {}).get("class", "").split(".")[0] or "its fsspec package"
        raise InputError(
            f"cannot read {url}: {protocol}:// needs the package {package} ({oneline(err)}); pip install {package}"
        ) from err
    except ValueError as err:
        raise InputError(f"cannot read {url}: {oneline(err)}") from err


def _aws_credentials_configured() -> bool:
    """Whether AWS credentials are set up (environment or the shared files); looks nothing up on the network."""
    if any(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE")):
        return True
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws/credentials"]
    return any(Path(f).is_file() for f in files)


def as_storage(root: str | Path | Storage) -> Storage:
    """``root`` as a :class:`Storage` (a folder or URL becomes one, without a progress bar)."""
    return root if isinstance(root, Storage) else Storage(root)
