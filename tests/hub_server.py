"""A small Hub-compatible HTTP server for the tests, driven by the real huggingface_hub client.

Implements what the client uses for: create_repo, whoami, create_branch, create_tag, list_repo_refs,
repo_info (model info by revision), list_repo_tree, preupload, the LFS batch API and basic LFS transfer,
commits (NDJSON: header / file / lfsFile / deletedFile, with parentCommit checked: 412 when the branch
moved), and file resolve (HEAD and GET, with X-Repo-Commit, ETag, X-Linked-Etag and X-Linked-Size, Range).
Private repos refuse a missing or wrong token. Fault injection: altered bytes on download, a connection
dropped mid-upload or mid-download, and N server errors in a row.

Jobs, as huggingface_hub 2.x's ``HfApi`` calls them: ``run_job`` (POST /api/jobs/{namespace}),
``inspect_job`` / ``wait_for_job`` (GET /api/jobs/{namespace}/{id}), ``list_jobs`` (GET /api/jobs/{namespace}),
``fetch_job_logs`` (GET /api/jobs/{namespace}/{id}/logs: server-sent events, ``tail``, held open while the job
runs), ``cancel_job`` (POST /api/jobs/{namespace}/{id}/cancel) and ``list_jobs_hardware`` (GET
/api/jobs/hardware). Each job's command runs as a local subprocess (whatever its flavor and image) in its own
folder, with ``HubState.job_env`` as the machine's environment, the job's ``environment`` and its ``secrets``
as environment variables; secrets are never sent back. At most ``max_running_jobs`` run at once, the others
wait in SCHEDULING. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, repo_id: str, owner: str, private: bool) -> None:
        self.repo_id, self.owner, self.private = repo_id, owner, private
        self.commits: dict[str, dict] = {}
        self.branches: dict[str, str] = {}
        self.tags: dict[str, str] = {}

    def new_commit(self, parent: str | None, files: dict, summary: str) -> str:
        oid = hashlib.sha1(f"{parent}|{summary}|{time.time_ns()}|{sorted(files)}".encode()).hexdigest()
        self.commits[oid] = {"parent": parent, "files": files, "summary": summary, "date": time.time()}
        return oid

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        return rev if rev in self.commits else None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _gpu(name, pretty, model, vram, cost):
    return {"name": name, "prettyName": pretty, "cpu": "8 vCPU", "ram": "32 GB", "ephemeralStorage": "200 GB",
            "accelerator": {"type": "gpu", "model": model, "quantity": "1", "vram": vram, "manufacturer": "Nvidia"},
            "unitCostMicroUSD": cost, "unitCostUSD": cost / 1e6, "unitLabel": "minute"}


# What GET /api/jobs/hardware answers (the fields JobHardwareInfo reads; prices are made up for the tests).
HARDWARE = [
    {"name": "cpu-basic", "prettyName": "CPU Basic", "cpu": "2 vCPU", "ram": "16 GB", "ephemeralStorage": "50 GB",
     "accelerator": None, "unitCostMicroUSD": 100, "unitCostUSD": 0.0001, "unitLabel": "minute"},
    {"name": "cpu-upgrade", "prettyName": "CPU Upgrade", "cpu": "8 vCPU", "ram": "32 GB", "ephemeralStorage": "50 GB",
     "accelerator": None, "unitCostMicroUSD": 500, "unitCostUSD": 0.0005, "unitLabel": "minute"},
    _gpu("t4-small", "Nvidia T4 - small", "T4", "16 GB", 1000),
    _gpu("a10g-small", "Nvidia A10G - small", "A10G", "24 GB", 2000),
    _gpu("l4x1", "1x Nvidia L4", "L4", "24 GB", 2000),
    _gpu("l40sx1", "1x Nvidia L40S", "L40S", "48 GB", 3000),
    _gpu("a100-large", "Nvidia A100 - large", "A100", "80 GB", 5000),
    _gpu("h200", "Nvidia H200", "H200", "141 GB", 8000),
    _gpu("rtx-pro-6000", "Nvidia RTX PRO 6000", "RTX PRO 6000", "96 GB", 6000),
]
TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")


class Job:
    """One job: its spec as received (secrets kept apart), its stage, its log lines and its process."""

    def __init__(self, job_id: str, owner: str, spec: dict, secrets: dict) -> None:
        self.id, self.owner, self.spec, self.secrets = job_id, owner, spec, secrets
        self.stage, self.message = "SCHEDULING", None
        self.created, self.started, self.finished = _now(), None, None
        self.lines: list[tuple[str, str]] = []      # (timestamp, line)
        self.cond = threading.Condition()
        self.proc: subprocess.Popen | None = None

    def to_json(self, endpoint: str) -> dict:
        spec = self.spec
        return {"id": self.id, "createdAt": self.created, "startedAt": self.started, "finishedAt": self.finished,
                "dockerImage": spec.get("dockerImage"), "spaceId": spec.get("spaceId"),
                "command": spec.get("command"), "arguments": spec.get("arguments", []),
                "environment": spec.get("environment", {}), "secrets": {k: None for k in self.secrets},
                "flavor": spec.get("flavor"), "labels": spec.get("labels"),
                "status": {"stage": self.stage, "message": self.message},
                "owner": {"id": f"id-{self.owner}", "name": self.owner, "type": "user"},
                "initiator": {"type": "user", "id": f"id-{self.owner}", "name": self.owner}}


class HubState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}          # sha256 -> LFS object
        self.tokens: dict[str, str] = {}           # token -> user
        self.lfs_uploads = 0                       # completed LFS PUTs
        self.requests: list[str] = []              # "METHOD path" log
        # fault injection
        self.corrupt: dict[str, bytes] = {}        # path in repo -> bytes served instead
        self.drop_upload_once = False              # close the connection half-way through the next LFS PUT
        self.drop_download_once: str | None = None  # path in repo: next GET sends half, then closes
        self.fail_next = 0                         # answer the next N requests with 503

        # jobs
        self.jobs: dict[str, "Job"] = {}
        self.job_requests: list[bytes] = []        # every job-creating request's body, as received
        self.job_env: dict[str, str] = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        self.job_root = Path(tempfile.mkdtemp(prefix="hub-jobs-"))
        self.max_running_jobs = 2
        self.hardware: list[dict] = [dict(h) for h in HARDWARE]

    def reset_faults(self) -> None:
        self.corrupt.clear()
        self.drop_upload_once = False
        self.drop_download_once = None
        self.fail_next = 0


def _start_due_jobs(state: "HubState") -> None:
    """Start waiting jobs while fewer than ``max_running_jobs`` run (call with ``state.lock`` held)."""
    running = sum(1 for j in state.jobs.values() if j.stage == "RUNNING")
    for job in state.jobs.values():
        if running >= state.max_running_jobs:
            return
        if job.stage == "SCHEDULING":
            _run_job(state, job)
            running += 1


def _run_job(state: "HubState", job: Job) -> None:
    workdir = state.job_root / job.id
    workdir.mkdir(parents=True)
    env = {**state.job_env, **{k: str(v) for k, v in (job.spec.get("environment") or {}).items()},
           **{k: str(v) for k, v in job.secrets.items()}}
    job.stage, job.started = "RUNNING", _now()
    try:
        job.proc = subprocess.Popen(list(job.spec["command"]) + list(job.spec.get("arguments") or []), cwd=workdir,
                                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        job.lines.append((_now(), f"could not start the command: {e}"))
        _finish(state, job, "ERROR", str(e), locked=True)
        return
    timeout = job.spec.get("timeoutSeconds")
    if timeout:
        timer = threading.Timer(timeout, lambda: _kill(job) if job.stage == "RUNNING" else None)
        timer.daemon = True
        timer.start()
    threading.Thread(target=_pump, args=(state, job), daemon=True).start()


def _pump(state: "HubState", job: Job) -> None:
    """Copy the job's output into its log, line by line; record how it ended."""
    assert job.proc is not None and job.proc.stdout is not None
    for raw in job.proc.stdout:
        with job.cond:
            job.lines.append((_now(), raw.decode(errors="replace").rstrip("\r\n")))
            job.cond.notify_all()
    rc = job.proc.wait()
    _finish(state, job, "COMPLETED" if rc == 0 else "ERROR", None if rc == 0 else f"exit code {rc}")


def _finish(state: "HubState", job: Job, stage: str, message: str | None, locked: bool = False) -> None:
    with contextlib.nullcontext() if locked else state.lock:
        if job.stage not in TERMINAL:
            job.stage, job.message, job.finished = stage, message, _now()
        _start_due_jobs(state)
    with job.cond:
        job.cond.notify_all()


def _kill(job: Job) -> None:
    if job.proc is not None and job.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.proc.pid, signal.SIGKILL)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "HubServer"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # ---- plumbing ---------------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None, head: bool = False) -> None:
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        self._send(status, json.dumps(obj).encode(), h, head=head)

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head=head)

    def _user(self) -> str | None | bool:
        """The caller: a user name, None without a token, False for a wrong token."""
        auth = self.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        return self.state.tokens.get(auth[7:].strip(), False)

    def _write_request(self, repo_id):
        """The JSON body of a write request and its repo (None, error already sent, when refused)."""
        body = json.loads(self._body() or b"{}")
        return body, self._repo(repo_id, write=True)

    def _repo(self, repo_id: str, *, write: bool = False, head: bool = False) -> Repo | None:
        """The repo if the caller may see it (and write to it); else sends the Hub's answer and returns None."""
        user = self._user()
        if user is False:
            self._error(401, "Invalid credentials in Authorization header", head=head)
            return None
        repo = self.state.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            self._error(401 if user is None else 404, "Repository not found", "RepoNotFound", head=head)
            return None
        if write and user != repo.owner:
            self._error(403 if user else 401, "You don't have the rights to write to this repo", head=head)
            return None
        return repo

    def _dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        with self.state.lock:
            self.state.requests.append(f"{method} {path}")
            if self.state.fail_next > 0:
                self.state.fail_next -= 1
                if method in ("POST", "PUT"):
                    self._body()  # drain the request before answering
                return self._error(503, "Service temporarily unavailable", head=method == "HEAD")
        for pattern, name in ROUTES:
            m = re.fullmatch(pattern, path)
            if m and name.startswith(method.lower() + "_"):
                return getattr(self, name)(*m.groups(), query=query)
        if method == "HEAD" and (m := re.fullmatch(ROUTES[-1][0], path)):
            return self.get_resolve(*m.groups(), query=query, head=True)
        self._error(404, f"no route for {method} {path}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    # ---- API --------------------------------------------------------------------------------------------
    def get_whoami(self, query) -> None:
        user = self._user()
        if not user:
            return self._error(401, "Invalid credentials in Authorization header")
        self._json(200, {"type": "user", "name": user, "orgs": [], "auth": {"accessToken": {"role": "write"}}})

    def post_validate_yaml(self, query) -> None:
        body = json.loads(self._body() or b"{}")
        ok = str(body.get("content", "")).startswith("---\n")
        if not ok:
            return self._error(400, "README.md has no YAML metadata block")
        self._json(200, {"errors": [], "warnings": []})

    def get_harnesses(self, query) -> None:
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def post_create(self, query) -> None:
        body = json.loads(self._body() or b"{}")
        user = self._user()
        if not user:
            return self._error(401, "Invalid credentials in Authorization header")
        owner = body.get("organization") or user
        if owner != user:
            return self._error(403, "You don't have the rights to create a repo in this namespace")
        repo_id = f"{owner}/{body['name']}"
        url = f"{self.server.url}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._json(409, {"error": "You already created this model repo", "url": url})
            repo = Repo(repo_id, owner, bool(body.get("private")) or body.get("visibility") == "private")
            attrs = b"*.pt2 filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            first = repo.new_commit(None, {".gitattributes": {"data": attrs, "lfs": None}}, "initial commit")
            repo.branches["main"] = first
            self.state.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id})

    def _info(self, repo: Repo, commit: str) -> dict:
        files = repo.commits[commit]["files"]
        return {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": repo.private,
                "author": repo.owner, "siblings": [{"rfilename": p} for p in sorted(files)], "tags": [],
                "downloads": 0, "likes": 0, "lastModified": "2026-11-24T00:00:00.000Z",
                "createdAt": "2026-11-24T00:00:00.000Z", "gated": False, "disabled": False}

    def get_info(self, repo_id, revision=None, query=None) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = repo.resolve(revision or "main")
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        self._json(200, self._info(repo, commit))

    def get_info_rev(self, repo_id, revision, query) -> None:
        self.get_info(repo_id, revision, query=query)

    def get_tree(self, repo_id, revision, subpath, query) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        prefix = (subpath or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, dirs = [], set()
        for p, f in sorted(repo.commits[commit]["files"].items()):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rest = p[len(prefix) + 1:] if prefix else p
            if not recursive and "/" in rest:
                d = (prefix + "/" if prefix else "") + rest.split("/")[0]
                if d not in dirs:
                    dirs.add(d)
                    entries.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                                    "path": d})
                continue
            entries.append(self._tree_entry(p, f))
        self._json(200, entries)

    def _tree_entry(self, path: str, f: dict) -> dict:
        data = self._data(f)
        entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        if f["lfs"]:
            entry["lfs"] = {"oid": f["lfs"], "size": len(data), "pointerSize": 134}
        return entry

    def _data(self, f: dict) -> bytes:
        return self.state.blobs[f["lfs"]] if f["lfs"] else f["data"]

    def get_refs(self, repo_id, query) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        self._json(200, {
            "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo.branches.items()],
            "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()],
            "converts": [],
        })

    def post_branch(self, repo_id, branch, query) -> None:
        body, repo = self._write_request(repo_id)
        if repo is None:
            return
        if branch in repo.branches:
            return self._error(409, f"Branch {branch} already exists")
        start = repo.resolve(body.get("startingPoint") or "main")
        if start is None:
            return self._error(404, "Invalid starting point", "RevisionNotFound")
        repo.branches[branch] = start
        self._json(200, {})

    def post_tag(self, repo_id, revision, query) -> None:
        body, repo = self._write_request(repo_id)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if body["tag"] in repo.tags:
            return self._error(409, f"Tag {body['tag']} already exists")
        repo.tags[body["tag"]] = commit
        self._json(200, {})

    def post_preupload(self, repo_id, revision, query) -> None:
        body, repo = self._write_request(repo_id)
        if repo is None:
            return
        out = []
        for f in body.get("files", []):
            lfs = not f["path"].endswith((".json", ".md", ".gitattributes")) or f["size"] > 10 << 20
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
        self._json(200, {"files": out})

    def post_lfs_batch(self, repo_id, query) -> None:
        body, repo = self._write_request(repo_id)
        if repo is None:
            return
        objects = []
        for obj in body.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.state.blobs:
                entry["actions"] = {"upload": {"href": f"{self.server.url}/_lfs/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def put_lfs(self, oid, query) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if self.state.drop_upload_once:
            self.state.drop_upload_once = False
            self.rfile.read(n // 2)
            self.close_connection = True
            self.connection.shutdown(2)  # the client sees the connection drop mid-upload
            return
        data = self.rfile.read(n)
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "sha256 of the uploaded object does not match its oid")
        with self.state.lock:
            self.state.blobs[oid] = data
            self.state.lfs_uploads += 1
        self._send(200)

    def post_commit(self, repo_id, revision, query) -> None:
        raw = self._body()
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        if revision not in repo.branches:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        header = next((ln["value"] for ln in lines if ln["key"] == "header"), {})
        with self.state.lock:
            head = repo.branches[revision]
            if header.get("parentCommit") and header["parentCommit"] != head:
                return self._error(412, "A commit has happened since. Please refresh and try again.")
            files = dict(repo.commits[head]["files"])
            for ln in lines:
                key, v = ln["key"], ln["value"]
                if key == "file":
                    files[v["path"]] = {"data": base64.b64decode(v["content"]), "lfs": None}
                elif key == "lfsFile":
                    if v["oid"] not in self.state.blobs:
                        return self._error(422, f"LFS object {v['oid']} was never uploaded")
                    files[v["path"]] = {"data": None, "lfs": v["oid"]}
                elif key in ("deletedFile", "deletedFolder"):
                    for p in [p for p in files if p == v["path"] or p.startswith(v["path"].rstrip("/") + "/")]:
                        del files[p]
            oid = repo.new_commit(head, files, header.get("summary", ""))
            repo.branches[revision] = oid
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": f"{self.server.url}/{repo_id}/commit/{oid}",
                         "pullRequestUrl": None})

    def get_resolve(self, repo_id, revision, filename, query=None, head: bool = False) -> None:
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
        f = repo.commits[commit]["files"].get(filename)
        if f is None:
            return self._error(404, "Entry not found", "EntryNotFound", head=head)
        data = self._data(f)
        etag = f["lfs"] or git_blob_sha1(data)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream",
                   "Accept-Ranges": "bytes"}
        if f["lfs"]:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        served = self.state.corrupt.get(filename, data)
        if not head and self.state.drop_download_once == filename:
            self.state.drop_download_once = None
            self.send_response(200)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(served)))
            self.end_headers()
            self.wfile.write(served[: len(served) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        rng = self.headers.get("Range")
        if rng and not head and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng)):
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(served) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(served)}"
            return self._send(206, served[start:end + 1], headers)
        self._send(200, served, headers, head=head)

    # ---- Jobs -------------------------------------------------------------------------------------------
    def _namespace(self, namespace: str) -> str | None:
        """The caller if it may use ``namespace``'s jobs; else sends the Hub's answer and returns None."""
        user = self._user()
        if not user:
            self._error(401, "Invalid credentials in Authorization header")
            return None
        if namespace != user:
            self._error(403, f"You don't have the rights to run jobs in {namespace}")
            return None
        return user

    def _job(self, namespace: str, job_id: str) -> Job | None:
        if self._namespace(namespace) is None:
            return None
        job = self.state.jobs.get(job_id)
        if job is None or job.owner != namespace:
            self._error(404, "Job not found", "JobNotFound")
            return None
        return job

    def get_jobs_hardware(self, query) -> None:
        self._json(200, self.state.hardware)

    def post_job_create(self, namespace, query) -> None:
        body = self._body() or b"{}"
        self.state.job_requests.append(body)
        spec = json.loads(body)
        user = self._namespace(namespace)
        if user is None:
            return
        command = spec.get("command")
        if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            return self._error(400, "command must be a non-empty list of strings")
        if spec.get("flavor") not in {h["name"] for h in self.state.hardware}:
            return self._error(400, f"Invalid flavor: {spec.get('flavor')}")
        if not (spec.get("dockerImage") or spec.get("spaceId")):
            return self._error(400, "dockerImage or spaceId is required")
        secrets = spec.pop("secrets", None) or {}
        job = Job(hashlib.sha1(f"{time.time_ns()}{len(self.state.jobs)}".encode()).hexdigest()[:24], user, spec,
                  secrets)
        with self.state.lock:
            self.state.jobs[job.id] = job
            _start_due_jobs(self.state)
            body = job.to_json(self.server.url)
        self._json(200, body)

    def get_jobs_list(self, namespace, query) -> None:
        if self._namespace(namespace) is None:
            return
        self._json(200, [j.to_json(self.server.url) for j in self.state.jobs.values() if j.owner == namespace])

    def get_job(self, namespace, job_id, query) -> None:
        job = self._job(namespace, job_id)
        if job is not None:
            self._json(200, job.to_json(self.server.url))

    def post_job_cancel(self, namespace, job_id, query) -> None:
        self._body()
        job = self._job(namespace, job_id)
        if job is None:
            return
        with self.state.lock:
            if job.stage not in TERMINAL:
                job.stage, job.message, job.finished = "CANCELED", "canceled by the user", _now()
        _kill(job)
        with job.cond:
            job.cond.notify_all()
        self._json(200, {})

    def get_job_logs(self, namespace, job_id, query) -> None:
        """Server-sent events, one ``data: {"timestamp", "data"}`` per line; the stream stays open (with
        keep-alive comments) while the job runs and ends when it has ended."""
        job = self._job(namespace, job_id)
        if job is None:
            return
        tail = int(query.get("tail", ["0"])[0] or 0)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        with job.cond:
            sent = max(0, len(job.lines) - tail) if tail else 0
        try:
            while True:
                with job.cond:
                    if sent >= len(job.lines) and job.stage not in TERMINAL:
                        job.cond.wait(timeout=5)
                    batch, ended = job.lines[sent:], job.stage in TERMINAL
                if batch:
                    sent += len(batch)
                    self.wfile.write(b"".join(b"data: " + json.dumps({"timestamp": ts, "data": line}).encode()
                                             + b"\n\n" for ts, line in batch))
                elif not ended:
                    self.wfile.write(b": keep-alive\n\n")
                self.wfile.flush()
                if ended and not batch:
                    with job.cond:
                        if sent >= len(job.lines):
                            return
        except (BrokenPipeError, ConnectionResetError):
            return


_R = r"([^/]+/[^/]+)"
ROUTES = [
    (r"/api/whoami-v2", "get_whoami"),
    (r"/api/jobs/hardware", "get_jobs_hardware"),
    (r"/api/jobs/([^/]+)", "post_job_create"),
    (r"/api/jobs/([^/]+)", "get_jobs_list"),
    (r"/api/jobs/([^/]+)/([^/]+)", "get_job"),
    (r"/api/jobs/([^/]+)/([^/]+)/logs", "get_job_logs"),
    (r"/api/jobs/([^/]+)/([^/]+)/cancel", "post_job_cancel"),
    (r"/api/repos/create", "post_create"),
    (r"/api/validate-yaml", "post_validate_yaml"),
    (r"/api/agent-harnesses", "get_harnesses"),
    (rf"/api/models/{_R}/revision/(.+)", "get_info_rev"),
    (rf"/api/models/{_R}/tree/([^/]+)(/.*)?", "get_tree"),
    (rf"/api/models/{_R}/refs", "get_refs"),
    (rf"/api/models/{_R}/branch/(.+)", "post_branch"),
    (rf"/api/models/{_R}/tag/(.+)", "post_tag"),
    (rf"/api/models/{_R}/preupload/(.+)", "post_preupload"),
    (rf"/api/models/{_R}/commit/(.+)", "post_commit"),
    (rf"/api/models/{_R}", "get_info"),
    (rf"/{_R}\.git/info/lfs/objects/batch", "post_lfs_batch"),
    (r"/_lfs/([0-9a-f]{64})", "put_lfs"),
    (rf"/{_R}/resolve/([^/]+)/(.+)", "get_resolve"),
]


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = HubState()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        for job in list(self.state.jobs.values()):
            _kill(job)
        self.shutdown()
        self.server_close()

    def add_user(self, name: str, token: str) -> None:
        self.state.tokens[token] = name


if __name__ == "__main__":  # manual use: python tests/hub_server.py
    s = HubServer().start()
    s.add_user("me", "hf_test_token")
    print(s.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        s.stop()
