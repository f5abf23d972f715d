"""Streaming layer units from disk with a background prefetcher (double buffering).

While unit i computes, a reader thread fills a second buffer with the next streamed unit: one
large read of the file's whole data region (fileio.read_fully: positional reads in a loop, as one
call stops short of 2 GiB; the safetensors header was validated once, at open), zstd payloads
decompressed in that thread too, tensors made as views of the buffer (no per-tensor copies).
Buffers are allocated once and reused, so streaming a 100 GB model allocates nothing per layer and
calls no gc/empty_cache. On CUDA the buffers are pinned and the copy to the
GPU runs on a side stream, overlapping the compute stream.

The reads follow the model's execution order cyclically: after the last streamed block of one
forward comes the first streamed unit of the next, fetched while the head and sampling run. A
request for another unit than the one in flight (an aborted forward) drains and restarts the cycle.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .errors import FormatError
from .format import ST_DTYPES
from .fileio import read_exact, read_fully
from .safetensors_io import SafetensorsFile, zstd_decompress


@dataclass
class StreamStats:
    bytes_read: int = 0       # from disk (or page cache), payload bytes
    units_read: int = 0
    wait_s: float = 0.0       # compute thread blocked waiting for a unit (I/O not hidden)
    read_s: float = 0.0       # time the reader spent reading + decompressing

    def reset(self) -> None:
        self.bytes_read = self.units_read = 0
        self.wait_s = self.read_s = 0.0


class _Slot:
    """One reusable buffer (+ its GPU twin on CUDA)."""

    def __init__(self, nbytes: int, pin: bool):
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.device_buf: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None


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
        cuda = device.type == "cuda"
        self.slots = [_Slot(buffer_bytes, pin=cuda) for _ in range(self.depth + 1)]
        self.free: list[_Slot] = list(self.slots)
        self.inflight: list[tuple[str, Future, _Slot]] = []
        self.held: _Slot | None = None
        self.stats = StreamStats()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="layerpack-prefetch")
        self._copy_stream = torch.cuda.Stream(device) if cuda else None
        self._lock = threading.Lock()
        self._next = 0  # index in self.order of the next unit to submit

    # -- reading (prefetch thread) --------------------------------------------------------------
    def _read(self, name: str, slot: _Slot) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        if slot.ready is not None:  # the GPU copy out of this pinned buffer must finish before we overwrite it
            slot.ready.synchronize()
        st = self.files[name]
        n = st.file_size - st.data_start
        if n > slot.host.numel():
            raise FormatError(f"{st.path}: layer payload of {n} bytes exceeds the planned stream buffer")
        view = memoryview(slot.host.numpy())[:n]
        st.ready()  # a file still downloading (remote pack): wait for it here, in the reader thread
        fd = os.open(st.path, os.O_RDONLY)
        try:
            if read_fully(fd, view, st.data_start) != n:
                raise FormatError(f"{st.path}: file shorter than its header says; truncated or changed on disk")
            if not self.page_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        out = {}
        for info in st.tensors.values():
            raw = slot.host[info.start - st.data_start: info.end - st.data_start]
            if info.logical_dtype is not None:  # zstd: decompress into its own memory, here, off the compute thread
                buf = zstd_decompress(st.path, info, bytearray(raw.numpy().tobytes()))
                out[info.name] = torch.frombuffer(buf, dtype=ST_DTYPES[info.out_dtype]).reshape(info.out_shape)
            else:
                if (info.start - st.data_start) % raw.new_empty(0, dtype=ST_DTYPES[info.dtype]).element_size():
                    raw = raw.clone()  # a MoE expert range can start unaligned (see writer.encode_tensors): copy
                out[info.name] = raw.view(ST_DTYPES[info.dtype]).reshape(info.shape) if info.nbytes else \
                    torch.empty(info.shape, dtype=ST_DTYPES[info.dtype])
        if self.check is not None:
            self.check(name, out)
        if self._copy_stream is not None:
            out = self._to_device(out, slot)
        with self._lock:
            self.stats.bytes_read += n
            self.stats.units_read += 1
            self.stats.read_s += time.perf_counter() - t0
        if self.times is not None:
            self.times.add(name, nbytes=n, read_s=time.perf_counter() - t0)
        return out

    def _to_device(self, tensors: dict[str, torch.Tensor], slot: _Slot) -> dict[str, torch.Tensor]:
        """Pinned host -> device on the side stream; the compute stream waits on slot.ready."""
        with torch.cuda.stream(self._copy_stream):
            moved = {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}
            slot.ready = torch.cuda.Event()
            slot.ready.record(self._copy_stream)
        return moved

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
        the disk keeps a deeper queue than our buffers, at no memory cost to the process."""
        if not hasattr(os, "posix_fadvise"):
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

    def get(self, name: str) -> dict[str, torch.Tensor]:
        """The stored tensors of streamed unit `name`, valid until the next get()."""
        if self.held is not None:  # the previous unit's compute has finished: its buffer is free again
            self.free.append(self.held)
            self.held = None
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
        if slot.ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(slot.ready)
            for t in tensors.values():  # allocated on the copy stream, used on the compute stream
                t.record_stream(compute)
        self.held = slot
        self._submit_more()  # keep the reader busy: next unit into the buffer just freed
        return tensors

    def release(self) -> None:
        """End of a forward that will not continue (e.g. generation finished)."""
        if self.held is not None:
            self.free.append(self.held)
            self.held = None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


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
