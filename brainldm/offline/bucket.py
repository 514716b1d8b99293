"""A minimal S3 endpoint serving a local folder read-only, for the rehearsal and the benchmarks: the calls s3fs makes
to read (ListObjectsV2, HeadObject, GetObject with a Range), answered from disk, every request counted (bytes by key).

Why not moto, as the tests use: moto's GetObject reads the whole object into memory before slicing the range, so each
range request of a 1 GB session file would cost a 1 GB copy, and a measurement would measure moto. ``latency_ms`` adds
a fixed delay to every answer, to see how a client behaves at S3's round-trip times.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

from brainldm.offline.site import LocalServer, QuietHandler, send_file


class FolderS3(LocalServer):
    """``with FolderS3(folder, bucket) as s3:`` serves ``folder`` as ``s3://bucket`` on ``s3.url``."""

    def __init__(self, folder: str | Path, bucket: str, latency_ms: float = 0.0):
        self.folder, self.bucket, self.latency = Path(folder), bucket, latency_ms / 1000
        super().__init__(_handler(self))

    def count(self, key: str, n_bytes: int) -> None:
        with self._lock:
            self.bytes_sent[key] += n_bytes
            self.requests[key] += 1

    def reset(self) -> None:
        with self._lock:
            self.bytes_sent.clear()
            self.requests.clear()


def _handler(s3: FolderS3):
    class Handler(QuietHandler):
        def _answer(self, head: bool) -> None:
            time.sleep(s3.latency)
            url = urlsplit(self.path)
            bucket, _, key = unquote(url.path).lstrip("/").partition("/")
            if bucket != s3.bucket:
                return self._error(404, "NoSuchBucket", head)
            if not key:
                return self._list(parse_qs(url.query), head)
            path = s3.folder / key
            if not path.is_file():
                return self._error(404, "NoSuchKey", head)
            send_file(self, path, head, content_type="binary/octet-stream", sending=lambda n, _: s3.count(key, n))

        def _list(self, query: dict, head: bool) -> None:
            prefix = query.get("prefix", [""])[0]
            delimiter = query.get("delimiter", [""])[0]
            folder = s3.folder / prefix.rstrip("/") if prefix else s3.folder
            keys, prefixes = [], set()
            for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
                key = path.relative_to(s3.folder).as_posix()
                rest = key[len(prefix) :]
                if not key.startswith(prefix):
                    continue
                if delimiter and delimiter in rest:
                    prefixes.add(prefix + rest.split(delimiter)[0] + delimiter)
                elif path.is_file():
                    keys.append((key, path.stat().st_size))
            contents = "".join(
                f'<Contents><Key>{escape(k)}</Key><Size>{n}</Size><ETag>"0"</ETag>'
                "<LastModified>2026-01-01T00:00:00.000Z</LastModified><StorageClass>STANDARD</StorageClass></Contents>"
                for k, n in keys
            )
            common = "".join(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in sorted(prefixes))
            body = (
                '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>'
                f"{s3.bucket}</Name><Prefix>{escape(prefix)}</Prefix><KeyCount>{len(keys) + len(prefixes)}</KeyCount>"
                f"<MaxKeys>1000</MaxKeys><Delimiter>{escape(delimiter)}</Delimiter><IsTruncated>false</IsTruncated>"
                f"{contents}{common}</ListBucketResult>"
            ).encode()
            self._send(200, body, head)
            s3.count("(list)", len(body))

        def _error(self, status: int, code: str, head: bool) -> None:
            body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{code}</Message></Error>"
            self._send(status, body.encode(), head)

        def _send(self, status: int, body: bytes, head: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler
