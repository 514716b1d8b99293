"""COCO's caption annotations, read from where COCO keeps them: NSD's bucket does not hold them.

NSD's pictures are COCO images and c is made from their COCO captions (the 2017 train and val caption annotations).
NSD ships no captions: its reader ``nsd_access`` (github.com/tknapen/nsd_access, ``download_coco_annotation_file``)
downloads COCO's own archive, :data:`COCO_ANNOTATIONS_URL`, and unpacks it into :data:`NSD_ANNOTATIONS` of a local
NSD copy. A caption source is one of:

- the archive at a URL (COCO's by default, or a mirror): where the server answers range requests, only the bytes of
  the two caption members are fetched (the zip's central directory says where they lie), else the whole archive,
  once. What is fetched is kept in the cache with the size and ETag the server gave, and used again only while the
  server still says so (one HEAD request);
- a local copy of the archive (``annotations_trainval2017.zip``);
- a local folder holding ``captions_train2017.json`` and ``captions_val2017.json`` (or an ``annotations/`` folder of
  them, as the archive unpacks).

With no source named, a local NSD root with the JSONs (or the archive) where ``nsd_access`` puts them is used, else
COCO's URL.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from brainldm.data.storage import RemoteFile, Storage, cached_version, default_cache_dir, is_url, record_version
from brainldm.paths import atomic_path
from brainldm.validation import InputError, oneline

# COCO's download page (cocodataset.org/#download) and nsd_access's default; about 241 MB
COCO_ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"
ARCHIVE_NAME = "annotations_trainval2017.zip"
COCO_SPLITS = ("train2017", "val2017")
NSD_ANNOTATIONS = "nsddata_stimuli/stimuli/nsd/annotations"  # where nsd_access unpacks them in an NSD root
FLAG = "--coco-annotations"
TAIL = 16 * 1024  # read first: a zip's end record and (COCO's archive has six members) its central directory
BLOCK = 8 * 1024  # the least read by range: a member's local header
ATTEMPTS = 3
TIMEOUT_S = 30
READ_BLOCK = 8 * 2**20


def caption_name(split: str) -> str:
    return f"captions_{split}.json"


def caption_member(split: str) -> str:
    """The member's name in COCO's archive."""
    return f"annotations/{caption_name(split)}"


def _help() -> str:
    return (
        f"pass {FLAG} with a local copy of {ARCHIVE_NAME}, a folder holding {caption_name('train2017')} and "
        f"{caption_name('val2017')}, or a mirror's URL"
    )


class CocoCaptions:
    """COCO's captions from one source (a URL, a local archive or a folder; see the module docstring).

    ``bytes_fetched`` and ``requests`` count what was fetched from a URL; ``progress`` shows a download's bytes.
    """

    def __init__(self, source: str | Path, cache_dir: str | Path | None = None, progress: bool = False):
        self.source = str(source)
        self.remote = is_url(source)
        self.bytes_fetched = 0
        self.requests = 0
        self.notes: list[str] = []
        self._progress = progress
        if self.remote:
            scheme = self.source.split("://", 1)[0]
            if scheme not in ("http", "https"):
                raise InputError(f"{FLAG} {self.source}: only http(s) URLs are read; {_help()}")
            where = urlsplit(self.source)
            self.cache = Path(cache_dir or default_cache_dir()) / "coco" / where.netloc.replace(":", "_")
            self.cache = self.cache / where.path.strip("/").removesuffix(".zip")
            self._opener = urllib.request.build_opener()  # honours http_proxy / no_proxy as they are now
            return
        path = Path(source)
        if path.is_dir():
            folder = path / "annotations" if (path / "annotations" / caption_name("train2017")).is_file() else path
            missing = [caption_name(s) for s in COCO_SPLITS if not (folder / caption_name(s)).is_file()]
            if missing:
                raise InputError(f"{path} holds no {missing[0]}; {_help()}")
            self.folder, self.archive = folder, None
        elif path.is_file():
            self.folder, self.archive = None, path
        else:
            raise InputError(f"{FLAG} {path} does not exist; {_help()}")

    def __str__(self) -> str:
        return self.source

    @classmethod
    def for_nsd(
        cls,
        nsd_root: Storage,
        source: str | Path | CocoCaptions | None = None,
        cache_dir: str | Path | None = None,
        progress: bool = False,
    ) -> CocoCaptions:
        """The caption source for an NSD root: ``source`` if given, else the JSONs (or archive) a local NSD root holds
        where ``nsd_access`` puts them, else COCO's URL."""
        if isinstance(source, CocoCaptions):
            return source
        if source is None:
            source = COCO_ANNOTATIONS_URL
            if not nsd_root.remote:
                local = Path(nsd_root.root) / NSD_ANNOTATIONS
                if any((local / caption_name(s)).is_file() for s in COCO_SPLITS):
                    source = local  # the user's copy: one of the two missing is an error naming it
                elif (local / ARCHIVE_NAME).is_file():
                    source = local / ARCHIVE_NAME
        return cls(source, cache_dir=cache_dir, progress=progress)

    # --- reading ---------------------------------------------------------------------------------------------

    def read(self, coco_ids) -> dict[int, list[str]]:
        """All COCO captions of each requested cocoId (whitespace-stripped, in COCO's annotation order), from the
        train2017 and val2017 files."""
        wanted = {int(c) for c in coco_ids}
        captions: dict[int, list[tuple[int, str]]] = {c: [] for c in wanted}
        for split, (where, document) in self._documents().items():
            try:
                annotations = json.loads(document)["annotations"]
                for a in annotations:
                    if a["image_id"] in captions:
                        captions[a["image_id"]].append((a["id"], a["caption"].strip()))
            except (ValueError, KeyError, TypeError) as err:
                raise InputError(f"could not read {where}: {err!r}; expected COCO's {caption_name(split)}") from err
        missing = sorted(c for c, caps in captions.items() if not caps)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InputError(
                f"no COCO captions for cocoId {missing[0]}{more} in {self.source}; are these COCO's 2017 caption "
                f"annotations? {_help()}"
            )
        return {c: [text for _, text in sorted(caps)] for c, caps in captions.items()}

    def _documents(self) -> dict[str, tuple[str, bytes]]:
        """split -> (where it was read, the JSON's bytes)."""
        if self.remote:
            paths = self._fetch()
            return {s: (f"{self.source}!{caption_member(s)}", paths[s].read_bytes()) for s in COCO_SPLITS}
        if self.folder is not None:
            paths = {s: self.folder / caption_name(s) for s in COCO_SPLITS}
            return {s: (str(path), path.read_bytes()) for s, path in paths.items()}
        try:
            with zipfile.ZipFile(self.archive) as archive:
                members = _caption_members(archive, str(self.archive))
                return {s: (f"{self.archive}!{members[s]}", archive.read(members[s])) for s in COCO_SPLITS}
        except (zipfile.BadZipFile, OSError) as err:
            raise InputError(f"could not read {self.archive}: {oneline(err)}; is it a zip? {_help()}") from err

    # --- fetching from a URL ------------------------------------------------------------------------------------

    def _fetch(self) -> dict[str, Path]:
        """Local copies of the two caption JSONs of the archive at the URL: from the cache while the server says the
        archive is the one they came from, else fetched (ranges where the server answers them, else the whole)."""
        size, version, ranges = self._head()
        paths = {s: self.cache / caption_name(s) for s in COCO_SPLITS}
        if all(p.is_file() and cached_version(p) == version for p in paths.values()):
            return paths
        if any(p.is_file() for p in paths.values()):
            self._note(f"{self.source} is not what the cached captions came from ({version}); fetching them again")
        self.cache.mkdir(parents=True, exist_ok=True)
        if ranges and size:
            try:
                self._fetch_members(size, paths, version)
                return paths
            except _WholeAnswer as answer:  # asked for a range, given the whole archive: keep it
                self._note(f"{self.source} answered a range request with the whole archive; reading that")
                with answer.response as response:
                    self._unpack(self._download(response, size), paths, version)
                return paths
        with self._get() as response:
            self._unpack(self._download(response, size), paths, version)
        return paths

    def _fetch_members(self, size: int, paths: dict[str, Path], version: str) -> None:
        """The caption members by range requests: the archive's end (its central directory), then each member."""
        remote = _RemoteZip(self, size)
        remote.prefetch(max(0, size - TAIL), size)
        self._extract(io.BufferedReader(remote, buffer_size=BLOCK), paths, version)

    def _extract(self, archive, paths: dict[str, Path], version: str) -> None:
        """The two caption members of ``archive`` (a path or file) into the cache, each recorded as of ``version``."""
        try:
            with zipfile.ZipFile(archive) as zipped:
                members = _caption_members(zipped, self.source)
                for split, path in paths.items():
                    with zipped.open(members[split]) as src, atomic_path(path) as tmp, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst, READ_BLOCK)
                    record_version(path, version)
        except zipfile.BadZipFile as err:
            raise InputError(f"{self.source} is not a readable zip archive ({oneline(err)}); {_help()}") from err

    def _download(self, response, size: int | None) -> Path:
        """Stream a GET's whole body into the cache (atomically); returns the archive's path."""
        archive = self.cache / ARCHIVE_NAME
        bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"fetching {self.source}",
                   disable=not self._progress)  # fmt: skip
        with bar, atomic_path(archive) as tmp, open(tmp, "wb") as dst:
            try:
                while block := response.read(READ_BLOCK):
                    dst.write(block)
                    self.bytes_fetched += len(block)
                    bar.update(len(block))
            except OSError as err:
                raise InputError(f"could not fetch {self.source}: {oneline(err)}; run again, or {_help()}") from err
            if size and tmp.stat().st_size != size:
                raise InputError(f"{self.source} ended after {tmp.stat().st_size:,} of {size:,} bytes; run again")
        return archive

    def _unpack(self, archive: Path, paths: dict[str, Path], version: str) -> None:
        """The caption members out of a downloaded archive; the archive itself is not kept."""
        try:
            self._extract(archive, paths, version)
        finally:
            archive.unlink(missing_ok=True)

    def _head(self) -> tuple[int | None, str, bool]:
        """(size, version, whether ranges are answered) from a HEAD request."""
        with self._request("HEAD") as response:
            headers = response.headers
        size = int(headers["Content-Length"]) if headers.get("Content-Length") else None
        tag = (headers.get("ETag") or headers.get("Last-Modified") or "").strip('"')
        return size, f"{size}:{tag}", headers.get("Accept-Ranges", "").lower() == "bytes"

    def _get(self, start: int | None = None, end: int | None = None):
        headers = {} if start is None else {"Range": f"bytes={start}-{end - 1}"}
        return self._request("GET", headers)

    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the archive; raises :class:`_WholeAnswer` if the server sends the whole file."""
        response = self._get(start, end)
        if response.status != 206:
            raise _WholeAnswer(response)
        with response:
            try:
                data = response.read()
            except OSError as err:
                raise InputError(f"could not fetch {self.source}: {oneline(err)}; run again, or {_help()}") from err
        if len(data) != end - start:
            raise InputError(f"{self.source} sent {len(data):,} bytes for a range of {end - start:,}; run again")
        self.bytes_fetched += len(data)
        return data

    def _request(self, method: str, headers: dict | None = None):
        headers = {"User-Agent": "brainldm", **(headers or {})}
        request = urllib.request.Request(self.source, method=method, headers=headers)
        for attempt in range(ATTEMPTS):
            self.requests += 1
            try:
                return self._opener.open(request, timeout=TIMEOUT_S)
            except urllib.error.HTTPError as err:
                if err.code < 500 or attempt == ATTEMPTS - 1:
                    raise InputError(f"could not fetch {self.source}: HTTP {err.code} {err.reason}; {_help()}") from err
            except (urllib.error.URLError, OSError) as err:
                if attempt == ATTEMPTS - 1:
                    reason = getattr(err, "reason", err)
                    raise InputError(
                        f"could not fetch {self.source}: {oneline(reason)}; check the network, or {_help()}"
                    ) from err
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _note(self, message: str) -> None:
        self.notes.append(message)
        if self._progress:
            tqdm.write(message)


class _WholeAnswer(Exception):
    """A range request answered with the whole file (status 200): the response, to read it all."""

    def __init__(self, response):
        super().__init__("the server does not answer range requests")
        self.response = response


def _caption_members(archive: zipfile.ZipFile, where: str) -> dict[str, str]:
    """split -> the member holding its captions (``annotations/captions_<split>.json`` in COCO's archive)."""
    names = archive.namelist()
    members = {}
    for split in COCO_SPLITS:
        found = [n for n in names if n == caption_member(split) or n.rsplit("/", 1)[-1] == caption_name(split)]
        if not found:
            raise InputError(f"{where} holds no {caption_member(split)}; is it COCO's {ARCHIVE_NAME}? {_help()}")
        members[split] = found[0]
    return members


class _RemoteZip(RemoteFile):
    """A read-only file over the archive at a URL, read by range requests: small pieces (the end record, the central
    directory, local headers) are kept; a member's data is fetched as asked, once."""

    def __init__(self, captions: CocoCaptions, size: int):
        super().__init__(size)
        self.captions = captions
        self.kept: list[tuple[int, bytes]] = []

    def prefetch(self, start: int, end: int) -> None:
        self.kept.append((start, self.captions.read_range(start, end)))

    def readinto(self, buffer) -> int:
        end = min(self.position + len(buffer), self.length)
        if end <= self.position:
            return 0
        for start, data in self.kept:
            if start <= self.position and end <= start + len(data):
                piece = data[self.position - start : end - start]
                break
        else:
            piece = self.captions.read_range(self.position, end)
            if len(piece) <= 1024 * 1024:
                self.kept.append((self.position, piece))
        n = len(piece)
        memoryview(buffer)[:n] = piece
        self.position += n
        return n
