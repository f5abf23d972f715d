"""Reading byte ranges of files, whatever their size: the one read primitive of the runtime.

One read()/pread()/preadv() call never returns more than 0x7ffff000 bytes on Linux (a little under
2 GiB, whatever the buffer), and macOS refuses a call of more than 2^31 - 1 bytes outright; a signal
or a network file system can cut any call shorter. A 405B pack's layer units are 1.8-6.4 GB, so a
single call would silently fill only part of the buffer. Every payload read of the runtime (and of
the toolkit, which builds on it) goes through `read_fully`, which loops until the range is read or
the file ends; `read_exact` turns an early end into a FormatError (a truncated or changed file),
never a hang or a partly filled buffer.
"""
from __future__ import annotations

import os

from .errors import FormatError

# Bytes asked of the kernel per call: a round number below both Linux's per-call cap (0x7ffff000)
# and macOS's (2^31 - 1), so every call is one the kernel can satisfy whole.
MAX_READ_CALL = 1 << 30


def read_fully(fd: int, buf, offset: int) -> int:
    """Fill the writable buffer `buf` with the bytes of open file `fd` from byte `offset` on, one
    positional read per MAX_READ_CALL bytes (or shorter, when the kernel returns less), until it is
    full or the file ends. Returns the number of bytes read (less than len(buf) only at the end of
    the file). Offsets and sizes are Python ints: nothing passes through 32 bits."""
    view = memoryview(buf).cast("B")
    n, got = len(view), 0
    while got < n:
        k = os.preadv(fd, [view[got:got + MAX_READ_CALL]], offset + got)
        if k <= 0:
            break
        got += k
    return got


def read_exact(fd: int, buf, offset: int, path: str, what: str) -> None:
    """read_fully, and a FormatError naming the file and `what` when the file ends first."""
    n = memoryview(buf).nbytes
    got = read_fully(fd, buf, offset)
    if got != n:
        raise FormatError(f"{path}: short read of {what} ({got} of {n} bytes at byte {offset}); "
                          "the file is truncated or changed on disk")


def read_range(path: str, buf, offset: int, what: str) -> None:
    """read_exact on a file opened (and closed) here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        read_exact(fd, buf, offset, path, what)
    finally:
        os.close(fd)
