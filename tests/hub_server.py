"""A small Hub-compatible HTTP server for the tests: the part of the Hugging Face Hub API that huggingface_hub's
real client uses to create repos, commit files, read repo info and trees, change settings and download files.

Test-only and in memory: files are committed as regular (base64) blobs, each commit gets a sha, ``main`` is the
newest. It records every request (method, path, Authorization header) so tests can check what the client sent
and fetched. Serve it on 127.0.0.1 and point the client at it with ``HF_ENDPOINT``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml


@dataclass
class Repo:
    kind: str  # "model" or "dataset"
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)  # (sha, files), oldest first
    settings: dict = field(default_factory=dict)

    def files(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        if revision == "main":
            return self.commits[-1] if self.commits else ("0" * 40, {})
        return next((c for c in self.commits if c[0] == revision), None)


class LocalHub:
    """``with LocalHub() as hub:`` serves on ``hub.url``; ``hub.repos[(kind, repo_id)]``; ``hub.requests``."""

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> LocalHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def commit(self, kind: str, repo_id: str, operations: list[dict], summary: str) -> str:
        repo = self.repos[(kind, repo_id)]
        files = dict(repo.commits[-1][1]) if repo.commits else {}
        for op in operations:
            if op["key"] == "file":
                files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            elif op["key"] == "deletedFile":
                files.pop(op["value"]["path"], None)
            elif op["key"] == "deletedFolder":
                prefix = op["value"]["path"].rstrip("/") + "/"
                files = {p: b for p, b in files.items() if not p.startswith(prefix)}
            else:
                raise ValueError(f"the local hub does not take {op['key']} operations")
        sha = hashlib.sha1(f"{repo_id}{len(repo.commits)}{summary}".encode()).hexdigest()
        repo.commits.append((sha, files))
        return sha


def _handler(hub: LocalHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
            body = json.dumps({"error": message}).encode()
            self._send(status, body, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _record(self) -> str:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Authorization")))
            return path

        # --- /api/... ---

        def _api(self, path: str):
            """('model'|'dataset', repo_id, action, rest) of /api/{models|datasets}/{ns}/{name}/{action}/{rest}."""
            parts = path.split("/")[2:]
            if len(parts) < 4 or parts[0] not in ("models", "datasets"):
                return None
            return parts[0][:-1], f"{parts[1]}/{parts[2]}", parts[3], "/".join(parts[4:])

        def do_POST(self) -> None:
            path = self._record()
            body = self._body()
            if path == "/api/repos/create":
                payload = json.loads(body)
                kind = payload.get("type") or "model"
                repo_id = (
                    f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                )
                prefix = "" if kind == "model" else f"{kind}s/"
                if (kind, repo_id) in hub.repos:  # as the Hub: 409, with the repo's URL
                    return self._json(
                        409, {"error": "You already created this repo", "url": f"{hub.url}/{prefix}{repo_id}"}
                    )
                # huggingface_hub 2.x says "visibility": "private" / "public"; older clients said "private": true
                private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
                hub.repos[(kind, repo_id)] = Repo(kind, settings={"private": private})
                return self._json(200, {"url": f"{hub.url}/{prefix}{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":  # a model or dataset card's metadata must at least be YAML
                content = json.loads(body)["content"]
                try:
                    yaml.safe_load(content.split("---")[1] if content.startswith("---") else "")
                except yaml.YAMLError as err:
                    return self._error(400, "BadRequest", f"invalid YAML: {err}")
                return self._json(200, {})
            api = self._api(path)
            if api is None or (api[0], api[1]) not in hub.repos:
                return self._error(404, "RepoNotFound", f"no repo for {path}")
            kind, repo_id, action, _ = api
            if action == "preupload":
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                         for f in json.loads(body)["files"]]  # fmt: skip
                return self._json(200, {"files": files})
            if action == "commit":
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                sha = hub.commit(kind, repo_id, [line for line in lines if line["key"] != "header"], header["summary"])
                prefix = "" if kind == "model" else f"{kind}s/"
                return self._json(200, {"commitUrl": f"{hub.url}/{prefix}{repo_id}/commit/{sha}", "commitOid": sha})
            return self._error(404, "NotFound", f"no route for POST {path}")

        def do_PUT(self) -> None:
            path = self._record()
            api = self._api(path)
            if api is None or (api[0], api[1]) not in hub.repos or api[2] != "settings":
                return self._error(404, "NotFound", f"no route for PUT {path}")
            hub.repos[(api[0], api[1])].settings.update(json.loads(self._body()))
            return self._json(200, {})

        def do_GET(self) -> None:
            self._get(head=False)

        def do_HEAD(self) -> None:
            self._get(head=True)

        def _get(self, head: bool) -> None:
            path = self._record()
            if path.startswith("/api/"):
                api = self._api(path)
                if api is None or (api[0], api[1]) not in hub.repos:
                    return self._error(404, "RepoNotFound", f"no repo for {path}", head)
                kind, repo_id, action, rest = api
                repo = hub.repos[(kind, repo_id)]
                if action == "revision":
                    found = repo.files(rest)
                    if found is None:
                        return self._error(404, "RevisionNotFound", f"no revision {rest}", head)
                    sha, files = found
                    siblings = [{"rfilename": p} for p in sorted(files)]
                    return self._json(200, {"id": repo_id, "sha": sha, "siblings": siblings, "private": False})
                if action == "tree":
                    revision, _, folder = rest.partition("/")
                    found = repo.files(revision)
                    if found is None:
                        return self._error(404, "RevisionNotFound", f"no revision {revision}", head)
                    entries = [
                        {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for p, b in sorted(found[1].items())
                        if not folder or p.startswith(folder.rstrip("/") + "/")
                    ]
                    return self._json(200, entries)
                return self._error(404, "NotFound", f"no route for GET {path}", head)
            # file downloads: /{ns}/{name}/resolve/{rev}/{file} and /datasets/{ns}/{name}/resolve/{rev}/{file}
            kind = "dataset" if path.startswith("/datasets/") else "model"
            parts = path.split("/")[2 if kind == "dataset" else 1 :]
            if len(parts) < 5 or parts[2] != "resolve":
                return self._error(404, "NotFound", f"no route for GET {path}", head)
            repo_id, revision, filename = f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
            if (kind, repo_id) not in hub.repos:
                return self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
            found = hub.repos[(kind, repo_id)].files(revision)
            if found is None:
                return self._error(404, "RevisionNotFound", f"no revision {revision}", head)
            sha, files = found
            if filename not in files:
                return self._error(404, "EntryNotFound", f"{filename} does not exist", head)
            content = files[filename]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(content).hexdigest()}"'}
            self._send(200, content, headers, head=head)

    return Handler
