"""A loopback Hugging Face Hub for tests: huggingface_hub's real client talks to it through HF_ENDPOINT.

It answers the requests ``HfApi.model_info`` / ``list_repo_tree`` / ``verify_repo_checksums``,
``hf_hub_download`` and ``snapshot_download`` make, the way huggingface.co answers them (as read in
huggingface_hub 2.4: ``utils/_http.py:hf_raise_for_status``, ``file_download.py:get_hf_file_metadata``,
``hf_api.py:RepoFile``):

- ``GET /api/models/{repo}[/revision/{rev}]``: model info (``id``, ``sha``, ``siblings``, ``gated``).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=``: ``{type, oid, size, path}`` per entry, plus
  ``lfs: {oid: sha256, size, pointerSize}`` for LFS files; ``oid`` is the git blob id (of the LFS pointer
  for LFS files), which is what ``verify_repo_checksums`` compares non-LFS files against.
- ``HEAD/GET /{repo}/resolve/{rev}/{file}``: small files answer 200 with ``ETag`` (git blob id),
  ``X-Repo-Commit`` and ``Content-Length``; LFS files answer 302 to a CDN URL on another loopback host
  (127.0.0.2, so the client treats it as off-Hub and drops the Authorization header) with
  ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``. The CDN honours ``Range`` (206 + Content-Range).
- Failures as the Hub sends them: missing repo 401 (anonymous) / 404 with ``X-Error-Code: RepoNotFound``;
  gated repo files 401 (anonymous) / 403 (token without access) with ``X-Error-Code: GatedRepo`` while
  its API pages stay public; unknown revision 404 ``RevisionNotFound``; missing file 404 ``EntryNotFound``.

Every request lands in ``server.log``. ``throttle`` slows named files so a test can interrupt a
transfer; ``sent`` counts the bytes of each file written so far.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE once, at import, so the CLI under test runs
in a subprocess with its environment set (``cli_env`` / ``run_cli``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

# What .gitattributes sends through LFS on the Hub by default (plus anything over 10 MB).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".gguf", ".model", ".h5", ".onnx", ".msgpack")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 16 * 1024


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content: sha1 of ``blob {size}\\0{content}``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class ServedFile:
    path: str
    data: bytes
    lfs: bool
    advertised_size: int | None = None  # a test may announce a size other than the real one

    @property
    def size(self) -> int:
        return len(self.data) if self.advertised_size is None else self.advertised_size

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()

    @property
    def oid(self) -> str:
        return git_blob_id(self.pointer if self.lfs else self.data)

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return entry


@dataclass
class ServedRepo:
    repo_id: str
    files: dict[str, ServedFile]
    gated: bool = False
    allowed_tokens: set[str] = field(default_factory=set)  # tokens whose account was granted access
    tags: dict[str, str] = field(default_factory=dict)  # extra refs (name -> commit); "main" is implicit

    @property
    def commit(self) -> str:
        digest = hashlib.sha1(self.repo_id.encode())
        for path in sorted(self.files):
            digest.update(f"{path}:{self.files[path].oid}\n".encode())
        return digest.hexdigest()

    def resolve(self, revision: str) -> str | None:
        refs = {"main": self.commit, **self.tags}
        if revision in refs:
            return refs[revision]
        return revision if revision == self.commit else None

    @classmethod
    def from_folder(cls, repo_id: str, folder: Path, extra: dict[str, bytes] | None = None,
                    sizes: dict[str, int] | None = None, **kwargs) -> ServedRepo:
        """Serves every file under ``folder`` (plus ``extra`` files), ``sizes`` overriding announced sizes."""
        contents = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        contents.update(extra or {})
        files = {
            path: ServedFile(path, data, lfs=path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE,
                             advertised_size=(sizes or {}).get(path))
            for path, data in contents.items()
        }
        return cls(repo_id, files, **kwargs)


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    status: int
    repo_id: str | None = None
    file: str | None = None  # the repo file a resolve/CDN request is about
    range: str | None = None
    authorization: str | None = None


class HubServer:
    """``with HubServer() as hub: hub.add(ServedRepo...); env HF_ENDPOINT=hub.url``."""

    def __init__(self) -> None:
        self.repos: dict[str, ServedRepo] = {}
        self.log: list[LoggedRequest] = []
        self.throttle: dict[str, float] = {}  # file path -> bytes per second
        self.sent: dict[str, int] = {}  # file path -> bytes written by GETs so far
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self.url = self.cdn_url = ""

    def add(self, repo: ServedRepo) -> ServedRepo:
        self.repos[repo.repo_id] = repo
        return repo

    def start(self) -> HubServer:
        hub = self._listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{hub.server_address[1]}"
        try:  # a second loopback address plays the CDN: off-Hub for the client, like cdn-lfs.hf.co
            cdn = self._listen("127.0.0.2", 0)
            self.cdn_url = f"http://127.0.0.2:{cdn.server_address[1]}"
        except OSError:  # systems without 127.0.0.2 (macOS): a same-host redirect, which the client follows
            self.cdn_url = self.url
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def requests_for(self, repo_id: str, method: str | None = None) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.log if r.repo_id == repo_id and (method is None or r.method == method)]

    def files_fetched(self, repo_id: str) -> set[str]:
        """Repo files whose content was requested (GET on resolve or the CDN)."""
        return {r.file for r in self.requests_for(repo_id, "GET") if r.file}

    def _listen(self, host: str, port: int) -> ThreadingHTTPServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name=f"hub-{host}", daemon=True).start()
        self._servers.append(server)
        return server

    def record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    def count_sent(self, path: str, n: int) -> None:
        with self._lock:
            self.sent[path] = self.sent.get(path, 0) + n


def closed_port_url() -> str:
    """An endpoint nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/(?P<path>.+))?)?$"
)
_CDN = re.compile(r"^/cdn/(?P<repo>[^/]+/[^/]+)/(?P<sha>[0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, format, *args) -> None:  # the request log replaces stderr chatter
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    # -- routing -------------------------------------------------------------------------------------------

    def _route(self, body: bool) -> None:
        url = urlsplit(self.path)
        self._repo_id = self._file = None
        if m := _API.match(url.path):
            self._api(m, parse_qs(url.query), body)
        elif m := _CDN.match(url.path):
            self._cdn(m, body)
        elif m := _RESOLVE.match(url.path):
            self._resolve(m, body)
        else:
            self._error(404, None, "Not Found", body)

    def _repo(self, repo_id: str, body: bool) -> ServedRepo | None:
        self._repo_id = repo_id
        repo = self.server_hub.repos.get(repo_id)
        if repo is None:
            # Anonymous callers get 401 for private and missing repos alike; authenticated ones 404.
            status = 404 if self._token() else 401
            self._error(status, "RepoNotFound", "Repository not found", body)
        return repo

    def _revision(self, repo: ServedRepo, revision: str, body: bool) -> str | None:
        commit = repo.resolve(unquote(revision))
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(revision)}", body)
        return commit

    def _api(self, m: re.Match, query: dict, body: bool) -> None:
        repo = self._repo(m["repo"], body)
        if repo is None:
            return
        commit = self._revision(repo, m["rev"] or "main", body)
        if commit is None:
            return
        if m["kind"] != "tree":
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = [
                {"rfilename": f.path, **({"size": f.size, "blobId": f.oid} if blobs else {}),
                 **({"lfs": f.tree_entry()["lfs"]} if blobs and f.lfs else {})}
                for f in repo.files.values()
            ]
            info = {
                "_id": commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": commit, "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z",
                "private": False, "disabled": False, "gated": "manual" if repo.gated else False,
                "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            }
            self._json(info, body)
            return
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = (unquote(m["path"]).strip("/") + "/") if m["path"] else ""
        entries, folders = [], set()
        for f in sorted(repo.files.values(), key=lambda f: f.path):
            if not f.path.startswith(prefix):
                continue
            rest = f.path[len(prefix):]
            if "/" in rest:
                parts = rest.split("/")[:-1]
                for i in range(1 if not recursive else len(parts)):
                    folders.add(prefix + "/".join(parts[: i + 1]))
                if not recursive:
                    continue
            entries.append(f.tree_entry())
        dirs = [{"type": "directory", "oid": git_blob_id(d.encode()), "size": 0, "path": d} for d in sorted(folders)]
        self._json(dirs + entries, body)

    def _resolve(self, m: re.Match, body: bool) -> None:
        repo = self._repo(m["repo"], body)
        if repo is None:
            return
        commit = self._revision(repo, m["rev"], body)
        if commit is None:
            return
        path = unquote(m["file"])
        self._file = path
        if repo.gated and self._token() not in repo.allowed_tokens:
            if self._token():
                message = (f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                           f"Visit {self.server_hub.url}/{repo.repo_id} to ask for access.")
                self._error(403, "GatedRepo", message, body, commit)
            else:
                message = (f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                           "authenticated to access it. Please log in.")
                self._error(401, "GatedRepo", message, body, commit)
            return
        f = repo.files.get(path)
        if f is None:
            self._error(404, "EntryNotFound", "Entry not found", body, commit)
            return
        if f.lfs:
            location = f"{self.server_hub.cdn_url}/cdn/{repo.repo_id}/{f.sha256}"
            self._send(302, b"", body, {
                "Location": location, "X-Repo-Commit": commit, "ETag": f'"{f.oid}"',
                "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
            })
            return
        self._content(f, body, {"ETag": f'"{f.oid}"', "X-Repo-Commit": commit})

    def _cdn(self, m: re.Match, body: bool) -> None:
        # Signed CDN URLs need no token; the client must not send one here (it would leak off the Hub).
        repo = self.server_hub.repos.get(m["repo"])
        self._repo_id = m["repo"]
        f = next((f for f in (repo.files.values() if repo else []) if f.lfs and f.sha256 == m["sha"]), None)
        if f is None:
            self._error(404, None, "Not Found", body)
            return
        self._file = f.path
        self._content(f, body, {"ETag": f'"{f.sha256}"', "X-Repo-Commit": repo.commit})

    # -- responses -----------------------------------------------------------------------------------------

    def _content(self, f: ServedFile, body: bool, headers: dict[str, str]) -> None:
        data, status = f.data, 200
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if self.headers.get("Range"):
            rm = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers["Range"].strip())
            if not rm or int(rm[1]) >= len(f.data):
                headers["Content-Range"] = f"bytes */{len(f.data)}"
                self._send(416, b"", body, headers)
                return
            start = int(rm[1])
            stop = min(int(rm[2]) + 1 if rm[2] else len(f.data), len(f.data))
            data, status = f.data[start:stop], 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(f.data)}"
        self._send(status, data, body, headers, throttle_path=f.path)

    def _json(self, payload, body: bool) -> None:
        self._send(200, json.dumps(payload).encode(), body, {"Content-Type": "application/json; charset=utf-8"})

    def _error(self, status: int, code: str | None, message: str, body: bool, commit: str | None = None) -> None:
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), body, headers)

    def _send(self, status: int, data: bytes, body: bool, headers: dict[str, str], throttle_path: str | None = None):
        hub = self.server_hub
        hub.record(LoggedRequest(self.command, urlsplit(self.path).path, status, self._repo_id, self._file,
                                 self.headers.get("Range"), self.headers.get("Authorization")))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body or not data:
            return
        rate = hub.throttle.get(throttle_path or "")
        try:
            if not rate:
                self.wfile.write(data)
                hub.count_sent(throttle_path or "", len(data))
                return
            for i in range(0, len(data), CHUNK):
                self.wfile.write(data[i:i + CHUNK])
                self.wfile.flush()
                hub.count_sent(throttle_path or "", len(data[i:i + CHUNK]))
                time.sleep(CHUNK / rate)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-transfer (killed, interrupted)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer "):] if auth.startswith("Bearer ") else None


def resolve_url(endpoint: str, repo_id: str, filename: str, revision: str = "main") -> str:
    return f"{endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"


REPO_ROOT = Path(__file__).resolve().parent.parent


def cli_env(endpoint: str, hf_home: Path, **extra: str) -> dict[str, str]:
    """This process's environment with a private HF_HOME, the given endpoint, and no token or offline flag."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1",
               TOKENIZERS_PARALLELISM="false", COLUMNS="200")
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def run_cli(*args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 120):
    """``edge-llm ARGS`` in a fresh process; returns the CompletedProcess (text stdout/stderr)."""
    return subprocess.run(cli_command(*args), env=env, input=stdin if stdin is not None else "", text=True,
                          capture_output=True, timeout=timeout, cwd=REPO_ROOT)
