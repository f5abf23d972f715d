"""The quantizer's threads: quantization chunks run on WORKERS threads (torch and numpy release the
GIL, so 2 cores quantize twice as fast), the calibrated scale search splits one chunk's blocks over
WORKERS threads too (run_pieces), and the next window of a large tensor is read on one more thread
while this one is quantized. The pools are created on first use, not at import: importing
the package (the CLI does, for its option lists) starts no thread."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

CHUNK_ELEMS = 1 << 21   # elements per quantization chunk (a multiple of every block size up to 2^21): ~8 MB fp32
WORKERS = 2
SEARCH_TILE = 4096      # blocks per run of the calibrated scale search (its temporaries stay in cache)

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


def run_pieces(fn, rows: int, tile: int | None = None) -> None:
    """fn(r0, r1) over consecutive runs of range(rows) of `tile` rows (SEARCH_TILE), on this thread
    and search_pool's at once. fn's runs must write disjoint outputs."""
    tile = tile or SEARCH_TILE
    cuts = list(range(0, rows, tile)) + [rows]
    runs = list(zip(cuts[:-1], cuts[1:]))
    if len(runs) == 1 or WORKERS == 1:
        for r in runs:
            fn(*r)
        return
    futures = [search_pool().submit(fn, *r) for r in runs[1::2]]
    for r in runs[0::2]:
        fn(*r)
    for f in futures:
        f.result()


def read_ahead_pool() -> ThreadPoolExecutor:
    """One thread reading the next window of a tensor from the source file."""
    return _pool("read-window", 1)
