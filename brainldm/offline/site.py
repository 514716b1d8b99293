"""A plain HTTP server of a local folder, standing for COCO's site (``images.cocodataset.org``) in the offline world.

It answers HEAD and GET as a static file server does (Content-Length, ETag, Last-Modified), with range requests
(``Accept-Ranges: bytes``, status 206) or, with ``ranges=False``, as a server that ignores them (no Accept-Ranges,
every GET answered with the whole file). Every GET is counted: requests, bytes sent and the ranges asked, by path.
"""

from __future__ import annotations

import email.utils
import threading
from collections import defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class LocalServer:
    """A threaded HTTP server on a free port of 127.0.0.1 (``url``), serving while in a ``with`` block, every request
    answered by ``handler`` (a :class:`QuietHandler` subclass); ``bytes_sent`` and ``requests`` count by path, under
    ``_lock``. The base of both offline servers."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        self.bytes_sent: dict[str, int] = defaultdict(int)
        self.requests: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self):
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


class FolderSite(LocalServer):
    """``with FolderSite(folder) as site:`` serves ``folder`` on ``site.url`` (``site.url + "/a/b.zip"`` is
    ``folder/a/b.zip``)."""

    def __init__(self, folder: str | Path, ranges: bool = True):
        self.folder, self.ranges = Path(folder), ranges
        self.ranges_asked: dict[str, list[tuple[int, int]]] = defaultdict(list)
        super().__init__(_handler(self))

    def count(self, path: str, n_bytes: int, span: tuple[int, int] | None) -> None:
        with self._lock:
            self.bytes_sent[path] += n_bytes
            self.requests[path] += 1
            if span is not None:
                self.ranges_asked[path].append(span)

    def fetched(self) -> int:
        """Bytes sent by GETs, all paths."""
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        with self._lock:
            self.bytes_sent.clear()
            self.requests.clear()
            self.ranges_asked.clear()


class QuietHandler(BaseHTTPRequestHandler):
    """An HTTP/1.1 handler that logs nothing and answers HEAD and GET with ``_answer(head)``: the base of both
    offline servers' handlers."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, head: bool) -> None:
        raise NotImplementedError


def _handler(site: FolderSite):
    class Handler(QuietHandler):
        def _answer(self, head: bool) -> None:
            rel = unquote(urlsplit(self.path).path).lstrip("/")
            path = site.folder / rel
            if ".." in Path(rel).parts or not path.is_file():
                body = b"Not Found"
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                return
            send_file(self, path, head, ranges=site.ranges, sending=lambda n, span: site.count(rel, n, span))

    return Handler


def send_file(
    handler: BaseHTTPRequestHandler,
    path: Path,
    head: bool,
    ranges: bool = True,
    content_type: str = "application/zip",
    sending: Callable[[int, tuple[int, int] | None], None] | None = None,
) -> None:
    """Answer a HEAD or GET of the file at ``path`` as a static file server does (Content-Length, ETag, Last-Modified;
    with ``ranges``, Accept-Ranges and a 206 for a Range request, else the whole file). A GET calls ``sending`` with
    the bytes and the range [start, end) (None: the whole file) before it sends them, so that a client that has its
    answer finds it counted. Also :mod:`brainldm.offline.bucket`'s GetObject."""
    stat = path.stat()
    start, end, status = 0, stat.st_size - 1, 200
    if ranges and "Range" in handler.headers and not head:
        first, _, last = handler.headers["Range"].removeprefix("bytes=").partition("-")
        start, end, status = int(first), min(int(last or stat.st_size - 1), stat.st_size - 1), 206
    handler.send_response(status)
    handler.send_header("Content-Length", str(end - start + 1))
    handler.send_header("Content-Type", content_type)
    handler.send_header("ETag", f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"')
    handler.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
    if ranges:
        handler.send_header("Accept-Ranges", "bytes")
    if status == 206:
        handler.send_header("Content-Range", f"bytes {start}-{end}/{stat.st_size}")
    handler.end_headers()
    if head:
        return
    with open(path, "rb") as f:
        f.seek(start)
        body = f.read(end - start + 1)
    if sending is not None:
        sending(len(body), (start, end + 1) if status == 206 else None)
    handler.wfile.write(body)
