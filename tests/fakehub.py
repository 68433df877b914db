"""In-memory stand-in for the Hugging Face Hub, served over real HTTP on 127.0.0.1.

Test infrastructure only. The real Hub is out of reach from the test machines, so tests start a ``FakeHub``,
point ``HF_ENDPOINT`` at it (``tests/hub_fixtures.py`` does this) and let the unmodified huggingface_hub and
transformers clients create repos, commit, read metadata and download through it. It records every
request and can inject HTTP failures. Standard library only; a commit is a full snapshot of the files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, unquote, urlsplit


# The real Hub seeds every new repo with a .gitattributes file in an "initial commit".
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
REPO_KINDS = {"models": "model", "datasets": "dataset"}


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data``, which the Hub reports as a regular file's oid."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    files: dict[str, bytes]
    date: str


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    history: list[Commit] = field(default_factory=list)  # oldest first

    def find(self, revision: str) -> Commit | None:
        # Only the main branch exists (its head is the newest commit); any full sha from its history resolves.
        return next((c for c in self.history[::-1] if revision in ("main", c.sha)), None)


@dataclass
class LoggedRequest:
    method: str
    path: str  # as sent, query string included
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int = 0  # filled in once answered


class HubError(Exception):
    """An error answer. ``code`` goes into X-Error-Code, which the client maps to exception classes."""

    def __init__(self, status: int, code: str | None = None, message: str = "", **body: object) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.body = status, code, message, {"error": message, **body}


class FakeHub:
    """A Hub with one user: ``with FakeHub(token=...) as hub:`` or ``url = hub.start()`` ... ``hub.stop()``.

    If ``token`` is set, writes need ``Authorization: Bearer <token>``; reads of public repos need nothing.
    """

    def __init__(self, token: str | None = None, user: str = "tester") -> None:
        self.token, self.user = token, user
        self.url = ""
        self.requests: list[LoggedRequest] = []
        self._repos: dict[tuple[str, str], Repo] = {}
        self._faults: list[tuple[str, int, bool]] = []  # (path fragment, status, after), consumed in order
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Inspection and set-up helpers for tests.
    def fail_next(self, n: int = 1, status: int = 500, path_contains: str = "", after: bool = False) -> None:
        """Answer the next ``n`` requests whose path contains ``path_contains`` with ``status``.

        With ``after=True`` each request is carried out first (a commit lands) and only its answer is the
        failure, as when the answer is lost on its way back.
        """
        with self._lock:
            self._faults += [(path_contains, status, after)] * n

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self._repos[(repo_type, repo_id)]

    def repo_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        commit = self.repo(repo_id, repo_type).find(revision)
        return dict(commit.files) if commit else {}

    def commits(self, repo_id: str, repo_type: str = "model") -> list[Commit]:
        """Newest first, like ``HfApi.list_repo_commits``."""
        return self.repo(repo_id, repo_type).history[::-1]

    def seed(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", private: bool = False):
        """Create the repo if needed and commit ``files`` straight into it (e.g. a parent model to fetch)."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id)) or self._create(repo_type, repo_id, private)
            return self._add_commit(repo, "seed files", "", {**repo.history[-1].files, **files})

    def _create(self, kind: str, repo_id: str, private: bool) -> Repo:
        repo = self._repos[(kind, repo_id)] = Repo(repo_id, kind, private)
        self._add_commit(repo, "initial commit", "", {".gitattributes": GITATTRIBUTES})
        return repo

    def _add_commit(self, repo: Repo, title: str, message: str, files: dict[str, bytes]) -> Commit:
        # Deterministic sha over parent, message and content; the date is the only wall-clock value.
        parent = repo.history[-1].sha if repo.history else None
        listing = [parent, title, message, sorted((p, git_blob_oid(b)) for p, b in files.items())]
        sha = hashlib.sha1(json.dumps(listing).encode()).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        repo.history.append(Commit(sha, parent, title, message, files, date))
        return repo.history[-1]

    # Request handling; the HTTP plumbing is in _Handler at the bottom.
    def _take_fault(self, req: LoggedRequest) -> tuple[int, bool] | None:
        with self._lock:
            index = next((i for i, (fragment, *_) in enumerate(self._faults) if fragment in req.path), None)
            return None if index is None else self._faults.pop(index)[1:]

    def _authorized(self, req: LoggedRequest) -> bool:
        auth = req.headers.get("authorization", "")
        return auth.startswith("Bearer ") and self.token in (None, auth.removeprefix("Bearer "))

    def _require_auth(self, req: LoggedRequest) -> None:
        if not self._authorized(req):
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _lookup(self, req: LoggedRequest, kind: str, repo_id: str, revision: str) -> tuple[Repo, Commit]:
        repo = self._repos.get((kind, repo_id))
        if repo is None or (repo.private and not self._authorized(req)):
            raise HubError(404, "RepoNotFound", "Repository not found")
        commit = repo.find(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo, commit

    def route(self, req: LoggedRequest) -> tuple[object, dict[str, str]]:
        """Answer one request: (JSON-able value or raw bytes, extra headers), or raise HubError."""
        split = urlsplit(req.path)
        # Split before unquoting: a revision such as refs/pr/1 arrives as one %2F-quoted segment.
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        with self._lock:
            if parts[0] == "api":
                return self._api(req, parts[1:], parse_qs(split.query)), {}
            kind = "dataset" if parts[0] == "datasets" else "model"
            parts = parts[1:] if kind == "dataset" else parts
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(req, kind, "/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        raise HubError(404, None, f"no route for {split.path}")

    def _api(self, req: LoggedRequest, parts: list[str], query: dict) -> object:
        if parts == ["whoami-v2"]:
            self._require_auth(req)
            return {"type": "user", "name": self.user, "orgs": [], "auth": {"accessToken": {"role": "write"}}}
        if parts == ["agent-harnesses"]:
            # Fetched once per process. A JSON *list* here breaks every later huggingface_hub call.
            return {"standardEnvVars": [], "harnesses": {}}
        if parts == ["validate-yaml"]:  # sent before any commit that touches README.md
            return {"errors": [], "warnings": []}
        if parts == ["repos", "create"]:
            return self._create_repo(req, json.loads(req.body))
        if len(parts) >= 3 and parts[0] in REPO_KINDS:
            return self._repo_api(req, REPO_KINDS[parts[0]], "/".join(parts[1:3]), parts[3:], query)
        raise HubError(404, None, "no such API")

    def _create_repo(self, req: LoggedRequest, payload: dict) -> dict:
        self._require_auth(req)
        kind = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        url = f"{self.url}/{'datasets/' if kind == 'dataset' else ''}{repo_id}"
        if (kind, repo_id) in self._repos:
            # 409 means "exists"; with exist_ok=True the client then reads "url" from this very body.
            raise HubError(409, None, f"You already created this {kind} repo", url=url)
        # huggingface_hub 2.x sends "visibility"; older clients sent a "private" boolean.
        self._create(kind, repo_id, payload.get("private") is True or payload.get("visibility") == "private")
        return {"url": url, "name": repo_id}

    def _repo_api(self, req: LoggedRequest, kind: str, repo_id: str, rest: list[str], query: dict) -> object:
        action, revision = (rest[0], rest[1]) if len(rest) >= 2 else ("info", "main")
        repo, commit = self._lookup(req, kind, repo_id, revision)
        if action in ("info", "revision"):
            return self._info(repo, commit)
        if action == "tree":
            return self._tree(commit, "/".join(rest[2:]), query.get("recursive") == ["true"])
        if action == "commits":
            older = repo.history[: repo.history.index(commit) + 1][::-1]
            authors = [{"user": self.user}]
            return [{"id": c.sha, "title": c.title, "message": c.message, "authors": authors, "date": c.date}
                    for c in older]  # fmt: skip
        self._require_auth(req)
        if action == "preupload":
            return {"files": [self._upload_mode(commit, f["path"]) for f in json.loads(req.body)["files"]]}
        if action == "commit":
            return self._commit(repo, commit, req.body)
        raise HubError(404, None, f"unsupported repo API {action}")

    def _info(self, repo: Repo, commit: Commit) -> dict:
        # No "cardData": that needs a YAML parser. ModelCard.load(repo_id) downloads README.md instead.
        files = sorted(commit.files.items())
        siblings = [{"rfilename": p, "size": len(b), "blobId": git_blob_oid(b)} for p, b in files]
        info = {"id": repo.repo_id, "sha": commit.sha, "private": repo.private, "siblings": siblings}
        return {**info, "createdAt": repo.history[0].date, "lastModified": commit.date}

    def _tree(self, commit: Commit, folder: str, recursive: bool) -> list[dict]:
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict] = {}
        for path, data in sorted(commit.files.items()):
            parts = path.removeprefix(prefix).split("/") if path.startswith(prefix) else []
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):  # folders above the file
                name = prefix + "/".join(parts[:depth])
                entries[name] = {"type": "directory", "path": name, "oid": git_blob_oid(name.encode())}
            if len(parts) == 1 or (parts and recursive):
                entries[path] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_oid(data)}
        if prefix and not entries:
            raise HubError(404, "EntryNotFound", f"{folder} does not exist")
        return list(entries.values())

    def _upload_mode(self, commit: Commit, path: str) -> dict:
        # "regular" for every file keeps LFS and xet out of the picture: the client then sends the bytes
        # base64-encoded inside the commit NDJSON. "oid" is the blob sha of the file already on the branch,
        # as the real Hub reports it; the client leaves out files whose local git sha equals it.
        oid = git_blob_oid(commit.files[path]) if path in commit.files else None
        return {"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": oid}

    def _commit(self, repo: Repo, head: Commit, body: bytes) -> dict:
        # NDJSON: a header line {summary, description, parentCommit?}, then one line per operation.
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header, files = lines[0]["value"], dict(head.files)
        if header.get("parentCommit") not in (None, head.sha):
            raise HubError(412, None, "parentCommit is not the head of the branch")
        for item in lines[1:]:
            key, path = item["key"], item["value"]["path"]
            if key == "file":
                files[path] = base64.b64decode(item["value"]["content"])
            elif key == "deletedFolder":
                files = {p: b for p, b in files.items() if not p.startswith(path.rstrip("/") + "/")}
            elif key == "deletedFile" and files.pop(path, None) is None:
                # The client recognises this message and adds a hint about folder paths.
                raise HubError(404, "EntryNotFound", "A file with this name doesn't exist")
            elif key != "deletedFile":  # "lfsFile" would mean the client ignored the "regular" upload mode
                raise HubError(400, None, f"unsupported commit operation {key}")
        commit = self._add_commit(repo, header["summary"], header.get("description", ""), files)
        prefix = "datasets/" if repo.repo_type == "dataset" else ""
        url = f"{self.url}/{prefix}{repo.repo_id}/commit/{commit.sha}"
        return {"commitOid": commit.sha, "commitUrl": url, "pullRequestUrl": None}

    def _resolve(self, req: LoggedRequest, kind: str, repo_id: str, revision: str, path: str) -> tuple:
        _, commit = self._lookup(req, kind, repo_id, revision)
        if path not in commit.files:
            # transformers probes optional files (adapter_config.json, *.index.json, ...). Only a 404 with
            # X-Error-Code EntryNotFound tells the client "this file is absent" rather than "repo unusable".
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}")
        data = commit.files[path]
        # The download cache stores blobs under the ETag and snapshots under X-Repo-Commit: both are needed.
        return data, {"X-Repo-Commit": commit.sha, "ETag": f'"{git_blob_oid(data)}"'}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so every answer carries Content-Length

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def _handle(self) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        req = LoggedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        with hub._lock:
            hub.requests.append(req)
        try:
            injected = hub._take_fault(req)
            if injected is not None and not injected[1]:
                raise HubError(injected[0], None, "injected failure")
            status, (result, headers) = 200, hub.route(req)
            if injected is not None:  # carried out, then answered with the failure
                raise HubError(injected[0], None, "injected failure after the request was carried out")
        except HubError as err:
            status, result = err.status, err.body
            headers = {"X-Error-Message": err.message, **({"X-Error-Code": err.code} if err.code else {})}
        payload = result if isinstance(result, bytes) else json.dumps(result).encode()
        content_type = "application/octet-stream" if isinstance(result, bytes) else "application/json"
        req.status = status
        self.send_response(status)
        headers = {"Content-Type": content_type, **headers, "Content-Length": str(len(payload))}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle
