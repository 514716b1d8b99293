"""A real S3 endpoint on 127.0.0.1 for the tests: moto's S3 (server mode) behind a thin WSGI layer that records
every request (method, object key, status, bytes sent) and can answer chosen requests with an error first.

Point any AWS client at it with ``AWS_ENDPOINT_URL=server.url``; upload with :meth:`LocalS3.upload_tree`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import boto3
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

ERROR_BODY = "<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"


@dataclass
class Request:
    method: str
    bucket: str
    key: str
    status: int
    n_bytes: int


class LocalS3:
    """``with LocalS3() as s3:`` serves on ``s3.url``; ``s3.requests`` lists what was asked and sent."""

    def __init__(self):
        self.requests: list[Request] = []
        self.failures: dict[str, tuple[int, str, int]] = {}  # key fragment -> (status, S3 error code, times left)
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._lock = threading.Lock()

    def __enter__(self) -> LocalS3:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()

    def client(self):
        return boto3.client(
            "s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="x"
        )

    def upload_tree(self, root: Path, bucket: str) -> None:
        """Every file under ``root`` as a public-read object of ``bucket`` (created), keyed by its relative path."""
        client = self.client()
        client.create_bucket(Bucket=bucket)
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, path.relative_to(root).as_posix(), ExtraArgs={"ACL": "public-read"})
        self.requests.clear()

    def fail(self, key_fragment: str, status: int = 503, code: str = "ServiceUnavailable", times: int = 1) -> None:
        """Answer the next ``times`` GETs of any key containing ``key_fragment`` with an S3 error."""
        self.failures[key_fragment] = (status, code, times)

    def fetched(self, key_fragment: str) -> int:
        """Bytes sent for GETs of keys containing ``key_fragment``."""
        return sum(r.n_bytes for r in self.requests if r.method == "GET" and key_fragment in r.key)

    def _wsgi(self, environ, start_response):
        parts = unquote(environ.get("PATH_INFO", "")).lstrip("/").split("/", 1)
        bucket, key = parts[0], parts[1] if len(parts) > 1 else ""
        method = environ["REQUEST_METHOD"]
        with self._lock:
            failure = next(
                (f for f, (_, _, left) in self.failures.items() if f in key and left > 0 and method == "GET"), None
            )
            if failure is not None:
                status, code, left = self.failures[failure]
                self.failures[failure] = (status, code, left - 1)
        if failure is not None:
            body = ERROR_BODY.format(code=code, message="injected by the test").encode()
            headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
            start_response(f"{status} {code}", headers)
            self._record(Request(method, bucket, key, status, 0))
            return [body]
        answer = {}

        def recording_start_response(status, headers, exc_info=None):
            answer["status"] = int(status.split()[0])
            return start_response(status, headers, exc_info)

        body = b"".join(self._app(environ, recording_start_response))
        self._record(Request(method, bucket, key, answer.get("status", 0), len(body)))
        return [body]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)
