"""Running a pack straight from the Hugging Face Hub: `load("owner/pack")`.

The manifest and the small files (config, tokenizer) are fetched first. Each layer file's safetensors
header is then read with a ranged request (a few KiB: the planner and the reader need it), and the
layer files themselves download in the background in execution order (embed, block.000, ..., head),
`DOWNLOAD_WORKERS` at a time. A unit waits for its own file only when the forward pass reaches it,
so generation begins while later layers are still arriving. Files land in the HF cache (reused next
time); each downloaded file is checked against the manifest's size and sha256 before anything reads
it, a bad one is deleted and named. Files already in the cache are checked by size (their sha256 was
checked when they arrived; `verify=True` re-hashes them).

Needs huggingface_hub (the `layerpack-llm-runtime[hub]` extra); nothing else in the runtime imports it.
"""
from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from .errors import FormatError, LayerpackError
from .hub_retries import HUB_RETRIES, HubUnavailable, install_retry_bound  # noqa: F401 (HUB_RETRIES: re-exported)
from .format import MANIFEST_FILE, MAX_HEADER_BYTES
# Re-exported: repo ids vs local paths and the token scrubber live in a torch-free module (the CLI
# checks arguments and prints errors with them before importing torch).
from .hubnames import HUB_REPO_ID, is_repo_id, looks_local, no_such_pack, remember_token, scrub  # noqa: F401
from .manifest import FileEntry, LayerEntry
from .pack import Pack, sha256_file
from .safetensors_io import SafetensorsFile
from .stream_hash import hashing_downloads, streamed_sha256

DOWNLOAD_WORKERS = 4          # layer files downloading at once (in execution order)
HEADER_WORKERS = 8            # ranged header reads at once (one small request each, at load)
HEADER_PROBE = 64 * 1024      # first ranged read per layer file; a longer header takes a second one


PROBE_TIMEOUT_S = 4.0         # an unreachable Hub is reported after this, not after huggingface_hub's retries


class ScrubFilter(logging.Filter):
    """Scrubs huggingface_hub's log records (its retry warnings quote URLs and server answers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            record.msg, record.args = scrub(record.getMessage()), None
        except Exception:  # noqa: BLE001
            pass
        return True


def _install_log_scrubber() -> None:
    log = logging.getLogger("huggingface_hub")
    if not any(isinstance(f, ScrubFilter) for f in log.filters):
        log.addFilter(ScrubFilter())
        for h in log.handlers:
            h.addFilter(ScrubFilter())
    install_retry_bound()


def check_reachable(repo_id: str) -> None:
    """Fail within PROBE_TIMEOUT_S when the Hub endpoint cannot be reached (DNS, refused, timeout):
    one TCP connection, no request, instead of huggingface_hub's ~25 s of retries. Skipped when
    HF_HUB_OFFLINE is set (the HF cache is used as is) or a proxy is configured (the proxy decides)."""
    import socket
    from urllib.parse import urlsplit

    _hf()
    from huggingface_hub import constants

    _install_log_scrubber()
    if constants.HF_HUB_OFFLINE:
        return
    endpoint = constants.ENDPOINT
    parts = urlsplit(endpoint)
    scheme = parts.scheme or "https"
    if any(os.environ.get(v) for v in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY")):
        return
    host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
    if not host:
        return
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as e:
        reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or type(e).__name__)
        raise LayerpackError(f"{repo_id}: cannot reach the Hub at {endpoint} ({reason}); check the connection or HF_ENDPOINT, "
                             "or set HF_HUB_OFFLINE=1 to use only what is in the local HF cache") from None


def _hf():
    try:
        import huggingface_hub
    except ImportError:
        raise LayerpackError("running a pack from the Hub needs huggingface_hub: pip install 'layerpack-llm-runtime[hub]' (from a clone: pip install './runtime[hub]')") from None
    return huggingface_hub


def hub_error(e: BaseException, repo_id: str, revision: str | None) -> LayerpackError:
    """One line for a failed Hub request (the token never appears in it). LayerpackErrors pass through."""
    if isinstance(e, HubUnavailable):
        return LayerpackError(scrub(f"{repo_id}: {e}"))
    if isinstance(e, LayerpackError):
        return type(e)(scrub(e)) if scrub(e) != str(e) else e
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(e, LocalEntryNotFoundError) and isinstance(e.__cause__, HfHubHTTPError):
        e = e.__cause__  # the Hub answered with an error (swallowed into "not in the cache"): report the answer
    if isinstance(e, LocalEntryNotFoundError):  # before EntryNotFoundError, its base class: the Hub was not reached
        return LayerpackError(f"{repo_id}: cannot reach the Hub and the files are not in the local cache (check the connection or HF_ENDPOINT)")
    if isinstance(e, RevisionNotFoundError):
        return LayerpackError(f"{repo_id}: revision {revision!r} not found on the Hub")
    if isinstance(e, GatedRepoError):
        return LayerpackError(f"{repo_id}: gated repository; accept its terms on the Hub and log in (HF_TOKEN)")
    if isinstance(e, RepositoryNotFoundError):
        return LayerpackError(f"{repo_id}: repository not found on the Hub (private? set HF_TOKEN or log in)")
    if isinstance(e, EntryNotFoundError):
        return LayerpackError(f"{repo_id}: file not found at revision {revision or 'main'!r} ({_first_line(e)})")
    if isinstance(e, HfHubHTTPError):
        return LayerpackError(f"{repo_id}: Hub request failed ({_first_line(e)})")
    return LayerpackError(f"{repo_id}: cannot fetch from the Hub ({type(e).__name__}: {_first_line(e)})")


def _first_line(e: BaseException, limit: int = 300) -> str:
    """One line for an exception: its first line, plus the server's own message for an HTTP error
    (often the useful part), through the token scrubber (servers and proxies may echo headers)."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    text = lines[0] if lines else ""
    server = getattr(e, "server_message", None)
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(server, str) and server.strip():
        text = (f"HTTP {status}: " if status else "") + " ".join(server.split())
    text = scrub(text)
    return text if len(text) <= limit else text[:limit] + "..."


def discard(root: str, rel: str, local_dir: bool) -> None:
    """Remove a bad download so nothing trusts it and a re-run fetches it again."""
    path = os.path.join(root, rel)
    targets = [path]
    if local_dir:  # huggingface_hub's record of what it downloaded into local_dir
        targets.append(os.path.join(root, ".cache", "huggingface", "download", rel + ".metadata"))
    elif os.path.islink(path):  # HF cache: the snapshot link and the blob it points to
        targets.append(os.path.realpath(path))
    for t in targets:
        try:
            os.remove(t)
        except FileNotFoundError:
            pass


def check_download(entry: FileEntry, root: str, local_dir: bool = False, hash_it: bool = True, progress=None) -> None:
    """A downloaded pack file must have the manifest's size (and sha256): else it is deleted and named.
    The sha256 is the one computed while the file downloaded (stream_hash), when there is one: a
    multi-GB layer file is not read a second time; else the file is hashed here (progress(n) per chunk)."""
    path = os.path.join(root, entry.path)
    if not os.path.isfile(path):
        raise LayerpackError(f"{entry.path}: listed in the manifest but not downloaded")
    size = os.path.getsize(path)
    if size != entry.size:
        discard(root, entry.path, local_dir)
        raise LayerpackError(f"{entry.path}: downloaded {size} bytes, the manifest says {entry.size}; the file was deleted, re-run to fetch it again")
    digest = streamed_sha256(path, size) if hash_it else None
    if digest is None and hash_it:
        digest = sha256_file(path, progress)
    elif progress is not None:
        progress(size)
    if hash_it and digest != entry.sha256:
        discard(root, entry.path, local_dir)
        raise LayerpackError(f"{entry.path}: sha256 does not match the manifest (corrupt download); the file was deleted, re-run to fetch it again")


class RemotePack(Pack):
    """A pack on the Hub, read through the HF cache as its files arrive (see the module docstring)."""

    def __init__(self, repo_id: str, revision: str | None = None, token=None, verify: bool = False,
                 workers: int | None = None):
        hf = _hf()
        remember_token(token)
        check_reachable(repo_id)
        self.repo_id, self.token, self._verify_cached = repo_id, token, verify
        try:
            manifest_path = hf.hf_hub_download(repo_id, MANIFEST_FILE, revision=revision, token=token)
        except Exception as e:
            raise hub_error(e, repo_id, revision) from None
        self.commit = os.path.basename(os.path.dirname(manifest_path))  # .../snapshots/<commit>/manifest.json
        self.revision = revision
        try:
            super().__init__(os.path.dirname(manifest_path), check_files=False)
        except FormatError as e:
            raise type(e)(f"{repo_id}: {e}") from None
        self._entries = {f.path: f for f in self.manifest.files}
        layer_files = [l.file for l in self.manifest.layers]
        for f in self.manifest.files:  # config, tokenizer: small, needed before anything runs
            if f.path != MANIFEST_FILE and f.path not in layer_files:
                self._fetch(f.path)
        self._cached = {rel for rel in layer_files if self._in_cache(rel)}
        # Queued in execution order, taken first-in first-out by daemon threads (a failed or finished
        # run never waits for downloads it no longer needs).
        self._downloads: dict[str, Future] = {rel: Future() for rel in layer_files}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        for rel in layer_files:
            self._queue.put(rel)
        self._closed = False
        for i in range(max(1, workers or DOWNLOAD_WORKERS)):
            threading.Thread(target=self._worker, name=f"layerpack-download-{i}", daemon=True).start()
        self._prefetch_headers()

    # -- downloads ---------------------------------------------------------------------------------
    def _in_cache(self, rel: str) -> bool:
        cached = _hf().try_to_load_from_cache(self.repo_id, rel, revision=self.commit)
        return isinstance(cached, str) and os.path.isfile(cached)

    def _fetch(self, rel: str) -> str:
        fresh = not self._in_cache(rel)
        try:
            with hashing_downloads():  # the sha256 is computed as the bytes arrive (stream_hash)
                path = _hf().hf_hub_download(self.repo_id, rel, revision=self.commit, token=self.token)
        except Exception as e:
            raise hub_error(e, self.repo_id, self.revision) from None
        check_download(self._entries[rel], self.path, hash_it=fresh or self._verify_cached)
        return path

    def _worker(self) -> None:
        while not self._closed:
            try:
                rel = self._queue.get_nowait()
            except queue.Empty:
                return
            fut = self._downloads[rel]
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._fetch(rel))
            except BaseException as e:  # delivered to whoever waits for this file
                fut.set_exception(e)

    def ensure(self, rel: str) -> None:
        """Block until the layer file `rel` is downloaded and checked (raises its error if it failed)."""
        fut = self._downloads.get(rel)
        if fut is not None:
            fut.result()

    def is_local(self, layer: LayerEntry | str) -> bool:
        layer = self.manifest.layer(layer) if isinstance(layer, str) else layer
        fut = self._downloads.get(layer.file)
        return fut is None or (fut.done() and fut.exception() is None)

    def pending(self) -> list[str]:
        """Layer files not downloaded yet."""
        return [rel for rel, fut in self._downloads.items() if not fut.done()]

    def close(self) -> None:
        """Stop starting downloads (those under way finish in their daemon threads)."""
        self._closed = True
        for fut in self._downloads.values():
            fut.cancel()

    # -- headers -----------------------------------------------------------------------------------
    def _prefetch_headers(self) -> None:
        with ThreadPoolExecutor(HEADER_WORKERS, thread_name_prefix="layerpack-header") as pool:
            for layer, st in zip(self.manifest.layers, pool.map(self._header_of, self.manifest.layers)):
                self._check_tensors(layer, st)
                self._headers[layer.file] = st

    def _header_of(self, layer: LayerEntry) -> SafetensorsFile:
        rel, local = layer.file, os.path.join(self.path, layer.file)
        if rel in self._cached or self.is_local(layer):  # in the cache: read the header locally, no request
            self.ensure(rel)
            st = SafetensorsFile(local)
        else:
            size = self._entries[rel].size
            head = self._ranged(rel, 0, min(size, HEADER_PROBE) - 1)
            if len(head) >= 8:
                (n,) = struct.unpack("<Q", head[:8])
                if len(head) < 8 + n <= size and n <= MAX_HEADER_BYTES:  # a longer one is refused unread
                    head += self._ranged(rel, len(head), 8 + n - 1)
            st = SafetensorsFile(local, head=head, file_size=size)
        st.ensure_local = lambda: self.ensure(rel)
        return st

    def _ranged(self, rel: str, start: int, end: int) -> bytes:
        """Bytes start..end (inclusive) of a repo file, by a ranged GET (redirects followed; the
        client drops the Authorization header when a redirect leaves the Hub's origin). The body is
        streamed and only the bytes asked for are kept: a server that ignores the Range header and
        sends a whole 6 GB layer file costs one chunk beyond them, not 6 GB of memory."""
        hf = _hf()
        url = hf.hf_hub_url(self.repo_id, rel, revision=self.commit)
        headers = {**hf.utils.build_hf_headers(token=self.token), "Range": f"bytes={start}-{end}"}
        want = end - start + 1
        try:
            with hf.utils.get_session().stream("GET", url, headers=headers, follow_redirects=True) as resp:
                if resp.status_code >= 400:
                    resp.read()  # an error answer is small; its body holds the Hub's message
                hf.utils.hf_raise_for_status(resp)
                skip = start if resp.status_code == 200 else 0  # Range ignored: the body starts at byte 0
                data = bytearray()
                for chunk in resp.iter_bytes():
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    data += chunk[:want - len(data)]
                    if len(data) >= want:
                        break
        except Exception as e:
            raise hub_error(e, self.repo_id, self.revision) from None
        return bytes(data)


def open_remote(repo_id: str, revision: str | None = None, token=None, verify: bool = False) -> RemotePack:
    if not HUB_REPO_ID.match(repo_id):
        raise LayerpackError(f"{repo_id}: not a local pack folder or a Hub repo id (owner/name)")
    return RemotePack(repo_id, revision=revision, token=token, verify=verify)

