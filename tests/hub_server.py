"""A small, strict, read-only Hugging Face Hub look-alike on 127.0.0.1, for tests without internet.

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

Fault injection for tests: `interrupt_once` (drop the connection mid-body), `tamper` (serve other
bytes under the advertised size and sha256). Private repos: `add_repo(..., token=...)`.

Errors as the Hub sends them (X-Error-Code / X-Error-Message headers, JSON {"error": ...} body):
unknown repo -> 404 RepoNotFound; private repo without a token -> 401 RepoNotFound; wrong token ->
401 "Invalid credentials in Authorization header"; unknown revision -> 404 RevisionNotFound; unknown
file -> 404 EntryNotFound (with X-Repo-Commit, as the client caches the absence by commit).

Strict: any other method, path, query parameter or malformed header gets 400/404/405 and the request
is recorded with route=None; `unexpected()` lists them so a test can assert there were none.
Every request is recorded (server, method, path, headers, status, route); Authorization and Cookie
values are never stored (replaced by "<redacted>"; `RecordedRequest.auth` says whether one came).

To extend (e.g. upload endpoints): add a (method, regex, handler-name) row to `_HUB_ROUTES` and a
`_h_<name>(self, m, query)` method to `_Handler`; handlers answer through `_send` / `_error`.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
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
]
_CDN_ROUTES = [
    (("GET", "HEAD"), re.compile(r"^/lfs/(?P<sha>[0-9a-f]{64})$"), "cdn_blob"),
]


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

    def __init__(self, lfs_redirect: bool = True, lfs_suffixes=LFS_SUFFIXES):
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[RecordedRequest] = []
        self.lfs_redirect = lfs_redirect
        self.lfs_suffixes = tuple(lfs_suffixes)
        self._lock = threading.Lock()
        self._interrupts: dict[str, int] = {}   # sha256 -> bytes to send before dropping the connection once
        self._tampered: dict[str, bytes] = {}    # sha256 -> bytes served instead (metadata unchanged)
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.url = self.cdn_url = ""

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

    def tamper(self, repo_id: str, path: str, data: bytes) -> None:
        """Fault injection: serve `data` as that file's content while every header and listing still
        advertises the original size and sha256 (a corrupting proxy, cache or CDN)."""
        with self._lock:
            self._tampered[self.repos[repo_id].files[path].sha256] = data

    def untamper(self, repo_id: str, path: str) -> None:
        """Undo `tamper`: serve that file's real content again."""
        with self._lock:
            self._tampered.pop(self.repos[repo_id].files[path].sha256, None)

    def start(self) -> "HubServer":
        for kind, routes in (("hub", _HUB_ROUTES), ("cdn", _CDN_ROUTES)):
            handler = type(f"{kind.title()}Handler", (_Handler,), {"hub": self, "kind": kind, "routes": routes})
            srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            srv.daemon_threads = True
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._servers.append(srv)
            self._threads.append(t)
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(5)
        self._servers.clear()
        self._threads.clear()

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

    def _content(self, f: RepoFile) -> bytes:
        with self._lock:
            data = self._tampered.get(f.sha256)
        if data is None:
            with open(f.local, "rb") as fh:
                data = fh.read()
        return data

    def _blob(self, sha: str) -> RepoFile | None:
        with self._lock:
            for repo in self.repos.values():
                for f in repo.files.values():
                    if f.lfs and f.sha256 == sha:
                        return f
        return None


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

    def _refuse(self):  # read-only server: no method with a body; the body is not read, so close
        self._begin()
        self.close_connection = True
        self._error(405, None, f"{self.command} not allowed", expected=False)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _refuse

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
            self.wfile.write(body)

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
        cut = self.hub._take_interrupt(f.sha256) if self.command == "GET" else None
        if cut is not None and cut < len(body):
            self.rec.note = f"interrupted after {cut} bytes"
            self.close_connection = True
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body)), "X-Request-Id": "test-cut"}.items():
                self.send_header(k, v)
            self.end_headers()
            self.rec.status = status
            self.wfile.write(body[:cut])
            self.wfile.flush()
            return
        self._send(status, body, headers)
