"""A tensor to quantize, read window by window, so that a tensor of any size converts in bounded memory.

A Llama-3.1-405B embedding is 128256 x 16384 = 2.1e9 elements (4.2 GB of bf16, 8.4 GB as fp32);
one MLP matrix is 1.7 GB. The converter never holds such a tensor: it reads WINDOW_ELEMS elements
at a time from the source file (the next window is read while this one is quantized). WINDOW_ELEMS
is read at call time (tests shrink it to run the windowed paths on small tensors)."""
from __future__ import annotations

from typing import Protocol

import torch

from . import parallel

WINDOW_ELEMS = 1 << 25  # 32M elements per read (64 MB of bf16); a multiple of parallel.CHUNK_ELEMS


class TensorSource(Protocol):
    """A tensor to convert, read in pieces: elements [start, stop) of its row-major flattening."""
    shape: list[int]
    dtype: torch.dtype

    def read(self, start: int, stop: int) -> torch.Tensor: ...


class InMemory:
    """A TensorSource over a tensor already in memory."""

    def __init__(self, t: torch.Tensor):
        self.t, self.shape, self.dtype = t, list(t.shape), t.dtype
        self.flat = t.reshape(-1)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.flat[start:stop]


def spans(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive pieces of `size` elements covering n."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def read_windows(src: TensorSource, windows: list[tuple[int, int]]):
    """Yields (start, stop, elements) for each window, reading the next one while this one is used."""
    if not windows:
        return
    pool = parallel.read_ahead_pool()
    ahead = pool.submit(src.read, *windows[0])
    for j, (s, e) in enumerate(windows):
        w = ahead.result()
        if j + 1 < len(windows):
            ahead = pool.submit(src.read, *windows[j + 1])
        yield s, e, w
        del w
