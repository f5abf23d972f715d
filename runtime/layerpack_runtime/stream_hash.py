"""sha256 of Hub downloads computed while the bytes arrive, so a pulled 6 GB layer file is not read a
second time just to be checked against the manifest.

huggingface_hub 2.x downloads a file by `file_download.http_get(url, temp_file, ...)`, which writes
the body chunk by chunk into a process-unique temporary file, then `_chmod_and_move(tmp, dest)` renames
it into place (the cache's blob, or the file in a local folder). Inside `hashing_downloads()` both are
wrapped: every chunk written is also hashed, and the digest follows the file to its destination.
`streamed_sha256(path)` then gives it to the checker (remote.check_download), which falls back to
hashing the file (a second pass) whenever no complete digest is known: a file that was already
there, a download by another route (Xet), a huggingface_hub whose internals have changed, or a body
the client rewound in a way the wrapper does not follow. The fallback keeps every check exact; the
wrapper only saves the second read.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading

_lock = threading.Lock()
_active = 0                                   # hashing_downloads() contexts open (any thread)
_digests: dict[str, tuple[int, str]] = {}     # real path -> (bytes hashed, sha256 hex) of complete downloads
_pending: dict[str, "_HashingFile"] = {}      # temporary file path -> its hasher, until moved
_installed = False


class _HashingFile:
    """The temporary file http_get writes into, hashing each chunk on its way to the disk."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0
        self.valid = f.tell() == 0  # a file that is not empty when handed over: its prefix was not seen

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def truncate(self, size=None):
        # http_get rewinds to 0 when a server ignores its Range header (then the whole body comes again)
        end = self._f.truncate(size)
        if end == 0:
            self.sha, self.size, self.valid = hashlib.sha256(), 0, True
        else:
            self.valid = False
        return end

    def __getattr__(self, name):  # seek, tell, flush, name, ...: the file's own
        return getattr(self._f, name)


def install() -> bool:
    """Wrap huggingface_hub's http_get and _chmod_and_move (once per process). False when this
    huggingface_hub lacks them: checks then hash in a second pass."""
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            from huggingface_hub import file_download as fd
        except ImportError:
            return False
        real_get, real_move = getattr(fd, "http_get", None), getattr(fd, "_chmod_and_move", None)
        if real_get is None or real_move is None:
            return False

        def http_get(url, temp_file, *args, **kwargs):
            if _active and not isinstance(temp_file, _HashingFile) and hasattr(temp_file, "name"):
                wrapped = _HashingFile(temp_file)  # its own retries re-enter here with the wrapper: not wrapped twice
                with _lock:
                    _pending[os.path.realpath(temp_file.name)] = wrapped
                temp_file = wrapped
            return real_get(url, temp_file, *args, **kwargs)

        def _chmod_and_move(src, dst):
            real_move(src, dst)
            with _lock:
                h = _pending.pop(os.path.realpath(src), None)
                if h is not None and h.valid:
                    _digests[os.path.realpath(dst)] = (h.size, h.sha.hexdigest())

        fd.http_get, fd._chmod_and_move = http_get, _chmod_and_move
        _installed = True
        return True


@contextlib.contextmanager
def hashing_downloads():
    """Downloads made by huggingface_hub inside this context (any thread) are hashed as they arrive."""
    global _active
    install()
    with _lock:
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if not _active:
                _pending.clear()


def streamed_sha256(path: str, size: int) -> str | None:
    """The sha256 computed while `path` (of `size` bytes) was downloaded, or None; each digest is given
    out once (a later check of the same path, e.g. after it was replaced, hashes it again)."""
    with _lock:
        got = _digests.pop(os.path.realpath(path), None)
    if got is None or got[0] != size or os.path.getsize(path) != size:
        return None
    return got[1]
