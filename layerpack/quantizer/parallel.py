"""The quantizer's threads: quantization chunks run on WORKERS threads (torch and numpy release the
GIL, so 2 cores quantize twice as fast), and the next window of a large tensor is read on one more
thread while this one is quantized. The pools are created on first use, not at import: importing
the package (the CLI does, for its option lists) starts no thread."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

CHUNK_ELEMS = 1 << 21   # elements per quantization chunk (a multiple of every block size up to 2^21): ~8 MB fp32
WORKERS = 2

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


def read_ahead_pool() -> ThreadPoolExecutor:
    """One thread reading the next window of a tensor from the source file."""
    return _pool("read-window", 1)
