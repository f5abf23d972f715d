"""A small, strict Hugging Face Hub look-alike on 127.0.0.1, for tests without internet.

It serves model repos from local folders (one folder = one commit of one repo) to the real
huggingface_hub client (point `HF_ENDPOINT` at `HubServer.url`; see `HubServer.client_env`).

Implemented, as huggingface_hub 2.x calls it (read from its hf_api.py, file_download.py,
_snapshot_download.py, utils/_http.py, utils/_pagination.py):

  GET  /api/models/{repo_id}                          model_info / repo_info (revision "main")
  GET  /api/models/{repo_id}/revision/{revision}      model_info / repo_info at a revision
       query: blobs=True adds size/blobId/lfs to each sibling (files_metadata=True); nothing else
       JSON: id, modelId, author, sha (40-hex commit), siblings [{rfilename}], private, gated, ...
  GET  /api/models/{repo_id}/tree/{revision}[/{path}] list_repo_tree (snapshot_download lists files
       with it), query: recursive, expand (expand=true is refused); one page (no Link header)
       JSON: [{type: file|directory, path, oid, size, lfs?: {oid, size, pointerSize}}]
  HEAD/GET /{repo_id}/resolve/{revision}/{path}       hf_hub_download (HEAD: get_hf_file_metadata,
       GET: http_get). Every answer carries X-Repo-Commit.
         regular file: 200, ETag "<git blob sha1>", Content-Length, Accept-Ranges
         LFS file (*.safetensors, *.bin, ...): ETag and X-Linked-Etag "<sha256>", X-Linked-Size; with
           lfs_redirect=True (the default, as the Hub does) a 302 to a separate "CDN" server (another
           port, so another origin: the client must drop Authorization there), else a direct 200.
  HEAD/GET {cdn}/lfs/{sha256}                         the "CDN": LFS content by sha256
  Range: bytes=START-[END] on every file answer -> 206 + Content-Range (416 when out of range).

Fault injection for tests: `interrupt_once` (drop the connection mid-body), `stall_once` (send part
of a body, then hang until released: the client can be killed mid-download), `hold` (a file's
content is not served until released), `tamper` (serve other bytes under the advertised size and
sha256), `on_upload` (a callback before each LFS upload is stored), `echo_headers` (a repo's every
request answered by a 400 that quotes the request headers, token included). Private repos: `add_repo(..., token=...)`.

Errors as the Hub sends them (X-Error-Code / X-Error-Message headers, JSON {"error": ...} body):
unknown repo -> 404 RepoNotFound; private repo without a token -> 401 RepoNotFound; wrong token ->
401 "Invalid credentials in Authorization header"; unknown revision -> 404 RevisionNotFound; unknown
file -> 404 EntryNotFound (with X-Repo-Commit, as the client caches the absence by commit).

Strict: any other method, path, query parameter or malformed header gets 400/404/405 and the request
is recorded with route=None; `unexpected()` lists them so a test can assert there were none.
Every request is recorded (server, method, path, headers, status, route); Authorization and Cookie
values are never stored (replaced by "<redacted>"; `RecordedRequest.auth` says whether one came).

Uploads (what HfApi.create_repo / create_branch / create_commit send with HF_HUB_DISABLE_XET=1, read
from hf_api.py, _commit_api.py and lfs.py); every one needs "Authorization: Bearer <token>" (the
`write_token` when one is set, the repo's token for a private repo):

  POST /api/repos/create                              {name, organization, visibility?, type?} -> {url};
       409 (+ {url}) when the repo exists. visibility "private" makes the caller's token the repo's token.
  POST /api/validate-yaml                             {content, repoType} -> {errors: [], warnings: []}
  POST /api/models/{repo_id}/branch/{branch}          create_branch (at the current commit); 409 if it exists
  POST /api/models/{repo_id}/preupload/{revision}     {files: [{path, sample, size}]} -> uploadMode
       "lfs" for the LFS suffixes (or > 10 MB), else "regular"; "oid" of the file already at that path
       (sha256 for LFS, git blob sha1 otherwise; null if none): the client drops unchanged files
  POST /{repo_id}.git/info/lfs/objects/batch          LFS batch API, operation "upload", transfer
       "basic": an upload action to the CDN server (none when the blob is already stored)
  PUT  {cdn}/upload/{sha256}                          the upload: sha256 and size are checked (400 if not)
  POST /api/models/{repo_id}/commit/{branch}          NDJSON: header, file (base64), lfsFile (a stored
       blob of that size) -> {commitUrl, commitOid}; a new commit that the read endpoints then serve.
Uploaded content is kept under a temporary folder (`storage`). Limits: one snapshot per repo (every
ref serves the newest commit's files), no deletions/copies, no multipart LFS, no Xet, no PRs.
`commits` lists (repo_id, branch, summary, paths) per accepted commit; `uploads` the stored sha256s.

To extend: add a (method, regex, handler-name) row to `_HUB_ROUTES` and a
`_h_<name>(self, m, query)` method to `_Handler`; handlers answer through `_send` / `_error`.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".model")
SECRET_HEADERS = ("authorization", "cookie")
_SEG = r"[^/?]+"
_REPO = rf"(?P<ns>{_SEG})/(?P<name>{_SEG})"

# (methods, path regex on the raw (still percent-encoded) path, handler name). First match wins.
_HUB_ROUTES = [
    (("GET",), re.compile(rf"^/api/models/{_REPO}$"), "model_info"),
    (("GET",), re.compile(rf"^/api/models/{_REPO}/revision/(?P<rev>{_SEG})$"), "model_info"),
    (("GET",), re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>{_SEG})(?:/(?P<path>[^?]+))?$"), "tree"),
    (("GET", "HEAD"), re.compile(rf"^/{_REPO}/resolve/(?P<rev>{_SEG})/(?P<path>[^?]+)$"), "resolve"),
    # uploads (handlers take the request body too)
    (("POST",), re.compile(r"^/api/repos/create$"), "create_repo"),
    (("POST",), re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    (("POST",), re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>{_SEG})$"), "create_branch"),
    (("POST",), re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>{_SEG})$"), "preupload"),
    (("POST",), re.compile(rf"^/(?P<ns>{_SEG})/(?P<name>[^/?]+)\.git/info/lfs/objects/batch$"), "lfs_batch"),
    (("POST",), re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>{_SEG})$"), "commit"),
]
_CDN_ROUTES = [
    (("GET", "HEAD"), re.compile(r"^/lfs/(?P<sha>[0-9a-f]{64})$"), "cdn_blob"),
    (("PUT",), re.compile(r"^/upload/(?P<sha>[0-9a-f]{64})$"), "cdn_upload"),
]
_BODY_METHODS = ("POST", "PUT")
MAX_BODY = 256 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class RepoFile:
    path: str          # in the repo, "/"-separated
    local: str         # absolute path on disk
    size: int
    sha256: str
    git_oid: str       # git blob sha1 of the content (regular) or of the LFS pointer (LFS)
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class HubRepo:
    repo_id: str
    folder: str
    files: dict[str, RepoFile]
    commit: str                            # 40-hex, derived from the content: same folder, same sha
    refs: dict[str, str]                   # branch/tag name -> commit
    token: str | None = None               # private repo: requests need "Authorization: Bearer <token>"

    def resolve_revision(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        return self.commit if rev == self.commit else None


@dataclass
class RecordedRequest:
    server: str                            # "hub" | "cdn"
    method: str
    path: str                              # raw request target, query included
    headers: dict[str, str]                # lower-case names; secrets redacted
    auth: bool                             # an Authorization header was sent
    status: int = 0
    route: str | None = None               # handler that answered; None: unexpected request
    note: str = ""

    def __str__(self) -> str:
        rng = f" Range={self.headers['range']}" if "range" in self.headers else ""
        return f"{self.server} {self.method} {self.path} -> {self.status}{' auth' if self.auth else ''}{rng}" + (
            f" ({self.note})" if self.note else "")


def _load_repo(repo_id: str, folder: str, refs, token, lfs_suffixes) -> HubRepo:
    files: dict[str, RepoFile] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):
                continue
            local = os.path.join(dirpath, fn)
            rel = os.path.relpath(local, folder).replace(os.sep, "/")
            with open(local, "rb") as f:
                data = f.read()
            sha = hashlib.sha256(data).hexdigest()
            lfs = fn.endswith(tuple(lfs_suffixes))
            oid = git_blob_sha1(lfs_pointer(sha, len(data))) if lfs else git_blob_sha1(data)
            files[rel] = RepoFile(rel, os.path.abspath(local), len(data), sha, oid, lfs)
    tree = "".join(f"{p}\0{f.git_oid}\n" for p, f in sorted(files.items())).encode()
    commit = hashlib.sha1(b"commit " + repo_id.encode() + b"\0" + tree).hexdigest()
    return HubRepo(repo_id, os.path.abspath(folder), files, commit, {r: commit for r in refs}, token)


class HubServer:
    """Start with `with HubServer() as hub:` (or start()/stop()); add repos any time with add_repo."""

    def __init__(self, lfs_redirect: bool = True, lfs_suffixes=LFS_SUFFIXES, write_token: str | None = None,
                 rate: float | None = None):
        self.rate = rate                         # bytes/s of file content (all connections together); None: unlimited
        self._rate_lock = threading.Lock()
        self._rate_next = 0.0                    # time.monotonic() when the link is free again
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[RecordedRequest] = []
        self.lfs_redirect = lfs_redirect
        self.lfs_suffixes = tuple(lfs_suffixes)
        self._lock = threading.Lock()
        self._interrupts: dict[str, int] = {}   # sha256 -> bytes to send before dropping the connection once
        self._tampered: dict[str, bytes] = {}    # sha256 -> bytes served instead (metadata unchanged)
        self._stalls: dict[str, tuple[int, threading.Event, threading.Event]] = {}  # sha256 -> (bytes, stalled, release)
        self._holds: dict[str, threading.Event] = {}  # sha256 -> served once set
        self._echo: set[str] = set()             # repo ids whose every request is answered by echo_headers' 400
        self._failing: dict[str, int] = {}       # repo id -> HTTP status answered to its every request (fail_with)
        self.on_upload = None                    # callable(sha256) -> bool, before an LFS upload is stored (False: refuse it)
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.url = self.cdn_url = ""
        self.write_token = write_token
        self.storage = ""                        # uploaded blobs, by sha256 (created by start())
        self.commits: list[tuple[str, str, str, list[str]]] = []   # (repo_id, branch, summary, paths)
        self.uploads: list[str] = []             # sha256 of every accepted LFS upload
        self._pending: dict[str, int] = {}       # sha256 -> size announced in an LFS batch request

    # -- setup ---------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: str, refs=("main",), token: str | None = None) -> HubRepo:
        repo = _load_repo(repo_id, str(folder), refs, token, self.lfs_suffixes)
        with self._lock:
            self.repos[repo_id] = repo
        return repo

    def interrupt_once(self, repo_id: str, path: str, after_bytes: int) -> None:
        """The next download of that file's content sends `after_bytes` bytes then closes the connection."""
        with self._lock:
            self._interrupts[self.repos[repo_id].files[path].sha256] = after_bytes

    def stall_once(self, repo_id: str, path: str, after_bytes: int) -> tuple[threading.Event, threading.Event]:
        """The next download of that file's content sends `after_bytes` bytes, then hangs until the
        returned `release` event is set (then drops the connection). Returns (stalled, release):
        `stalled` is set once the bytes were sent."""
        stalled, release = threading.Event(), threading.Event()
        with self._lock:
            self._stalls[self.repos[repo_id].files[path].sha256] = (after_bytes, stalled, release)
        return stalled, release

    def hold(self, repo_id: str, path: str) -> threading.Event:
        """Content GETs of that file (not HEADs, not Range requests for its first 64 KiB, which readers of
        the safetensors header make) wait until the returned event is set."""
        ev = threading.Event()
        with self._lock:
            self._holds[self.repos[repo_id].files[path].sha256] = ev
        return ev

    def echo_headers(self, repo_id: str) -> None:
        """Fault injection: every request for `repo_id` gets a 400 whose error message (X-Error-Message
        header and JSON body) quotes the request's headers verbatim, Authorization included - a
        misbehaving endpoint or proxy. The request log still never stores the token."""
        with self._lock:
            self._echo.add(repo_id)

    def fail_with(self, repo_id: str, status: int = 500) -> None:
        """Fault injection: every request for `repo_id` is answered `status` (a Hub that is down)."""
        with self._lock:
            self._failing[repo_id] = status

    def release_all(self) -> None:
        with self._lock:
            events = [e for _, _, e in self._stalls.values()] + list(self._holds.values())
        for e in events:
            e.set()

    def tamper(self, repo_id: str, path: str, data: bytes) -> None:
        """Fault injection: serve `data` as that file's content while every header and listing still
        advertises the original size and sha256 (a corrupting proxy, cache or CDN)."""
        with self._lock:
            self._tampered[self.repos[repo_id].files[path].sha256] = data

    def untamper(self, repo_id: str, path: str) -> None:
        """Undo `tamper`: serve that file's real content again."""
        with self._lock:
            self._tampered.pop(self.repos[repo_id].files[path].sha256, None)

    def start(self, port: int = 0) -> "HubServer":
        """Serve on 127.0.0.1: the Hub on `port` (0: any free port), the "CDN" on a free port."""
        self.storage = tempfile.mkdtemp(prefix="hub-test-storage-")
        for kind, routes in (("hub", _HUB_ROUTES), ("cdn", _CDN_ROUTES)):
            handler = type(f"{kind.title()}Handler", (_Handler,), {"hub": self, "kind": kind, "routes": routes})
            srv = ThreadingHTTPServer(("127.0.0.1", port if kind == "hub" else 0), handler)
            srv.daemon_threads = True
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._servers.append(srv)
            self._threads.append(t)
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        self.release_all()  # no handler thread stays parked on a stall or hold
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(5)
        self._servers.clear()
        self._threads.clear()
        if self.storage:
            shutil.rmtree(self.storage, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- for tests -----------------------------------------------------------------------------
    def client_env(self, home: str, token: str | None = None) -> dict[str, str]:
        """Environment for a subprocess running the real huggingface_hub client against this server,
        with a private HF home (cache, token file) under `home`."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": os.path.join(str(home), "hub"),
            "HF_TOKEN_PATH": os.path.join(str(home), "token"),
            "HF_TOKEN": token or "",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "",
            "HF_OIDC_RESOURCE": "",
            "HF_HUB_ENABLE_HF_TRANSFER": "0",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def unexpected(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.route is None]

    def log(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self.requests)

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, rec: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(rec)

    def _take_interrupt(self, sha: str) -> int | None:
        with self._lock:
            return self._interrupts.pop(sha, None)

    def _take_stall(self, sha: str):
        with self._lock:
            return self._stalls.pop(sha, None)

    def _hold_of(self, sha: str) -> threading.Event | None:
        with self._lock:
            return self._holds.get(sha)

    def _content(self, f: RepoFile) -> "bytes | _FileSlice":
        """A file's content: tampered bytes, or a view of the file on disk (a layer file can be
        several GB: it is read piece by piece as it is sent, never whole)."""
        with self._lock:
            data = self._tampered.get(f.sha256)
        return data if data is not None else _FileSlice(f.local, 0, os.path.getsize(f.local))

    def upload_requests(self) -> list[RecordedRequest]:
        """Requests that write (POST/PUT)."""
        with self._lock:
            return [r for r in self.requests if r.method in _BODY_METHODS]

    def _store(self, data: bytes) -> tuple[str, str]:
        """(sha256, local path) of `data`, kept in the storage folder."""
        sha = hashlib.sha256(data).hexdigest()
        path = os.path.join(self.storage, sha)
        if not os.path.exists(path):
            tmp = path + f".tmp{threading.get_ident()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return sha, path

    def _blob(self, sha: str) -> RepoFile | None:
        with self._lock:
            for repo in self.repos.values():
                for f in repo.files.values():
                    if f.lfs and f.sha256 == sha:
                        return f
        return None


class _FileSlice:
    """Bytes [start, stop) of a file, read only when written out (in 8 MiB pieces)."""

    def __init__(self, path: str, start: int, stop: int):
        self.path, self.start, self.stop = path, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, k: slice) -> "_FileSlice":
        a, b, _ = k.indices(len(self))
        return _FileSlice(self.path, self.start + a, self.start + max(a, b))

    def pieces(self, size: int = 8 << 20):
        with open(self.path, "rb") as f:
            f.seek(self.start)
            left = len(self)
            while left:
                piece = f.read(min(size, left))
                if not piece:
                    raise OSError(f"{self.path}: shorter than expected")
                left -= len(piece)
                yield piece


def _write(wfile, body) -> None:
    if isinstance(body, _FileSlice):
        for piece in body.pieces():
            wfile.write(piece)
    else:
        wfile.write(body)


@dataclass
class _SpooledBody:
    """An upload received into a file: where, how many bytes, their sha256."""
    path: str
    size: int
    sha256: str

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.remove(self.path)


class _BadRequest(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hub-test-server"
    sys_version = ""
    hub: HubServer
    kind: str
    routes: list

    def log_message(self, format, *args):  # quiet: the request log is the record
        pass

    # -- dispatch ------------------------------------------------------------------------------
    def _begin(self) -> None:
        headers = {k.lower(): ("<redacted>" if k.lower() in SECRET_HEADERS else v) for k, v in self.headers.items()}
        self.rec = RecordedRequest(self.kind, self.command, self.path, headers, "authorization" in headers)
        self.hub._record(self.rec)

    def _dispatch(self):
        self._begin()
        try:
            if (self.headers.get("Content-Length") or "0").strip() != "0" or self.headers.get("Transfer-Encoding"):
                self.close_connection = True      # a body we do not read: never reuse this connection
                raise _BadRequest("request body not expected")
            split = urlsplit(self.path)
            try:
                query = parse_qs(split.query, keep_blank_values=True, strict_parsing=bool(split.query))
            except ValueError:
                raise _BadRequest("malformed query") from None
            for methods, rx, name in self.routes:
                m = rx.match(split.path)
                if m:
                    if self.command not in methods:
                        return self._error(405, None, f"{self.command} not allowed here", expected=False)
                    self.rec.route = name
                    return getattr(self, f"_h_{name}")(m, query)
            return self._error(404, None, "no such endpoint", expected=False)
        except _BadRequest as e:
            self.rec.route = None
            return self._error(400, None, str(e), expected=False)

    do_GET = do_HEAD = _dispatch

    def _refuse(self):  # no other method with a body; the body is not read, so close
        self._begin()
        self.close_connection = True
        self._error(405, None, f"{self.command} not allowed", expected=False)

    do_PATCH = do_DELETE = do_OPTIONS = _refuse

    def _dispatch_body(self):
        """POST/PUT to an upload route: read the body, then the handler gets it; anything else: _refuse."""
        split = urlsplit(self.path)
        match = None
        for methods, rx, name in self.routes:
            m = rx.match(split.path)
            if m and self.command in methods:
                match = (m, name)
                break
        if match is None:
            return self._refuse()
        self._begin()
        try:
            body = self._read_upload() if match[1] == "cdn_upload" else self._read_body()
            try:
                query = parse_qs(split.query, keep_blank_values=True, strict_parsing=bool(split.query))
            except ValueError:
                raise _BadRequest("malformed query") from None
            self.rec.route = match[1]
            return getattr(self, f"_h_{match[1]}")(match[0], query, body)
        except _BadRequest as e:
            self.rec.route = None
            return self._error(400, None, str(e), expected=False)

    do_POST = do_PUT = _dispatch_body

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").strip().lower()
        if te:
            if te != "chunked":
                self.close_connection = True
                raise _BadRequest(f"unsupported Transfer-Encoding: {te}")
            parts, total = [], 0
            while True:
                line = self.rfile.readline(1024).strip().split(b";")[0]
                try:
                    n = int(line, 16)
                except ValueError:
                    self.close_connection = True
                    raise _BadRequest("malformed chunked body") from None
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                total += n
                if total > MAX_BODY:
                    self.close_connection = True
                    raise _BadRequest("body too large")
                parts.append(self.rfile.read(n))
                self.rfile.readline(8)
        cl = self.headers.get("Content-Length")
        if cl is None or not cl.strip().isdigit():
            self.close_connection = True
            raise _BadRequest("Content-Length required")
        n = int(cl)
        if n > MAX_BODY:
            self.close_connection = True
            raise _BadRequest("body too large")
        return self.rfile.read(n)

    def _read_upload(self) -> "_SpooledBody":
        """An LFS upload body (a layer file can be several GB): streamed into the storage folder and
        hashed as it arrives, never held in memory. Content-Length is required."""
        cl = self.headers.get("Content-Length")
        if cl is None or not cl.strip().isdigit():
            self.close_connection = True
            raise _BadRequest("Content-Length required")
        left = int(cl)
        tmp = os.path.join(self.hub.storage, f"upload.tmp{threading.get_ident()}")
        h = hashlib.sha256()
        with open(tmp, "wb") as f:
            while left:
                piece = self.rfile.read(min(left, 8 << 20))
                if not piece:
                    self.close_connection = True
                    os.remove(tmp)
                    raise _BadRequest("body shorter than Content-Length")
                f.write(piece)
                h.update(piece)
                left -= len(piece)
        return _SpooledBody(tmp, int(cl), h.hexdigest())

    def _json_body(self, body: bytes):
        try:
            return json.loads(body)
        except ValueError:
            raise _BadRequest("body is not JSON") from None

    def _writer(self, repo: HubRepo | None = None) -> str | None:
        """The caller's bearer token for a write, or None after answering 401/403."""
        auth = self.headers.get("Authorization") or ""
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            self._error(401, None, "Invalid username or password.")
            return None
        token = auth[7:].strip()
        want = repo.token if repo is not None and repo.token is not None else self.hub.write_token
        if want is not None and not hmac.compare_digest(token.encode(), want.encode()):
            self._error(403 if repo is not None else 401, None, "Invalid credentials in Authorization header")
            return None
        return token

    # -- responses -----------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_length: int | None = None):
        self.send_response(status)
        hdrs = {"X-Request-Id": f"test-{id(self.rec):x}", "Date": formatdate(usegmt=True), **(headers or {})}
        hdrs.setdefault("Content-Length", str(len(body) if content_length is None else content_length))
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        self.rec.status = status
        if self.command != "HEAD" and body:
            if self.hub.rate and len(body) > 64 * 1024:
                self._write_paced(body)
            else:
                _write(self.wfile, body)

    def _write_paced(self, body: bytes, piece: int = 256 * 1024) -> None:
        """Send at most `hub.rate` bytes/s over all connections together (a shared link; for benchmarks)."""
        for i in range(0, len(body), piece):
            chunk = body[i:i + piece]
            with self.hub._rate_lock:
                now = time.monotonic()
                start = max(now, self.hub._rate_next)
                self.hub._rate_next = start + len(chunk) / self.hub.rate
            time.sleep(max(0.0, start - now))
            _write(self.wfile, chunk)

    def _json(self, obj, headers: dict | None = None):
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json; charset=utf-8", **(headers or {})})

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None,
               expected: bool = True):
        if not expected:
            self.rec.route = None
            self.rec.note = message
        h = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": message, **(headers or {})}
        if code:
            h["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), h)

    # -- repo / revision / auth lookups --------------------------------------------------------
    def _repo(self, m) -> HubRepo | None:
        """The repo, or None after answering an error (unknown, or private without the right token)."""
        repo_id = f"{unquote(m['ns'])}/{unquote(m['name'])}"
        with self.hub._lock:
            echo, failing = repo_id in self.hub._echo, self.hub._failing.get(repo_id)
        if failing:
            self._error(failing, None, "Internal Error - We're working hard to fix this as soon as possible!")
            return None
        if echo:
            received = "; ".join(f"{k}: {v}" for k, v in self.headers.items())
            self._error(400, None, f"Bad request. Headers received: {received}")
            return None
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.token is not None:
            auth = self.headers.get("Authorization") or ""
            if not auth:
                self._error(401, "RepoNotFound", "Invalid username or password.")
                return None
            if not hmac.compare_digest(auth.encode(), f"Bearer {repo.token}".encode()):
                self._error(401, None, "Invalid credentials in Authorization header")
                return None
        return repo

    def _commit(self, repo: HubRepo, m) -> str | None:
        rev = unquote(m["rev"])
        commit = repo.resolve_revision(rev)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    @staticmethod
    def _flag(query, name, default=False) -> bool:
        vals = query.get(name)
        if not vals:
            return default
        if len(vals) != 1 or vals[0].lower() not in ("true", "false", "1", "0"):
            raise _BadRequest(f"bad value for {name}")
        return vals[0].lower() in ("true", "1")

    @staticmethod
    def _only(query, *allowed):
        extra = sorted(set(query) - set(allowed))
        if extra:
            raise _BadRequest(f"unsupported query parameter(s): {', '.join(extra)}")

    # -- handlers ------------------------------------------------------------------------------
    def _h_model_info(self, m, query):
        self._only(query, "blobs")
        blobs = self._flag(query, "blobs")
        repo = self._repo(m)
        if repo is None:
            return
        commit = self._commit(repo, m) if m.groupdict().get("rev") else repo.refs.get("main", repo.commit)
        if commit is None:
            return
        siblings = []
        for f in repo.files.values():
            s = {"rfilename": f.path}
            if blobs:
                s.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": len(lfs_pointer(f.sha256, f.size))}
            siblings.append(s)
        ns = repo.repo_id.split("/")[0]
        self._json({
            "_id": commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": ns, "sha": commit,
            "lastModified": "2024-01-01T00:00:00.000Z", "createdAt": "2024-01-01T00:00:00.000Z",
            "private": repo.token is not None, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "tags": ["transformers", "safetensors"], "library_name": "transformers", "siblings": siblings,
            "spaces": [], "usedStorage": sum(f.size for f in repo.files.values()),
        })

    def _h_tree(self, m, query):
        self._only(query, "recursive", "expand")
        recursive = self._flag(query, "recursive")
        if self._flag(query, "expand"):
            raise _BadRequest("expand=true is not implemented by the test server")
        repo = self._repo(m)
        if repo is None:
            return
        commit = self._commit(repo, m)
        if commit is None:
            return
        base = unquote(m["path"]).strip("/") if m["path"] else ""
        prefix = base + "/" if base else ""
        if base and base in repo.files:
            return self._error(400, None, f"{base} is a file, not a directory", expected=False)
        entries: dict[str, dict] = {}
        for f in repo.files.values():
            if not f.path.startswith(prefix):
                continue
            rest = f.path[len(prefix):].split("/")
            for depth in range(1, len(rest)):          # folders on the way
                if depth > 1 and not recursive:
                    break
                d = prefix + "/".join(rest[:depth])
                entries.setdefault(d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d})
            if len(rest) == 1 or recursive:
                e = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
                if f.lfs:
                    e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(lfs_pointer(f.sha256, f.size))}
                entries[f.path] = e
        if base and not entries:
            return self._error(404, "EntryNotFound", f"{base} does not exist on \"{commit}\"", {"X-Repo-Commit": commit})
        self._json(sorted(entries.values(), key=lambda e: e["path"]), {"X-Repo-Commit": commit})

    def _h_resolve(self, m, query):
        self._only(query)
        repo = self._repo(m)
        if repo is None:
            return
        commit = self._commit(repo, m)
        if commit is None:
            return
        path = unquote(m["path"])
        f = repo.files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
        meta = {"X-Repo-Commit": commit, "ETag": f'"{f.etag}"',
                "Content-Disposition": f"inline; filename*=UTF-8''{quote(os.path.basename(path))}; "
                                       f"filename=\"{os.path.basename(path)}\";"}
        if f.lfs:
            meta.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
            if self.hub.lfs_redirect:
                loc = f"{self.hub.cdn_url}/lfs/{f.sha256}"
                return self._send(302, f"Found. Redirecting to {loc}".encode(),
                                  {**meta, "Location": loc, "Content-Type": "text/plain; charset=utf-8"})
        self._file(f, meta)

    def _h_cdn_blob(self, m, query):
        self._only(query)
        f = self.hub._blob(m["sha"])
        if f is None:
            return self._error(404, None, "NoSuchKey", expected=False)
        self._file(f, {"ETag": f'"{f.sha256}"'})

    def _file(self, f: RepoFile, headers: dict):
        data = self.hub._content(f)
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **headers}
        start, end, status = 0, len(data) - 1, 200
        rng = self.headers.get("Range")
        if rng is not None:
            mm = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not mm:
                raise _BadRequest(f"unsupported Range header: {rng}")
            start = int(mm[1])
            end = min(int(mm[2]), len(data) - 1) if mm[2] else len(data) - 1
            if start >= len(data) or start > end:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start:end + 1]
        if self.command == "GET":
            hold = self.hub._hold_of(f.sha256)
            if hold is not None and not (status == 206 and end < 64 * 1024):
                self.rec.note = "held"
                if not hold.wait(60):
                    return self._error(503, None, "held too long", expected=False)
            stall = self.hub._take_stall(f.sha256)
            cut = self.hub._take_interrupt(f.sha256)
            if stall is not None and stall[0] < len(body):
                return self._cut(status, headers, body, stall[0], stall)
            if cut is not None and cut < len(body):
                return self._cut(status, headers, body, cut, None)
        self._send(status, body, headers)

    def _cut(self, status, headers, body, cut, stall):
        """Send the headers and `cut` bytes of `body`, (hang until released when stalled,) then drop the connection."""
        self.rec.note = f"{'stalled' if stall else 'interrupted'} after {cut} bytes"
        self.close_connection = True
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body)), "X-Request-Id": "test-cut"}.items():
            self.send_header(k, v)
        self.end_headers()
        self.rec.status = status
        _write(self.wfile, body[:cut])
        self.wfile.flush()
        if stall is not None:
            stall[1].set()
            stall[2].wait(60)

    # -- upload handlers -----------------------------------------------------------------------
    def _write_repo(self, m) -> HubRepo | None:
        repo = self._repo(m)
        if repo is None:
            return None
        return repo if self._writer(repo) is not None else None

    def _h_create_repo(self, m, query, body):
        self._only(query)
        token = self._writer()
        if token is None:
            return
        d = self._json_body(body)
        if not isinstance(d, dict) or set(d) - {"name", "organization", "visibility", "type", "private"}:
            raise _BadRequest("unsupported create-repo payload")
        if d.get("type") not in (None, "model"):
            raise _BadRequest("the test server only has model repos")
        name, org = d.get("name"), d.get("organization")
        if not isinstance(name, str) or not isinstance(org, str) or not re.fullmatch(r"[\w.-]+", name + org):
            return self._error(400, None, "Invalid repo name")
        repo_id = f"{org}/{name}"
        private = d.get("visibility") == "private" or d.get("private") is True
        with self.hub._lock:
            if repo_id in self.hub.repos:
                exists = True
            else:
                exists = False
                commit = hashlib.sha1(b"commit " + repo_id.encode() + b"\0").hexdigest()
                self.hub.repos[repo_id] = HubRepo(repo_id, self.hub.storage, {}, commit, {"main": commit},
                                                  token if private else None)
        if exists:
            msg = "You already created this model repo"   # the Hub's 409 carries the url too; the client reads it
            return self._send(409, json.dumps({"error": msg, "url": f"{self.hub.url}/{repo_id}"}).encode(),
                              {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": msg})
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _h_validate_yaml(self, m, query, body):
        self._only(query)
        d = self._json_body(body)
        if not isinstance(d, dict) or not isinstance(d.get("content"), str):
            raise _BadRequest("validate-yaml needs {content}")
        self._json({"errors": [], "warnings": []})

    def _h_create_branch(self, m, query, body):
        self._only(query)
        repo = self._write_repo(m)
        if repo is None:
            return
        branch = unquote(m["rev"])
        if body.strip():
            d = self._json_body(body)
            if d not in ({}, None):
                raise _BadRequest("create_branch from a revision is not implemented")
        with self.hub._lock:
            exists = branch in repo.refs
            if not exists:
                repo.refs[branch] = repo.commit
        if exists:
            return self._error(409, None, f"Reference refs/heads/{branch} already exists")
        self._json({})

    def _h_preupload(self, m, query, body):
        self._only(query)
        repo = self._write_repo(m)
        if repo is None or self._commit(repo, m) is None:
            return
        d = self._json_body(body)
        if not isinstance(d, dict) or not isinstance(d.get("files"), list):
            raise _BadRequest("preupload needs {files: [...]}")
        out = []
        for f in d["files"]:
            if not isinstance(f, dict) or not isinstance(f.get("path"), str) or not isinstance(f.get("size"), int):
                raise _BadRequest("preupload: malformed file entry")
            lfs = f["path"].endswith(self.hub.lfs_suffixes) or f["size"] > 10 * 1024 * 1024
            have = repo.files.get(f["path"])
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": have.etag if have is not None else None})
        self._json({"files": out, "commitOid": repo.commit})

    def _h_lfs_batch(self, m, query, body):
        self._only(query)
        repo = self._write_repo(m)
        if repo is None:
            return
        d = self._json_body(body)
        if not isinstance(d, dict) or d.get("operation") != "upload" or "basic" not in (d.get("transfers") or ["basic"]) \
                or d.get("hash_algo", "sha256") != "sha256" or not isinstance(d.get("objects"), list):
            raise _BadRequest("LFS batch: only operation=upload, transfer basic, sha256")
        objects = []
        for o in d["objects"]:
            oid, size = o.get("oid") if isinstance(o, dict) else None, o.get("size") if isinstance(o, dict) else None
            if not isinstance(oid, str) or not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                raise _BadRequest("LFS batch: malformed object")
            entry = {"oid": oid, "size": size}
            path = os.path.join(self.hub.storage, oid)
            if not (os.path.isfile(path) and os.path.getsize(path) == size):
                with self.hub._lock:
                    self.hub._pending[oid] = size
                entry.update(authenticated=True, actions={"upload": {"href": f"{self.hub.cdn_url}/upload/{oid}", "header": {}}})
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _h_cdn_upload(self, m, query, body):
        self._only(query)
        sha = m["sha"]
        with self.hub._lock:
            size = self.hub._pending.get(sha)
        if size is None:
            return self._error(403, None, "no upload was announced for this object", expected=False)
        if body.size != size:
            body.discard()
            return self._error(400, None, f"size mismatch: got {body.size} bytes, announced {size}")
        if body.sha256 != sha:
            body.discard()
            return self._error(400, None, "sha256 mismatch")
        if self.hub.on_upload is not None and self.hub.on_upload(sha) is False:
            body.discard()
            return self._error(503, None, "upload refused by the test", expected=False)
        os.replace(body.path, os.path.join(self.hub.storage, sha))
        with self.hub._lock:
            self.hub._pending.pop(sha, None)
            self.hub.uploads.append(sha)
        self._send(200, b"")

    def _h_commit(self, m, query, body):
        self._only(query)
        repo = self._write_repo(m)
        if repo is None:
            return
        branch = unquote(m["rev"])
        if branch not in repo.refs:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        if "ndjson" not in (self.headers.get("Content-Type") or ""):
            raise _BadRequest("commit body must be application/x-ndjson")
        try:
            items = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError:
            raise _BadRequest("commit: malformed NDJSON") from None
        if not items or not isinstance(items[0], dict) or items[0].get("key") != "header":
            raise _BadRequest("commit: the first line must be the header")
        header = items[0].get("value") or {}
        if not isinstance(header.get("summary"), str) or not header["summary"].strip():
            return self._error(400, None, "commit: a summary is required")
        if "parentCommit" in header and header["parentCommit"] != repo.refs[branch]:
            return self._error(412, None, "A commit has happened since. Please refresh and try again.")
        new: dict[str, RepoFile] = {}
        for item in items[1:]:
            key, v = item.get("key"), item.get("value")
            if not isinstance(v, dict) or not isinstance(v.get("path"), str) or not v["path"] \
                    or v["path"].startswith("/") or ".." in v["path"].split("/"):
                raise _BadRequest("commit: malformed operation")
            path = v["path"]
            if key == "file":
                if v.get("encoding") != "base64":
                    raise _BadRequest("commit: file content must be base64")
                try:
                    data = base64.b64decode(v.get("content", ""), validate=True)
                except ValueError:
                    raise _BadRequest("commit: bad base64") from None
                sha, local = self.hub._store(data)
                new[path] = RepoFile(path, local, len(data), sha, git_blob_sha1(data), False)
            elif key == "lfsFile":
                oid, size = v.get("oid"), v.get("size")
                local = os.path.join(self.hub.storage, str(oid))
                if v.get("algo") != "sha256" or not isinstance(oid, str) or not re.fullmatch(r"[0-9a-f]{64}", oid):
                    raise _BadRequest("commit: malformed lfsFile")
                if not os.path.isfile(local) or (size is not None and os.path.getsize(local) != size):
                    return self._error(422, None, f"commit: LFS object {oid} for {path} was not uploaded")
                size = os.path.getsize(local)
                new[path] = RepoFile(path, local, size, oid, git_blob_sha1(lfs_pointer(oid, size)), True)
            else:
                raise _BadRequest(f"commit: unsupported operation {key!r}")
        with self.hub._lock:
            files = {**repo.files, **new}
            tree = "".join(f"{p}\0{f.git_oid}\n" for p, f in sorted(files.items())).encode()
            commit = hashlib.sha1(b"commit " + repo.refs[branch].encode() + b"\0" + tree
                                  + header["summary"].encode()).hexdigest()
            repo.files = files
            repo.commit = commit
            repo.refs[branch] = commit
            self.hub.commits.append((repo.repo_id, branch, header["summary"], sorted(new)))
        self._json({"success": True, "commitOid": commit, "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{commit}"})


# -- helpers shared by the Hub tests ---------------------------------------------------------------

def pack_files(folder) -> set[str]:
    """Relative '/'-paths of the files under `folder` (huggingface_hub's .cache folder excluded)."""
    out = set()
    for dirpath, dirnames, names in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != ".cache"]
        out.update(os.path.relpath(os.path.join(dirpath, n), folder).replace(os.sep, "/") for n in names)
    return out


def assert_no_token(proc, token: str) -> None:
    """Neither the token nor anything token-shaped appears in a subprocess's output."""
    for text in (proc.stdout, proc.stderr):
        assert token not in text and "hf_secret" not in text


# -- a local Hub to try push / pull / run owner/name by hand (README: "Trying the Hub without an account")

def main(argv=None) -> None:
    """`python tests/support/hub_server.py [--port 8765] [--token T] [--repo owner/name=PACK_FOLDER ...]`: serve until
    Ctrl-C and print the environment that points huggingface_hub (and so layerpack) at this server.
    Pushed repos live in memory and a temporary folder: they are gone when the server stops."""
    import argparse
    import signal

    ap = argparse.ArgumentParser(prog="python tests/support/hub_server.py", description=main.__doc__)
    ap.add_argument("--port", type=int, default=8765, help="port of the Hub endpoint (0: any free port) [%(default)s]")
    ap.add_argument("--token", default="local-write-token", help="token a push must send [%(default)s]")
    ap.add_argument("--repo", action="append", default=[], metavar="OWNER/NAME=FOLDER",
                    help="serve a local folder (a pack) as a repo from the start; repeatable")
    args = ap.parse_args(argv)
    hub = HubServer(write_token=args.token)
    for spec in args.repo:
        repo_id, _, folder = spec.partition("=")
        if not folder or not os.path.isdir(folder):
            ap.error(f"--repo {spec}: give OWNER/NAME=FOLDER with an existing folder")
        hub.add_repo(repo_id, folder)
    try:
        hub.start(args.port)
    except OSError as e:
        ap.error(f"port {args.port}: {e.strerror or e} (try --port 0)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored there)
        signal.signal(sig, lambda *_: stop.set())
    home = tempfile.mkdtemp(prefix="hub-local-home-")
    print(f"local Hub on {hub.url} (repos: {', '.join(hub.repos) or 'none yet'}); in another shell:", flush=True)
    print(f"export HF_ENDPOINT={hub.url} HF_TOKEN={args.token} HF_HUB_DISABLE_XET=1 HF_HOME={home}", flush=True)
    print("Ctrl-C stops it (and forgets every pushed repo).", flush=True)
    try:
        stop.wait()
    finally:
        hub.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
