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

import ctypes
import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from .errors import FormatError

# Bytes asked of the kernel per call: a round number below both Linux's per-call cap (0x7ffff000)
# and macOS's (2^31 - 1), so every call is one the kernel can satisfy whole.
MAX_READ_CALL = 1 << 30


def read_fully(fd: int, buf, offset: int, block: int = 0) -> int:
    """Fill the writable buffer `buf` with the bytes of open file `fd` from byte `offset` on, one
    positional read per MAX_READ_CALL bytes (or shorter, when the kernel returns less), until it is
    full or the file ends. Returns the number of bytes read (less than len(buf) only at the end of
    the file). Offsets and sizes are Python ints: nothing passes through 32 bits. block (an O_DIRECT
    descriptor's alignment): a count that is not a whole number of blocks is the end of the file
    (a next call would ask at an unaligned offset, which O_DIRECT refuses)."""
    view = memoryview(buf).cast("B")
    n, got = len(view), 0
    while got < n:
        k = os.preadv(fd, [view[got:got + MAX_READ_CALL]], offset + got)
        if k <= 0:
            break
        got += k
        if block and k % block:
            break
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


# -- parallel reads of one large range (a streamed unit's payload) ----------------------------------
# From the page cache a read is the kernel copying into our buffer: one thread copies at ~5 GB/s,
# far below the memory's (and a PCIe 5 link's ~50 GB/s), and a disk wants several requests in
# flight. os.preadv releases the GIL, so Python threads reading disjoint chunks run truly in
# parallel; each chunk lands at its own offset, so the result is the same bytes whatever the
# thread count or the order the chunks finish in.
# READ_CHUNK: bytes per chunk. 8 MiB is ~1.5 ms of copying at one thread's speed, so a call's and a
# future's overhead (~20 us) stays near 1%, and a 50 MB unit still splits into 6 chunks to share.
READ_CHUNK = 8 << 20
# READ_THREADS: chunks read at once - 8, or one per core up to 16. NVMe disks reach their speed with
# a queue of about 8; page-cache copies kept scaling past 8 threads on a 16-core GPU host (H200
# machine, bench_stream.py, 2026-12-04: 31 GB/s with 8 threads, 40 GB/s with 16 - the streamer fed
# 25 GB/s to a 55 GB/s link with 8), and a machine with few cores gets 8 (threads waiting on copies
# and disks use little CPU). A rule of the machine, never a timing: the bytes are the same anyway.
READ_THREADS = max(8, min(16, os.cpu_count() or 1))

_pool = None  # (pid, ThreadPoolExecutor): made at first use, remade in a forked child (its threads stay in the parent)
_pool_lock = threading.Lock()


def _read_pool():
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            # not capped at the core count: a thread waiting on the disk uses no CPU, and keeps a request queued
            _pool = (os.getpid(), ThreadPoolExecutor(max(1, READ_THREADS), thread_name_prefix="layerpack-read"))
        return _pool[1]


def read_parallel(fd: int, buf, offset: int, chunk: int = READ_CHUNK, reader=read_fully) -> int:
    """read_fully (or `reader`, of the same signature), with the range split into `chunk`-byte
    pieces read by READ_THREADS threads at once (a range of one chunk or less is read here).
    Returns the bytes read from `offset` on without a gap (less than len(buf) only when the file
    ends first). Every chunk's read has finished when this returns, also when one of them failed
    (no thread writes into buf after)."""
    view = memoryview(buf).cast("B")
    n = len(view)
    if n <= chunk:
        return reader(fd, view, offset)
    pool = _read_pool()
    starts = range(0, n, chunk)
    futures = [pool.submit(reader, fd, view[s:s + chunk], offset + s) for s in starts]
    got, short, error = 0, False, None
    for s, fut in zip(starts, futures):
        try:
            k = fut.result()
        except BaseException as e:  # noqa: BLE001 - raised below, once every chunk has finished
            error = error or e
            continue
        if not short:
            got += k
            short = k < min(chunk, n - s)
    if error is not None:
        raise error
    return got


# -- reads that bypass the page cache (O_DIRECT) -----------------------------------------------------
# A stream that does not fit in RAM (page_cache=False) gains nothing from the page cache and pays
# for it: every byte is copied from a cache page into our buffer, the pages are allocated, then
# dropped again (POSIX_FADV_DONTNEED), all on the CPU the compute threads need. With O_DIRECT the
# disk's DMA lands in our buffer: on the 2-core test VM a cold 1.8 GB unit read at 2.2 GB/s with
# 0.07 s of CPU, against 0.7-1.3 GB/s and 0.7-2.5 s of CPU buffered (BENCHMARKS.md, 405B verify pass).
# O_DIRECT wants file offsets, buffer addresses and lengths in multiples of the device's logical
# block size: DIRECT_ALIGN = 4096 covers 512- and 4096-byte devices. A range is therefore read from
# the block holding its first byte to the end of the block holding its last, into a region whose
# start is DIRECT_ALIGN-aligned; the range's bytes land at region[offset % DIRECT_ALIGN:].
DIRECT_ALIGN = 4096


def direct_span(offset: int, nbytes: int) -> int:
    """Bytes of the aligned region read_unbuffered needs for the range [offset, offset + nbytes)."""
    head = offset % DIRECT_ALIGN
    return -(-(head + nbytes) // DIRECT_ALIGN) * DIRECT_ALIGN


def _read_direct_chunk(fd: int, buf, offset: int) -> int:
    """read_fully for an O_DIRECT descriptor (read_parallel's reader)."""
    return read_fully(fd, buf, offset, block=DIRECT_ALIGN)


def read_unbuffered(path: str, region, offset: int, nbytes: int, chunk: int = READ_CHUNK) -> tuple[int, bool]:
    """The bytes [offset, offset + nbytes) of `path` into region[offset % DIRECT_ALIGN:][:nbytes],
    read past the page cache (O_DIRECT, chunks in parallel as read_parallel) where the platform
    and the file system allow it, else the buffered way (read_parallel) into the same place: the
    same bytes at the same place either way. `region`: a writable buffer starting at a
    DIRECT_ALIGN-aligned address, of at least direct_span(offset, nbytes) bytes (its bytes outside
    the range may be overwritten with the file's neighbouring bytes). Returns (bytes of the range
    read, less than nbytes only when the file ends first; whether O_DIRECT did it)."""
    view = memoryview(region).cast("B")
    span, head = direct_span(offset, nbytes), offset % DIRECT_ALIGN
    if len(view) < span:
        raise ValueError(f"read_unbuffered: a region of {len(view)} bytes, {span} needed")
    if span and ctypes.addressof(ctypes.c_char.from_buffer(view)) % DIRECT_ALIGN:
        raise ValueError("read_unbuffered: the region does not start at a multiple of DIRECT_ALIGN")
    if nbytes and chunk % DIRECT_ALIGN == 0 and getattr(os, "O_DIRECT", 0):
        got = _try_direct(path, view[:span], offset - head, chunk)
        if got is not None:
            return max(0, min(nbytes, got - head)), True
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_parallel(fd, view[head:head + nbytes], offset, chunk), False
    finally:
        os.close(fd)


def _try_direct(path: str, view, offset: int, chunk: int) -> int | None:
    """read_parallel of an O_DIRECT descriptor; None where O_DIRECT is refused (EINVAL: a file
    system without it, or a device whose blocks are larger than DIRECT_ALIGN)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    try:
        return read_parallel(fd, view, offset, chunk, reader=_read_direct_chunk)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise
    finally:
        os.close(fd)
