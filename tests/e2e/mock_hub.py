"""A stand-in for the Hugging Face Hub on loopback, so a test can download a model offline.

It answers the part of the Hub's HTTP API that ``huggingface_hub`` (the httpx-based 1.x/2.x
releases) uses to fetch a model repository, with the headers the client checks:

* ``GET /api/models/{repo}`` and ``.../revision/{rev}``: model info, the commit ``sha`` and the
  ``siblings`` (YAIE's resolver reads both before downloading anything);
* ``GET /api/models/{repo}/tree/{rev}?recursive=...``: the file listing ``snapshot_download``
  walks, with git blob ids and, for LFS files, their sha256 and size;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: a small file is answered in place with
  ``X-Repo-Commit`` and ``ETag`` (its git blob sha1); an LFS file (the weights) with a 302 to a
  "CDN" on another host name (``localhost`` instead of ``127.0.0.1``, the same server) carrying
  ``X-Repo-Commit``, ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``, as the Hub redirects to
  its storage. The client reads the metadata off the redirect and fetches the bytes from there.

It also serves ``GET /api/agent-harnesses``, a registry ``huggingface_hub`` fetches (at most
daily, cached in ``HF_HOME``) to label its user agent, as an empty registry.

Errors carry the Hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``), so the client raises the same exceptions it would against the real Hub.
Nothing here speaks Xet: without Xet headers the client takes the plain HTTP path.

Every request is recorded (method and path), so a test can tell a download from a cache hit.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Stored with git LFS on the Hub (the default .gitattributes of a model repo, in short).
LFS_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".gguf", ".pt", ".pth", ".onnx")
_LFS_POINTER_SIZE = 134  # bytes of a git-lfs pointer file with a sha256 oid and a size line
_LAST_MODIFIED = "2024-01-01T00:00:00.000Z"


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a file's content: what the Hub sends as a plain file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(slots=True)
class HubFile:
    path: str
    data: bytes
    sha256: str = field(init=False)
    blob_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        if self.is_lfs:  # git stores the pointer; the Hub's blob id is the pointer's
            pointer = (
                "version https://git-lfs.github.com/spec/v1\n"
                f"oid sha256:{self.sha256}\nsize {len(self.data)}\n"
            ).encode()
            self.blob_id = git_blob_sha1(pointer)
        else:
            self.blob_id = git_blob_sha1(self.data)

    @property
    def is_lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)


@dataclass(slots=True)
class HubRepo:
    """One model repository at one commit (``main`` points at it)."""

    repo_id: str
    files: dict[str, HubFile]
    sha: str

    @classmethod
    def from_files(cls, repo_id: str, files: Mapping[str, bytes]) -> HubRepo:
        entries = {path: HubFile(path, data) for path, data in sorted(files.items())}
        manifest = "".join(f"{f.path} {f.blob_id}\n" for f in entries.values())
        return cls(repo_id, entries, hashlib.sha1(manifest.encode()).hexdigest())

    def has_revision(self, revision: str) -> bool:
        return revision in ("main", self.sha)

    def model_info(self) -> dict:
        return {
            "_id": self.sha[:24],
            "id": self.repo_id,
            "modelId": self.repo_id,
            "author": self.repo_id.split("/")[0],
            "sha": self.sha,
            "lastModified": _LAST_MODIFIED,
            "createdAt": _LAST_MODIFIED,
            "private": False,
            "gated": False,
            "disabled": False,
            "library_name": "transformers",
            "tags": ["transformers", "safetensors", "gpt2", "text-generation"],
            "pipeline_tag": "text-generation",
            "siblings": [{"rfilename": path} for path in self.files],
        }

    def tree(self) -> list[dict]:
        entries = []
        for f in self.files.values():
            entry: dict = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": f.path}
            if f.is_lfs:
                entry["lfs"] = {
                    "oid": f.sha256,
                    "size": len(f.data),
                    "pointerSize": _LFS_POINTER_SIZE,
                }
            entries.append(entry)
        return entries


@dataclass(slots=True)
class Request:
    method: str
    path: str  # without the query string


class MockHub:
    """The HTTP server; ``url`` is what ``HF_ENDPOINT`` should say."""

    def __init__(self, repos: list[HubRepo]) -> None:
        self.repos = {r.repo_id: r for r in repos}
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn_url = f"http://localhost:{self.port}"  # another host name: the client's "CDN"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> MockHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append(Request(method, path))

    def take_requests(self) -> list[Request]:
        """The requests since the last call, oldest first."""
        with self._lock:
            taken, self.requests = self.requests, []
        return taken

    def blob(self, sha256: str) -> HubFile | None:
        for repo in self.repos.values():
            for f in repo.files.values():
                if f.sha256 == sha256:
                    return f
        return None


@contextmanager
def serve_hub(repos: list[HubRepo]) -> Iterator[MockHub]:
    hub = MockHub(repos).start()
    try:
        yield hub
    finally:
        hub.stop()


_MODEL_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?/?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)/?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha256>[0-9a-f]{64})$")
AGENT_HARNESSES = "/api/agent-harnesses"


def _handler(hub: MockHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

        def log_message(self, format: str, *args) -> None:  # quiet: the test reads hub.requests
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        def _route(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.record(self.command, path)
            if path == AGENT_HARNESSES:
                return self._json({"standardEnvVars": [], "harnesses": {}}, body)
            if m := _CDN.match(path):
                f = hub.blob(m["sha256"])
                if f is None:
                    return self._send(404, b"not found", body)
                return self._send(200, f.data, body, {"ETag": f'"{f.sha256}"'})
            if m := _TREE.match(path):
                repo = self._repo(m["repo"], m["rev"], body)
                if repo is not None:
                    self._json(repo.tree(), body)
                return None
            if m := _MODEL_INFO.match(path):
                repo = self._repo(m["repo"], m["rev"] or "main", body)
                if repo is not None:
                    self._json(repo.model_info(), body)
                return None
            if m := _RESOLVE.match(path):
                repo = self._repo(m["repo"], m["rev"], body)
                if repo is None:
                    return None
                f = repo.files.get(m["file"])
                commit = {"X-Repo-Commit": repo.sha}
                if f is None:
                    return self._error(404, "EntryNotFound", body, commit)
                if f.is_lfs:
                    return self._send(302, b"", body, {
                        **commit,
                        "Location": f"{hub.cdn_url}/cdn/{f.sha256}",
                        "X-Linked-Etag": f'"{f.sha256}"',
                        "X-Linked-Size": str(len(f.data)),
                        "ETag": f'"{f.blob_id}"',
                    })  # fmt: skip
                return self._send(200, f.data, body, {**commit, "ETag": f'"{f.blob_id}"'})
            return self._send(404, b"not found", body)

        def _repo(self, repo_id: str, revision: str, body: bool) -> HubRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:  # the Hub answers 401 for a missing repo when not logged in
                self._error(401, "RepoNotFound", body)
                return None
            if not repo.has_revision(revision):
                self._error(404, "RevisionNotFound", body)
                return None
            return repo

        def _error(self, status: int, code: str, body: bool, headers: dict | None = None) -> None:
            message = {"RepoNotFound": "Repository not found"}.get(code, code)
            payload = json.dumps({"error": message}).encode()
            self._send(status, payload, body, {
                **(headers or {}),
                "X-Error-Code": code,
                "X-Error-Message": message,
                "Content-Type": "application/json",
            })  # fmt: skip

        def _json(self, value: object, body: bool) -> None:
            payload = json.dumps(value).encode()
            self._send(200, payload, body, {"Content-Type": "application/json"})

        def _send(
            self, status: int, payload: bytes, body: bool, headers: dict | None = None
        ) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body:
                self.wfile.write(payload)

    return Handler
