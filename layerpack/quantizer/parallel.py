"""The quantizer's threads: quantization chunks run on WORKERS threads (torch and numpy release the
GIL, so 2 cores quantize twice as fast), and the next window of a large tensor is read on one more
thread while this one is quantized. The pools are created on first use, not at import: importing
the package (the CLI does, for its option lists) starts no thread."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

CHUNK_ELEMS = 1 << 21   # elements per quantization chunk (a multiple of every block size up to 2^21): ~8 MB fp32
WORKERS = 2
SEARCH_MIN_ROWS = 256   # blocks per piece below which the calibrated scale search is not split (thread hand-off costs more)

_lock = threading.Lock()
_pools: dict[str, ThreadPoolExecutor] = {}


def _pool(name: str, workers: int) -> ThreadPoolExecutor:
    with _lock:  # two first users at once still share one pool
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(workers, thread_name_prefix=name)
        return _pools[name]


def chunk_pool() -> ThreadPoolExecutor:
    """WORKERS threads for quantization chunks and outlier candidate scans."""
    return _pool("quantize", WORKERS)


def search_pool() -> ThreadPoolExecutor:
    """WORKERS - 1 threads for the calibrated scale search's pieces of one chunk (its caller, a
    chunk_pool thread, searches one piece itself): a separate pool, since chunk_pool's threads wait
    on these pieces."""
    return _pool("scale-search", max(1, WORKERS - 1))


def run_pieces(fn, rows: int, min_rows: int = SEARCH_MIN_ROWS) -> None:
    """fn(r0, r1) on WORKERS contiguous runs of range(rows) at once (one in this thread), or once
    on all of them when rows < 2 * min_rows. fn's runs must write disjoint outputs."""
    n = WORKERS if rows >= 2 * min_rows else 1
    cuts = [rows * i // n for i in range(n + 1)]
    futures = [search_pool().submit(fn, cuts[i], cuts[i + 1]) for i in range(1, n)]
    fn(cuts[0], cuts[1])
    for f in futures:
        f.result()


def read_ahead_pool() -> ThreadPoolExecutor:
    """One thread reading the next window of a tensor from the source file."""
    return _pool("read-window", 1)
