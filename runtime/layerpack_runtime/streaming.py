"""Streaming layer units from disk with a background prefetcher.

While unit i computes, a reader thread fills other slots with the next streamed units
(`depth` ahead): one read of the file's whole data region, split into large chunks that several
threads read at once (fileio.read_parallel: from the page cache one thread's copy tops out near
5 GB/s), zstd payloads decompressed straight into the same slot, tensors made as views of it.
Where each tensor's final bytes lie in a slot is worked out once per unit, at open (`SlotLayout`).
Slots are allocated once and reused, so streaming a 100 GB model allocates nothing per layer.

On CUDA each slot is pinned host memory with a device twin of the same layout, both allocated
once: the reader copies the slot's final bytes into its twin on a copy stream of its own (no
pageable copy, no allocation per unit), and events order the rest - compute waits for the copy
(`copied`), the copy into a twin waits until compute is done with that twin's previous unit
(`used`), and the reader waits for the previous copy out of a pinned slot before overwriting it.
The same events time the copies for --stats (read at the end, never inside a step).

The reads follow the model's execution order cyclically: after the last streamed block of one
forward comes the first streamed unit of the next, fetched while the head and sampling run. A
request for another unit than the one in flight (an aborted forward) drains and restarts the cycle.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .errors import FormatError
from .format import ST_DTYPES
from .fileio import DIRECT_ALIGN, direct_span, read_exact, read_parallel, read_unbuffered
from .safetensors_io import SafetensorsFile, itemsize, zstd_decompress

# Decompressed and realigned tensors start at multiples of this in a slot: every dtype's alignment,
# a cache line, and a DMA-friendly boundary for the copy to the device.
SLOT_ALIGN = 64
# Bytes a slot holds beyond the unit's own when it is read past the page cache (slot_bytes(direct=True),
# so the planner counts them): with page_cache=False a unit is read with O_DIRECT (fileio.read_unbuffered), whose reads start at a
# DIRECT_ALIGN boundary of the file and of memory and end at one. The slot's aligned region starts
# up to DIRECT_ALIGN past its allocation, the unit's bytes start at data_start % DIRECT_ALIGN in
# it, and the read may run to the end of the block holding the payload's last byte: 12 KiB.
SLOT_HEADROOM = 3 * DIRECT_ALIGN
# Benchmarks switch O_DIRECT off to measure the buffered path it replaced; nothing else should.
DIRECT_READS = True


def _align(n: int) -> int:
    return -(-n // SLOT_ALIGN) * SLOT_ALIGN


@dataclass
class SlotLayout:
    """Where a unit's tensors end up in a slot: the file's data region is read to [0, payload);
    a zstd tensor is decompressed, and a tensor whose bytes start at an offset its dtype cannot be
    viewed at (a MoE expert range, see writer.encode_tensors) is copied, to an aligned place after it."""
    payload: int
    places: dict[str, int] = field(default_factory=dict)    # tensor -> offset of its final bytes in the slot
    used: int = 0                                            # bytes of the slot this unit needs
    ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of final bytes (the device copy), merged


def slot_layout(st) -> SlotLayout:
    lay = SlotLayout(payload=st.file_size - st.data_start)
    cursor = _align(lay.payload)
    spans = []
    for info in st.tensors.values():
        rel = info.start - st.data_start
        size = _out_bytes(info)
        if info.logical_dtype is not None or rel % itemsize(info.dtype):
            lay.places[info.name], cursor = cursor, _align(cursor + size)
        else:
            lay.places[info.name] = rel
        if size:
            spans.append((lay.places[info.name], lay.places[info.name] + size))
    lay.used = max([lay.payload, *(b for _, b in spans)])
    for a, b in sorted(spans):  # neighbours (or only alignment padding apart): one copy
        if lay.ranges and a <= lay.ranges[-1][1] + SLOT_ALIGN:
            lay.ranges[-1] = (lay.ranges[-1][0], max(b, lay.ranges[-1][1]))
        else:
            lay.ranges.append((a, b))
    return lay


def slot_bytes(st, direct: bool = False) -> int:
    """The slot size streaming this file needs (the planner's per-unit stream buffer); direct: read
    with O_DIRECT (page_cache=False), which needs SLOT_HEADROOM more."""
    return slot_layout(st).used + (SLOT_HEADROOM if direct else 0)


def direct_shift(st) -> int | None:
    """Where a unit read with O_DIRECT starts in its slot's aligned region: data_start % DIRECT_ALIGN
    (the file's offsets and the memory's must agree modulo the block). None when that would put a
    tensor at an address its dtype cannot be viewed at: the shift must be a multiple of 8, every
    dtype's size, which it is whenever data_start is (the writer pads the header to 8); a foreign
    file that is not is read the buffered way."""
    shift = st.data_start % DIRECT_ALIGN
    return shift if shift % 8 == 0 else None


def _out_bytes(info) -> int:
    n = 1
    for d in info.out_shape:
        n *= d
    return n * itemsize(info.out_dtype)


@dataclass
class StreamStats:
    bytes_read: int = 0       # from disk (or page cache), payload bytes
    units_read: int = 0
    wait_s: float = 0.0       # compute thread blocked waiting for a unit (I/O not hidden)
    read_s: float = 0.0       # time the reader spent on units: reading, decompressing, checking, issuing copies
    io_s: float = 0.0         # of which reading the files (bytes_read / io_s: the read speed)
    h2d_bytes: int = 0        # CUDA: bytes copied host -> device (copies whose timing has been read)
    h2d_s: float = 0.0        # CUDA: copy-stream busy time of those copies (CUDA events)
    exposed_s: float = 0.0    # CUDA: time the compute stream waited for copies (copy time not hidden)

    def reset(self) -> None:
        self.bytes_read = self.units_read = self.h2d_bytes = 0
        self.wait_s = self.read_s = self.io_s = self.h2d_s = self.exposed_s = 0.0

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / self.io_s / 1e9 if self.io_s > 0 else 0.0

    @property
    def h2d_gbps(self) -> float:
        return self.h2d_bytes / self.h2d_s / 1e9 if self.h2d_s > 0 else 0.0

    @property
    def overlap(self) -> float:
        """Fraction of the copy time hidden under compute (1: compute never waited for a copy)."""
        return min(1.0, max(0.0, 1.0 - self.exposed_s / self.h2d_s)) if self.h2d_s > 0 else 0.0

    def summary(self) -> str:
        line = (f"streaming: read {self.bytes_read / 1e9:.2f} GB in {self.units_read} units at {self.read_gbps:.2f} GB/s "
                f"(reader busy {self.read_s:.3f} s, compute waited {self.wait_s:.3f} s)")
        if self.h2d_s > 0:
            line += (f"; host->device {self.h2d_bytes / 1e9:.2f} GB at {self.h2d_gbps:.2f} GB/s (copy stream busy "
                     f"{self.h2d_s:.3f} s), {100 * self.overlap:.0f}% of copy time hidden under compute")
        return line


class _Slot:
    """One reusable buffer (+ its device twin and events on CUDA). `region`: where units go, the
    host buffer from its first DIRECT_ALIGN-aligned byte on for O_DIRECT reads (align), else all of it."""

    def __init__(self, nbytes: int, device: torch.device, align: bool = False):
        cuda = device.type == "cuda"
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
        self.region = self.host[(-self.host.data_ptr()) % DIRECT_ALIGN:] if align else self.host
        self.device = torch.empty(nbytes, dtype=torch.uint8, device=device) if cuda else None
        self.copied: torch.cuda.Event | None = None  # the last copy host -> twin (recorded on the copy stream)
        self.used: torch.cuda.Event | None = None    # compute done with the twin's unit (recorded on the compute stream)


class UnitStreamer:
    def __init__(self, files: dict[str, SafetensorsFile], order: list[str], buffer_bytes: int,
                 device: torch.device, depth: int = 1, page_cache: bool = True, check=None, times=None):
        self.files, self.order, self.device, self.depth = files, list(order), device, max(1, depth)
        # check(unit, tensors): the payload checks (validate.check_payload), run here in the reader
        # thread on the bytes just read, so they overlap compute like the read itself.
        self.check = check
        self.times = times  # unitstats.UnitTimes: per-unit bytes, read and wait seconds
        # page_cache=False: drop each unit from the OS page cache once read, so a stream bigger than
        # RAM does not evict everything else (and every read really comes from the disk).
        self.page_cache = page_cache
        # page_cache=False reads with O_DIRECT (no page-cache copy, nothing to drop) until the file
        # system refuses it once (then buffered, with the page cache dropped after each unit)
        self.direct = DIRECT_READS and not page_cache and bool(getattr(os, "O_DIRECT", 0))
        self.layouts = {name: slot_layout(files[name]) for name in self.order}
        # The planner sized buffer_bytes with slot_bytes() of these files; never less than a unit needs.
        size = max([buffer_bytes, *(lay.used + (SLOT_HEADROOM if self.direct else 0) for lay in self.layouts.values())])
        self._cuda = device.type == "cuda"
        self.slots = [_Slot(size, device, align=self.direct) for _ in range(self.depth + 1)]
        self.free: list[_Slot] = list(self.slots)
        self.inflight: list[tuple[str, Future, _Slot]] = []
        self.held: _Slot | None = None
        self.stats = StreamStats()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="layerpack-prefetch")
        self._copy_stream = torch.cuda.Stream(device) if self._cuda else None
        self._lock = threading.Lock()
        self._copies: deque = deque()  # (start, end, bytes): timing events of copies not yet added to stats
        self._waits: deque = deque()   # (before, after): compute-stream events around each wait for a copy
        self._next = 0  # index in self.order of the next unit to submit

    # -- reading (prefetch thread) --------------------------------------------------------------
    def _read(self, name: str, slot: _Slot) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        if slot.copied is not None:  # the copy out of this pinned buffer must finish before we overwrite it
            slot.copied.synchronize()
        st, lay = self.files[name], self.layouts[name]
        shift = direct_shift(st) if self.direct else None
        at = shift or 0  # the unit's bytes are slot.region[at:at + lay.used]
        if max(at + lay.used, direct_span(st.data_start, lay.payload) if shift is not None else 0) > slot.region.numel():
            raise FormatError(f"{st.path}: layer payload of {lay.used} bytes exceeds the planned stream buffer")
        buf = slot.region[at:at + lay.used]
        st.ready()  # a file still downloading (remote pack): wait for it here, in the reader thread
        t_io = time.perf_counter()
        if shift is not None:
            got, direct = read_unbuffered(st.path, memoryview(slot.region.numpy()), st.data_start, lay.payload)
            if not direct:
                self.direct = False  # refused: buffered from now on (one attempt per streamer, not per unit)
        else:
            fd = os.open(st.path, os.O_RDONLY)
            try:
                got = read_parallel(fd, memoryview(buf.numpy())[:lay.payload], st.data_start)
            finally:
                os.close(fd)
        if got != lay.payload:
            raise FormatError(f"{st.path}: file shorter than its header says; truncated or changed on disk")
        if not self.page_cache and hasattr(os, "posix_fadvise"):  # pages a buffered read (or another reader) left
            fd = os.open(st.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        io_s = time.perf_counter() - t_io
        host = self._finish(st, lay, buf)
        if self.check is not None:
            self.check(name, host)
        out = self._to_device(lay, slot, buf, host) if self._cuda else host
        with self._lock:
            self.stats.bytes_read += lay.payload
            self.stats.units_read += 1
            self.stats.io_s += io_s
            self.stats.read_s += time.perf_counter() - t0
        if self.times is not None:
            self.times.add(name, nbytes=lay.payload, read_s=time.perf_counter() - t0)
        return out

    @staticmethod
    def _finish(st, lay: SlotLayout, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unit's tensors as views of `buf`, once zstd tensors are decompressed into it and
        unaligned ones copied to their aligned place (all inside the slot: nothing allocated)."""
        out = {}
        for info in st.tensors.values():
            at, dtype = lay.places[info.name], ST_DTYPES[info.out_dtype]
            size = _out_bytes(info)
            if not size:
                out[info.name] = torch.empty(info.out_shape, dtype=dtype)
                continue
            final = buf[at:at + size]
            rel = info.start - st.data_start
            if info.logical_dtype is not None:  # zstd: decompressed here, off the compute thread
                zstd_decompress(st.path, info, buf[rel:rel + info.nbytes].numpy(), final.numpy())
            elif at != rel:
                final.copy_(buf[rel:rel + info.nbytes])
            out[info.name] = final.view(dtype).reshape(info.out_shape)
        return out

    def _to_device(self, lay: SlotLayout, slot: _Slot, buf: torch.Tensor, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The slot's final bytes -> its device twin on the copy stream, after compute is done with
        the twin's previous unit; views of the twin in the same layout."""
        stream = self._copy_stream
        with torch.cuda.stream(stream):
            if slot.used is not None:
                stream.wait_event(slot.used)
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for a, b in lay.ranges:
                slot.device[a:b].copy_(buf[a:b], non_blocking=True)
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
        slot.copied = end
        with self._lock:
            self._copies.append((start, end, sum(b - a for a, b in lay.ranges)))
        return {name: slot.device[lay.places[name]:lay.places[name] + t.numel() * t.element_size()].view(t.dtype).reshape(t.shape)
                if t.numel() else torch.empty(t.shape, dtype=t.dtype, device=self.device) for name, t in host.items()}

    # -- scheduling (compute thread) ------------------------------------------------------------
    def _submit_more(self) -> None:
        submitted = False
        while self.free and len(self.inflight) < self.depth and self.order:
            name = self.order[self._next % len(self.order)]
            self._next += 1
            slot = self.free.pop()
            self.inflight.append((name, self._pool.submit(self._read, name, slot), slot))
            submitted = True
        if submitted:
            self._hint_ahead()

    def _hint_ahead(self) -> None:
        """Ask the kernel to start reading the units after those in flight (POSIX_FADV_WILLNEED):
        the disk keeps a deeper queue than our buffers, at no memory cost to the process. Not with
        O_DIRECT reads: they would read the disk a second time, past the pages the hint filled."""
        if not hasattr(os, "posix_fadvise") or self.direct:
            return
        for k in range(self.depth):
            st = self.files[self.order[(self._next + k) % len(self.order)]]
            try:
                fd = os.open(st.path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, st.data_start, st.file_size - st.data_start, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
            except OSError:
                return  # a hint only

    def _restart_at(self, name: str) -> None:
        for _, fut, slot in self.inflight:
            try:
                fut.result()
            except Exception:  # noqa: BLE001 - a read we no longer want; its error is irrelevant now
                pass
            self.free.append(slot)
        self.inflight.clear()
        self._next = self.order.index(name)

    def _release_held(self) -> None:
        """The held unit's compute has been issued: its slot is free again (on CUDA once the compute
        stream gets past this point, which the next copy into its twin waits for)."""
        if self.held is None:
            return
        if self._cuda:
            self.held.used = torch.cuda.Event()
            self.held.used.record(torch.cuda.current_stream(self.device))
        self.free.append(self.held)
        self.held = None

    def get(self, name: str) -> dict[str, torch.Tensor]:
        """The stored tensors of streamed unit `name`, valid until the next get()."""
        self._release_held()
        if not self.inflight or self.inflight[0][0] != name:
            self._restart_at(name)
            self._submit_more()
        unit, fut, slot = self.inflight.pop(0)
        t0 = time.perf_counter()
        tensors = fut.result()
        waited = time.perf_counter() - t0
        self.stats.wait_s += waited
        if self.times is not None:
            self.times.add(name, wait_s=waited)
        if self._cuda:
            compute = torch.cuda.current_stream(self.device)
            timed = not torch.cuda.is_current_stream_capturing()
            before = torch.cuda.Event(enable_timing=True) if timed else None
            if timed:
                before.record(compute)
            compute.wait_event(slot.copied)
            if timed:
                after = torch.cuda.Event(enable_timing=True)
                after.record(compute)
                self._waits.append((before, after))
            self._drain(block=False)
        self.held = slot
        self._submit_more()  # keep the reader busy: next unit into the buffer just freed
        return tensors

    def _drain(self, block: bool) -> None:
        """Add the timings of finished copies and waits to the stats: the ones already done
        (block=False: a query, no sync) or all of them (block=True: at the end of a generation)."""
        with self._lock:
            while self._copies and (block or self._copies[0][1].query()):
                start, end, n = self._copies.popleft()
                end.synchronize()
                self.stats.h2d_s += start.elapsed_time(end) / 1e3
                self.stats.h2d_bytes += n
        while self._waits and (block or self._waits[0][1].query()):
            before, after = self._waits.popleft()
            after.synchronize()
            self.stats.exposed_s += before.elapsed_time(after) / 1e3

    def settled_stats(self) -> StreamStats:
        """The stats with every copy issued so far timed (waits for those copies: not for use inside a step)."""
        if self._cuda:
            self._drain(block=True)
        return self.stats

    def reset_stats(self) -> None:
        self.settled_stats().reset()

    def summary(self) -> str:
        """For --stats: the slots (what they cost where) and the settled read/copy statistics."""
        n, size = len(self.slots), self.slots[0].host.numel() / 2**20
        where = (f"pinned host RAM + {n} device twins of the same size (counted in max_memory)" if self._cuda
                 else "host RAM (counted in max_memory)")
        return f"{self.settled_stats().summary()}\nstream slots: {n} x {size:.1f} MiB (prefetch depth {self.depth}) in {where}"

    def release(self) -> None:
        """End of a forward that will not continue (e.g. generation finished)."""
        self._release_held()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()  # no copy still writing into a twin the allocator may hand out again


class FileRows:
    """An embedding that is not resident, read row by row from its layer file (pread of the rows
    a step needs): a 128K x 16K embedding costs a few KiB per token, not 4 GiB. Only for plain
    (unquantized, uncompressed) embeddings, whose rows are contiguous in the file."""

    def __init__(self, path: str, offset: int, shape: tuple[int, int], stored_dtype: torch.dtype, dtype: torch.dtype,
                 stats: StreamStats | None = None, ready=None, times=None, unit: str = "embed"):
        self.times, self.unit = times, unit
        self.path, self.offset, self.shape, self.stored_dtype, self.dtype = path, offset, tuple(shape), stored_dtype, dtype
        self.ready = ready  # callable: waits until the file is there (a remote pack's download)
        self.row_bytes = self.shape[1] * torch.empty(0, dtype=stored_dtype).element_size()
        self.stats = stats

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        uniq, inv = torch.unique(ids.reshape(-1).cpu(), return_inverse=True)
        buf = torch.empty(uniq.numel() * self.row_bytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        if self.ready is not None:
            self.ready()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, r in enumerate(uniq.tolist()):  # Python ints: a row of a 128K-row table lies past 4 GiB
                read_exact(fd, view[i * self.row_bytes:(i + 1) * self.row_bytes], self.offset + r * self.row_bytes,
                           self.path, f"embedding row {r}")
        finally:
            os.close(fd)
        if self.stats is not None:
            self.stats.bytes_read += len(view)
        if self.times is not None:
            self.times.add(self.unit, nbytes=len(view), read_s=time.perf_counter() - t0)
        table = buf.view(self.stored_dtype).view(uniq.numel(), self.shape[1]).to(self.dtype)
        return table[inv].view(*ids.shape, self.shape[1]).to(ids.device)
