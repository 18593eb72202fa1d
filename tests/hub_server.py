"""A Hugging Face Hub-compatible HTTP server for tests, on the standard library alone.

It implements what ``huggingface_hub`` (with Xet disabled: ``HF_HUB_DISABLE_XET=1``) and transformers use to
upload and download model repositories, in memory:

========================================================  ===============================================
``GET  /api/whoami-v2``                                   the user of the bearer token (401 without one)
``POST /api/repos/create``                                create a repo (409 if it exists)
``POST /api/validate-yaml``                               model card metadata check (always valid)
``POST /api/models/{repo}/preupload/{rev}``               upload mode of each file: "lfs" or "regular"
``POST /{repo}.git/info/lfs/objects/batch``               LFS batch API: where to PUT each object
``PUT  /lfs-objects/{oid}``                               an LFS object's bytes (sha256 checked)
``POST /api/models/{repo}/commit/{rev}``                  an NDJSON commit (header, file, lfsFile, deletedFile)
``GET  /api/models/{repo}[/revision/{rev}]``              model info (sha, siblings)
``GET  /api/models/{repo}/tree/{rev}[/{path}]``           the files of a revision
``HEAD|GET /{repo}/resolve/{rev}/{path}``                 a file, with ETag, X-Repo-Commit, Content-Length
========================================================  ===============================================

Errors carry the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) from which
``huggingface_hub`` tells them apart. Only the ``main`` branch (and commit hashes) exist. Run it with
:func:`serve`, which returns the server and its base URL; ``server.requests`` records every request line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

# Files stored as LFS objects, as the Hub's default .gitattributes does (by extension), or by size.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".msgpack", ".npy", ".npz", ".zip", ".gz")
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class StoredFile:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def etag(self) -> str:
        # As the Hub: LFS files are identified by their sha256, regular files by their git blob id.
        return self.sha256 if self.lfs else git_blob_sha1(self.content)


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    commits: list[tuple[str, dict[str, StoredFile]]] = field(default_factory=list)  # (sha, files), oldest first

    def snapshot(self, revision: str) -> tuple[str, dict[str, StoredFile]] | None:
        if revision == "main":
            return self.commits[-1] if self.commits else None
        for sha, files in self.commits:
            if sha == revision:
                return sha, files
        return None


class HubState:
    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)  # token -> user name
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lock = threading.Lock()


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    # ------------------------------------------------------------------------------------------------------
    # Plumbing
    # ------------------------------------------------------------------------------------------------------

    def log_message(self, format, *args):  # keep test output clean; requests are recorded instead
        pass

    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        error_headers = {"X-Error-Message": message, **(headers or {})}
        if code:
            error_headers["X-Error-Code"] = code
        self._json(status, {"error": message}, error_headers)

    def _user(self) -> str | None:
        authorization = self.headers.get("Authorization", "")
        if not authorization.lower().startswith("bearer "):
            return None
        return self.state.tokens.get(authorization[7:].strip())

    def _require_user(self) -> str | None:
        user = self._user()
        if user is None:
            self._error(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and self._user() != repo_id.split("/")[0]):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        return repo

    def _dispatch(self, routes):
        self.server.requests.append(f"{self.command} {self.path}")
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        for pattern, handler in routes:
            match = re.fullmatch(pattern, url.path)
            if match:
                with self.state.lock:
                    return handler(self, *[unquote(group) for group in match.groups() if group is not None])
        self._error(404, f"no route for {self.command} {url.path}")

    def do_GET(self):
        self._dispatch(self.GET_ROUTES)

    def do_HEAD(self):
        self._dispatch(self.HEAD_ROUTES)

    def do_POST(self):
        self._dispatch(self.POST_ROUTES)

    def do_PUT(self):
        self._dispatch(self.PUT_ROUTES)

    # ------------------------------------------------------------------------------------------------------
    # Accounts and repositories
    # ------------------------------------------------------------------------------------------------------

    def whoami(self):
        user = self._require_user()
        if user is not None:
            self._json(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                             "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def create_repo(self):
        payload = json.loads(self._body() or b"{}")
        user = self._require_user()
        if user is None:
            return
        if payload.get("type", "model") != "model":
            return self._error(400, "this test server holds model repositories only")
        namespace = payload.get("organization") or user
        if namespace != user:
            return self._error(403, f"you cannot create repositories in {namespace!r}")
        repo_id = f"{namespace}/{payload['name']}"
        if repo_id in self.state.repos:
            # As the Hub: the conflict still names the repository, which create_repo(exist_ok=True) returns.
            return self._json(409, {"error": "You already created this model repo", "url": f"{self.server.url}/{repo_id}"},
                              {"X-Error-Message": "You already created this model repo"})
        self.state.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self):
        self._body()
        self._json(200, {"errors": [], "warnings": []})

    # ------------------------------------------------------------------------------------------------------
    # Upload: preupload, LFS batch and objects, commit
    # ------------------------------------------------------------------------------------------------------

    def preupload(self, repo_id: str, revision: str):
        payload = json.loads(self._body())
        if self._require_user() is None:
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        current = repo.snapshot(revision)
        files = current[1] if current else {}
        answers = []
        for item in payload["files"]:
            lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] >= LFS_MIN_SIZE
            existing = files.get(item["path"])
            answers.append({
                "path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                "oid": existing.etag if existing is not None else None,
            })
        self._json(200, {"files": answers, "commitOid": current[0] if current else None})

    def lfs_batch(self, repo_id: str):
        payload = json.loads(self._body())
        if self._require_user() is None or self._repo(repo_id) is None:
            return
        if payload.get("operation") != "upload":
            return self._error(400, "only LFS uploads go through this server's batch API")
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.state.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{self.server.url}/lfs-objects/{item['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_upload(self, oid: str):
        content = self._body()
        if hashlib.sha256(content).hexdigest() != oid:
            return self._error(400, "the uploaded content does not match its sha256")
        self.state.lfs_objects[oid] = content
        self._send(200)

    def commit(self, repo_id: str, revision: str):
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if self._require_user() is None:
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        if revision != "main":
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        files = dict(repo.commits[-1][1]) if repo.commits else {}
        summary = ""
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in self.state.lfs_objects:
                    return self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(self.state.lfs_objects[value["oid"]], lfs=True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: f for path, f in files.items() if not path.startswith(prefix)}
            else:
                return self._error(400, f"unknown commit operation {key!r}")
        parent = repo.commits[-1][0] if repo.commits else ""
        sha = hashlib.sha1(f"{parent}\n{summary}\n{sorted((p, f.etag) for p, f in files.items())}".encode()).hexdigest()
        repo.commits.append((sha, files))
        self._json(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "success": True, "pullRequestUrl": None})

    # ------------------------------------------------------------------------------------------------------
    # Download: model info, tree, resolve
    # ------------------------------------------------------------------------------------------------------

    def _snapshot_or_error(self, repo_id: str, revision: str):
        repo = self._repo(repo_id)
        if repo is None:
            return None
        snapshot = repo.snapshot(revision)
        if snapshot is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return snapshot

    def model_info(self, repo_id: str, revision: str | None = None):
        snapshot = self._snapshot_or_error(repo_id, revision or "main")
        if snapshot is None:
            return
        sha, files = snapshot
        siblings = []
        for path, stored in sorted(files.items()):
            sibling = {"rfilename": path, "size": len(stored.content), "blobId": git_blob_sha1(stored.content)}
            if stored.lfs:
                sibling["lfs"] = {"sha256": stored.sha256, "size": len(stored.content), "pointerSize": 134}
            siblings.append(sibling)
        repo = self.state.repos[repo_id]
        self._json(200, {"id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
                         "private": repo.private, "disabled": False, "gated": False, "tags": ["custom_code"],
                         "library_name": "transformers", "siblings": siblings})

    def tree(self, repo_id: str, revision: str, folder: str | None = None):
        snapshot = self._snapshot_or_error(repo_id, revision)
        if snapshot is None:
            return
        _, files = snapshot
        prefix = f"{folder.strip('/')}/" if folder else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for path, stored in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            entry = {"type": "file", "path": path, "size": len(stored.content), "oid": git_blob_sha1(stored.content)}
            if stored.lfs:
                entry["lfs"] = {"oid": stored.sha256, "size": len(stored.content), "pointerSize": 134}
            entries.append(entry)
        if prefix and not entries and not folders:
            return self._error(404, f"{folder} does not exist", "EntryNotFound")
        entries += [{"type": "directory", "path": path, "oid": "0" * 40} for path in sorted(folders)]
        self._json(200, entries)

    def resolve(self, repo_id: str, revision: str, path: str):
        snapshot = self._snapshot_or_error(repo_id, revision)
        if snapshot is None:
            return
        sha, files = snapshot
        stored = files.get(path)
        if stored is None:
            return self._error(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"ETag": f'"{stored.etag}"', "X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(stored.content))})
        content = stored.content
        range_header = self.headers.get("Range", "")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header)
        if match and self.command == "GET":
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return self._send(206, content[start : end + 1], headers, "application/octet-stream")
        self._send(200, content, headers, "application/octet-stream")

    REPO = r"([^/]+/[^/]+)"
    GET_ROUTES: ClassVar[list] = [
        (r"/api/whoami-v2", whoami),
        (rf"/api/models/{REPO}", model_info),
        (rf"/api/models/{REPO}/revision/([^/]+)", model_info),
        (rf"/api/models/{REPO}/tree/([^/]+)", tree),
        (rf"/api/models/{REPO}/tree/([^/]+)/(.+)", tree),
        (rf"/{REPO}/resolve/([^/]+)/(.+)", resolve),
    ]
    HEAD_ROUTES: ClassVar[list] = [(rf"/{REPO}/resolve/([^/]+)/(.+)", resolve)]
    POST_ROUTES: ClassVar[list] = [
        (r"/api/repos/create", create_repo),
        (r"/api/validate-yaml", validate_yaml),
        (rf"/api/models/{REPO}/preupload/([^/]+)", preupload),
        (rf"/api/models/{REPO}/commit/([^/]+)", commit),
        (rf"/{REPO}\.git/info/lfs/objects/batch", lfs_batch),
    ]
    PUT_ROUTES: ClassVar[list] = [(r"/lfs-objects/([0-9a-f]{64})", lfs_upload)]


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tokens: dict[str, str]):
        super().__init__(("127.0.0.1", 0), HubRequestHandler)
        self.state = HubState(tokens)
        self.requests: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


def serve(tokens: dict[str, str]) -> HubServer:
    """Starts a server on a free port of 127.0.0.1 in a daemon thread; ``tokens`` maps tokens to user names.
    Stop it with ``server.shutdown(); server.server_close()``."""
    server = HubServer(tokens)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True).start()
    return server


if __name__ == "__main__":  # a server to try by hand: HF_ENDPOINT=<printed url> HF_TOKEN=hf_test HF_HUB_DISABLE_XET=1
    hub = serve({"hf_test": "user"})
    print(hub.url, flush=True)
    threading.Event().wait()
