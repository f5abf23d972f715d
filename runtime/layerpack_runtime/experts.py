"""Mixture-of-experts blocks that read only the experts a step uses.

A MoE block's layer file holds its dense tensors (attention, norms, router) first, then each
expert's tensors as one contiguous byte range (the writer's order; see docs/FORMAT.md). When such
a block is not resident, the unit streamer reads only the dense prefix of the file (prefetched like
any unit); the block's router then picks the experts of the current tokens, and `ExpertStore`
serves them: from its LRU cache if there, else by one pread of that expert's byte range. Nothing
of an unselected expert is read. Reads run on a 2-thread pool, a window of a few experts ahead of
the one computing, so reading and compute overlap while a step never holds more than WINDOW
uncached experts (a prefill may select them all). The cache holds experts in stored form
(quantized codes stay quantized; dequantized at use like every streamed weight) within a byte
capacity the loader gives it from the memory budget (a reserved share plus what the plan leaves).

`expert_reads=False` turns this off (the whole layer file is streamed each step, as for dense
models): the baseline the benchmark compares against, and a fallback.
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from .errors import FormatError
from .fileio import read_exact
from .format import EXPERT_LINEARS, EXPERTS_KEY, ROUTER_WEIGHT, ST_DTYPES, expert_of, expert_weight  # noqa: F401 (EXPERTS_KEY: re-exported)
from .qweight import compute_form
from .safetensors_io import SafetensorsFile, zstd_decompress, itemsize
from .validate import check_payload

READ_THREADS = 2
# Experts of one step that are read but not (or no longer) in the cache are held only while in
# flight or in use: at most this many at once, whatever the number of experts a step selects (a
# prefill may select all of them). This bounds the working memory the planner reserves.
WINDOW = READ_THREADS + 1


class _Experts:
    """{expert: weights} for the experts of one step, consumed in the order they were requested.
    Cache hits are ready; misses are read by the store's pool, at most WINDOW ahead of (and
    including) the one in use: indexing expert j waits for its read, drops the previous expert (the
    model is done with it) and submits the next read."""

    def __init__(self, store: "ExpertStore", unit: str, ready: dict[int, dict], misses: list[int]):
        self.store, self.unit = store, unit
        self.inflight_done: dict[int, dict] = {}
        self.ready = ready
        self.misses = misses                     # in consumption order
        self.inflight: dict[int, Future] = {}
        self.current: int | None = None
        self._fill()

    def _fill(self) -> None:
        held = len(self.inflight) + (self.current is not None and self.current not in self.ready)
        while self.misses and held < WINDOW:
            j = self.misses.pop(0)
            self.inflight[j] = self.store._pool.submit(self.store._read_and_cache, (self.unit, j))
            held += 1
        self.store.stats.peak_held = max(self.store.stats.peak_held, held)

    def __getitem__(self, j: int) -> dict[str, object]:
        if self.current is not None and self.current != j and self.current in self.inflight_done:
            del self.inflight_done[self.current]  # the model has moved on: free it (unless cached)
        if j in self.ready:
            self.current = j
            return self.ready[j]
        if j not in self.inflight and j in self.misses:  # out of order: fetch it now
            self.misses.remove(j)
            self.inflight[j] = self.store._pool.submit(self.store._read_and_cache, (self.unit, j))
        t0 = time.perf_counter()
        weights = self.inflight.pop(j).result()
        self.store.stats.wait_s += time.perf_counter() - t0
        self.inflight_done[j] = weights
        self.current = j
        self._fill()
        return weights


@dataclass
class ExpertStats:
    reads: int = 0             # experts read from the file (cache misses)
    bytes_read: int = 0
    hits: int = 0              # experts served from the cache
    read_s: float = 0.0
    wait_s: float = 0.0        # compute thread blocked waiting for an expert read
    peak_held: int = 0         # most experts read and held at once outside the cache (<= WINDOW)
    per_expert: dict[tuple[str, int], int] = field(default_factory=dict)   # (unit, expert) -> reads
    selected: dict[tuple[str, int], int] = field(default_factory=dict)     # (unit, expert) -> steps it was selected in

    def reset(self) -> None:
        self.reads = self.bytes_read = self.hits = self.peak_held = 0
        self.read_s = self.wait_s = 0.0
        self.per_expert.clear()
        self.selected.clear()

    def summary(self) -> str:
        asked = self.reads + self.hits
        rate = f"{100 * self.hits / asked:.0f}%" if asked else "n/a"
        return (f"experts: {self.reads} read ({self.bytes_read / 2**20:.1f} MiB), {self.hits} cache hits "
                f"of {asked} selected ({rate} hit rate)")


class ExpertLayout:
    """Where each expert of one block lives in its layer file, from the validated header: byte
    range [start, end) and its tensors. Checks the writer's promise: dense tensors first, then one
    contiguous range per expert."""

    def __init__(self, st: SafetensorsFile, num_experts: int):
        self.file = st
        groups: dict[int, list] = {}
        dense = []
        for info in st.tensors.values():
            j = expert_of(info.name)
            (dense if j is None else groups.setdefault(j, [])).append(info)
        if sorted(groups) != list(range(num_experts)):
            raise FormatError(f"{st.path}: expected the tensors of experts 0..{num_experts - 1}, found experts {sorted(groups)[:8]}")
        self.ranges: list[tuple[int, int]] = []
        self.tensors: list[list] = []
        for j in range(num_experts):
            infos = sorted(groups[j], key=lambda i: i.start)
            start, end = infos[0].start, infos[-1].end
            if sum(i.nbytes for i in infos) != end - start:  # the tensors tile the file, so no gap = no stranger inside
                raise FormatError(f"{st.path}: the tensors of expert {j} are not one contiguous byte range")
            self.ranges.append((start, end))
            self.tensors.append(infos)
        self.dense_end = min(r[0] for r in self.ranges)
        if any(i.end > self.dense_end for i in dense):
            raise FormatError(f"{st.path}: dense tensors must come before the experts' byte ranges")
        self.dense = {i.name: i for i in dense}

    def stored_bytes(self, j: int) -> int:
        """Bytes of expert j once in memory (decompressed, if the pack is compressed)."""
        return sum(math.prod(i.out_shape) * itemsize(i.out_dtype) for i in self.tensors[j])

    def dense_view(self) -> SimpleNamespace:
        """The file as the unit streamer should see it: only the dense prefix."""
        st = self.file
        # `ready`: a file object may wait for its download (remote packs); forwarded when it has one
        return SimpleNamespace(path=st.path, data_start=st.data_start, file_size=self.dense_end, tensors=self.dense,
                               ready=getattr(st, "ready", lambda: None))


class ExpertStore:
    """The experts of a pack's MoE blocks: their byte ranges, reads, LRU cache and counters."""

    def __init__(self, layers: dict, files: dict[str, SafetensorsFile], num_experts: int, dtype: torch.dtype,
                 device: torch.device, selective: bool = True, page_cache: bool = True):
        self.dtype, self.device, self.selective, self.page_cache = dtype, device, selective, page_cache
        self.num_experts = num_experts
        self.layers = layers
        self.layouts = {name: ExpertLayout(files[name], num_experts) for name, layer in layers.items()
                        if any(t.name == ROUTER_WEIGHT for t in layer.tensors)}
        self.stats = ExpertStats()
        self.capacity = 0
        self._cache: OrderedDict[tuple[str, int], tuple[dict, int]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="layerpack-experts")
        self._entries = {name: {t.name: t for t in layer.tensors} for name, layer in layers.items() if name in self.layouts}

    # -- planning (loader) ----------------------------------------------------------------------
    def selective_for(self, unit: str) -> bool:
        return self.selective and unit in self.layouts

    def expert_bytes(self) -> int:
        return max((lay.stored_bytes(j) for lay in self.layouts.values() for j in range(self.num_experts)), default=0)

    def working_bytes(self, tokens: int, top_k: int) -> int:
        """Experts one block step holds at once beyond the cache: its selected experts, at most WINDOW
        (+ 1: the model still references the previous expert while the next is handed over)."""
        if not self.selective or not self.layouts:
            return 0
        return min(self.num_experts, max(1, tokens) * top_k, WINDOW + 1) * self.expert_bytes()

    def total_expert_bytes(self, units) -> int:
        return sum(self.layouts[u].stored_bytes(j) for u in units if u in self.layouts for j in range(self.num_experts))

    def set_capacity(self, nbytes: int) -> None:
        with self._lock:
            self.capacity = max(0, int(nbytes))
            self._evict()

    def stream_view(self, unit: str, st: SafetensorsFile):
        return self.layouts[unit].dense_view() if self.selective_for(unit) else st

    def dense_layer(self, unit: str):
        """The unit's manifest entry restricted to its dense tensors (what the streamer delivers)."""
        layer = self.layers[unit]
        return SimpleNamespace(tensors=[t for t in layer.tensors if expert_of(t.name) is None])

    def provider(self, unit: str):
        return lambda experts: self.get(unit, experts)

    # -- serving (compute thread) ---------------------------------------------------------------
    def get(self, unit: str, experts) -> _Experts:
        """Compute-form weights {j: {"gate", "up", "down"}} of the given experts of `unit`, to be used
        in the given order. Misses are read by a small thread pool (pread releases the GIL; the disk
        sees several requests) a few experts ahead, and indexing waits for that expert only, so the
        model computes expert j while the next ones are being read."""
        ready, misses = {}, []
        for j in experts:
            key = (unit, int(j))
            self.stats.selected[key] = self.stats.selected.get(key, 0) + 1
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            if hit is not None:
                self.stats.hits += 1
                ready[key[1]] = hit[0]
            else:
                misses.append(key[1])
        return _Experts(self, unit, ready, misses)

    def _read_and_cache(self, key: tuple[str, int]) -> dict[str, object]:
        weights, nbytes = self._read(*key)
        with self._lock:
            if nbytes <= self.capacity:
                self._cache[key] = (weights, nbytes)
                self._cached_bytes += nbytes
                self._evict()
        return weights

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _evict(self) -> None:
        while self._cached_bytes > self.capacity and self._cache:
            _, (_, n) = self._cache.popitem(last=False)
            self._cached_bytes -= n

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def _read(self, unit: str, j: int) -> tuple[dict[str, object], int]:
        t0 = time.perf_counter()
        lay = self.layouts[unit]
        start, end = lay.ranges[j]
        buf = torch.empty(end - start, dtype=torch.uint8)
        ready = getattr(lay.file, "ready", None)  # a file still downloading (remote pack): wait for it
        if ready is not None:
            ready()
        fd = os.open(lay.file.path, os.O_RDONLY)
        try:
            read_exact(fd, buf.numpy(), start, lay.file.path, f"expert {j}")
            if not self.page_cache and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        stored = {}
        for info in lay.tensors[j]:
            raw = buf[info.start - start: info.end - start]
            if info.logical_dtype is not None:
                data = zstd_decompress(lay.file.path, info, bytearray(raw.numpy().tobytes()))
                stored[info.name] = torch.frombuffer(data, dtype=ST_DTYPES[info.out_dtype]).reshape(info.out_shape)
            else:  # aligned: the writer orders an expert's tensors by element size, from the range start
                stored[info.name] = raw.view(ST_DTYPES[info.dtype]).reshape(info.shape)
        entries = self._entries[unit]
        layer = SimpleNamespace(tensors=[entries[expert_weight(j, l)] for l in EXPERT_LINEARS])
        check_payload(layer.tensors, stored, self.layers[unit].file)
        weights = compute_form(layer, stored, self.dtype, dequantize=False)
        if self.device.type != "cpu":
            weights = {k: v.to(self.device) for k, v in weights.items()}
        named = {l: weights[expert_weight(j, l)] for l in EXPERT_LINEARS}
        nbytes = lay.stored_bytes(j)
        with self._lock:  # reads run on the pool's threads
            self.stats.reads += 1
            self.stats.bytes_read += end - start
            self.stats.per_expert[(unit, j)] = self.stats.per_expert.get((unit, j), 0) + 1
            self.stats.read_s += time.perf_counter() - t0
        return named, nbytes
