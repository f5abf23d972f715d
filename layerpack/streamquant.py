"""Quantizing one tensor window by window, so that a tensor of any size converts in bounded memory.

A Llama-3.1-405B embedding is 128256 x 16384 = 2.1e9 elements (4.2 GB of bf16, 8.4 GB as fp32);
one MLP matrix is 1.7 GB. The converter never holds such a tensor: it reads WINDOW_ELEMS elements
at a time from the source file (the next window is read while this one is quantized), and each
window's codes and scales go straight to the layer file (writer.UnitWriter). Memory is a few
windows, whatever the tensor.

The numbers are those of the in-memory path (quantize.quantize_tensor is this function over a
tensor in memory): the window is a multiple of the quantization chunk, so every block, chunk and
error sum is computed exactly as if the tensor were whole; outlier selection keeps the same rule
(quantize.select_outliers_by) - on a tensor that fits one window it is that very function, on a
larger one it collects each window's candidates and keeps the top k by the rule's own order, which
selects the same set (tests/test_convert_scale.py compares the two with a small window).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import (
    OUTLIER_IDX_I64_FROM,
    SCHEME_INT8,
    SCHEME_NF4,
    SCHEME_NONE,
    SUFFIX_ABSMAX,
    SUFFIX_CODES,
    SUFFIX_OUTLIER_IDX,
    SUFFIX_OUTLIER_VAL,
)
from layerpack_runtime.manifest import TensorEntry

from . import quantize as Q

WINDOW_ELEMS = 1 << 25  # 32M elements per read (64 MB of bf16); a multiple of Q.CHUNK_ELEMS

_READ_AHEAD = ThreadPoolExecutor(1, thread_name_prefix="read-window")


class TensorSource(Protocol):
    """A tensor to convert, read in pieces: elements [start, stop) of its row-major flattening."""
    shape: list[int]
    dtype: torch.dtype

    def read(self, start: int, stop: int) -> torch.Tensor: ...


class InMemory:
    def __init__(self, t: torch.Tensor):
        self.t, self.shape, self.dtype = t, list(t.shape), t.dtype
        self.flat = t.reshape(-1)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.flat[start:stop]


class Sink(Protocol):
    def write(self, name: str, start: int, t: torch.Tensor) -> None: ...


class DictSink:
    """Collects the stored tensors in memory (quantize_tensor's result)."""

    def __init__(self, specs: dict[str, tuple[torch.dtype, list[int]]]):
        self.tensors = {n: torch.empty(shape, dtype=dt) for n, (dt, shape) in specs.items()}

    def write(self, name: str, start: int, t: torch.Tensor) -> None:
        self.tensors[name].view(-1)[start: start + t.numel()] = t.reshape(-1)


def outlier_count(fraction: float, n: int) -> int:
    return int(round(fraction * n)) if fraction else 0


def stored_specs(name: str, shape: list[int], scheme: str, dtype: torch.dtype, block_size: int | None,
                 k: int) -> dict[str, tuple[torch.dtype, list[int]]]:
    """What the layer file holds for one logical tensor: name -> (dtype, shape), known before any
    value is read (so a layer file's header can be written first)."""
    if scheme == SCHEME_NONE:
        return {name: (dtype, list(shape))}
    n = math.prod(shape)
    specs: dict[str, tuple[torch.dtype, list[int]]] = {}
    if k:
        specs[name + SUFFIX_OUTLIER_IDX] = (torch.int32 if n < OUTLIER_IDX_I64_FROM else torch.int64, [k])
        specs[name + SUFFIX_OUTLIER_VAL] = (dtype, [k])
    specs[name + SUFFIX_CODES] = ((torch.uint8, [(n + 1) // 2]) if scheme == SCHEME_NF4 else (torch.int8, [n]))
    specs[name + SUFFIX_ABSMAX] = (torch.float32, [-(-n // block_size)])
    return specs


def _windows(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _read_windows(src: TensorSource, spans: list[tuple[int, int]]):
    """Yields (start, stop, elements) for each span, reading the next one while this one is used."""
    if not spans:
        return
    ahead = _READ_AHEAD.submit(src.read, *spans[0])
    for j, (s, e) in enumerate(spans):
        w = ahead.result()
        if j + 1 < len(spans):
            ahead = _READ_AHEAD.submit(src.read, *spans[j + 1])
        yield s, e, w
        del w


def quantize_stream(name: str, src: TensorSource, scheme: str, dtype: torch.dtype, block_size: int | None,
                    outlier_fraction: float, outlier_rule: str, sink: Sink, progress=None, calibrated=None) -> TensorEntry:
    """Quantize one logical tensor from `src` into `sink` (the tensors of stored_specs); returns its
    manifest entry. See quantize.quantize_tensor for the meaning of the arguments. `progress` is
    called with the source bytes of each window done (a progress bar's update). `calibrated`:
    convert --calibrate's statistics of this weight (calibrated.Calibrated) or None."""
    shape = list(src.shape)
    n = math.prod(shape)
    if not src.dtype.is_floating_point:
        raise LayerpackError(f"tensor {name} has dtype {src.dtype}; only floating-point weights can be converted")
    progress = progress or (lambda nbytes: None)
    if scheme == SCHEME_NONE:
        return _store_plain(name, src, n, dtype, sink, progress)
    if scheme not in (SCHEME_NF4, SCHEME_INT8):
        raise LayerpackError(f"unknown quantization scheme {scheme!r}")
    k = outlier_count(outlier_fraction, n)
    idx = None
    if k:
        if calibrated is not None and len(shape) == 2:
            # Calibrated selection works on the whole weight (not windowed yet: a 405B-size tensor
            # is then held in memory once while its outliers are chosen).
            from .calibrated import select

            idx = select(src.read(0, n).reshape(shape), k, calibrated,
                         lambda w_, k_: Q.select_outliers_by(outlier_rule, w_, k_, block_size))
        else:
            idx = select_outliers_stream(outlier_rule, src, k, block_size)
        sink.write(name + SUFFIX_OUTLIER_IDX, 0, idx.to(torch.int32 if n < OUTLIER_IDX_I64_FROM else torch.int64))
    step = Q.CHUNK_ELEMS // block_size * block_size
    full = n - n % block_size
    window = max(step, WINDOW_ELEMS // step * step)
    spans = _windows(full, window) + ([(full, n)] if full < n else [])  # whole-block windows, then the tail block
    sq_err = sq_ref = 0.0
    vals_done = 0
    for ws, we, w in _read_windows(src, spans):
        local = None
        if idx is not None:
            lo, hi = (int(i) for i in torch.searchsorted(idx, torch.tensor([ws, we])))
            local = idx[lo:hi] - ws
            if hi > lo:  # exact values of this window's outliers
                sink.write(name + SUFFIX_OUTLIER_VAL, vals_done, w[local].to(dtype))
                vals_done += hi - lo
        m = we - ws
        codes = torch.empty((m + 1) // 2, dtype=torch.uint8) if scheme == SCHEME_NF4 else torch.empty(m, dtype=torch.int8)
        absmax = torch.empty(-(-m // block_size), dtype=torch.float32)
        chunks = [(s, min(s + step, m)) for s in range(0, m, step)]
        cal = _Shifted(calibrated, ws) if calibrated is not None else None
        try:
            results = list(Q._POOL.map(lambda se: Q._quantize_chunk(w, se[0], se[1], scheme, block_size, dtype, local, codes, absmax,
                                                                    cal), chunks))
        except LayerpackError as e:
            raise LayerpackError(f"tensor {name} {e}") from None
        for r in results:  # in order: the same float sums as one pass over the whole tensor
            sq_err += r[0]
            sq_ref += r[1]
        sink.write(name + SUFFIX_CODES, ws // 2 if scheme == SCHEME_NF4 else ws, codes)
        sink.write(name + SUFFIX_ABSMAX, ws // block_size, absmax)
        progress(m * w.element_size())
    return TensorEntry(name, shape, scheme, block_size, k, math.sqrt(sq_err / sq_ref) if sq_ref > 0 else 0.0)


class _Shifted:
    """A Calibrated seen from a window starting at flat position `offset` (chunks use window positions)."""

    def __init__(self, cal, offset: int):
        self.cal, self.offset, self.methods = cal, offset, cal.methods

    def element_importance(self, s: int, e: int) -> torch.Tensor:
        return self.cal.element_importance(self.offset + s, self.offset + e)


def _store_plain(name: str, src: TensorSource, n: int, dtype: torch.dtype, sink: Sink, progress) -> TensorEntry:
    spans = _windows(n, WINDOW_ELEMS)
    if len(spans) <= 1:  # the in-memory computation, to the bit
        w = src.read(0, n).reshape(src.shape)
        out = w.to(dtype).contiguous()
        if not Q._all_finite(out):
            raise LayerpackError(f"tensor {name} contains NaN or Inf values; the source checkpoint is corrupt")
        sink.write(name, 0, out)
        progress(n * w.element_size())
        return TensorEntry(name, list(src.shape), SCHEME_NONE, None, 0, Q._rel_rms(w, out) if out.dtype != w.dtype else 0.0)
    sq_err = sq_ref = 0.0
    for s, _, w in _read_windows(src, spans):
        out = w.to(dtype)
        if not Q._all_finite(out):
            raise LayerpackError(f"tensor {name} contains NaN or Inf values; the source checkpoint is corrupt")
        if out.dtype != w.dtype:
            ref = w.float()
            sq_err += torch.linalg.vector_norm(out.float() - ref).item() ** 2
            sq_ref += torch.linalg.vector_norm(ref).item() ** 2
        sink.write(name, s, out)
        progress(w.numel() * w.element_size())
    return TensorEntry(name, list(src.shape), SCHEME_NONE, None, 0, math.sqrt(sq_err / sq_ref) if sq_ref > 0 else 0.0)


# ------------------------------------------------------------------------------ outlier selection
def select_outliers_stream(rule: str, src: TensorSource, k: int, block_size: int) -> torch.Tensor:
    """Ascending flat indices of the k entries kept exactly under `rule` (quantize.OUTLIER_RULES)."""
    shape = list(src.shape)
    n = math.prod(shape)
    if n <= WINDOW_ELEMS:
        return Q.select_outliers_by(rule, src.read(0, n).reshape(shape), k, block_size)
    if rule == Q.OUTLIER_ROW:
        rows = shape[0] if len(shape) > 1 else 1
        cols = n // rows
        r = min(cols, -(-k // rows))
        per = max(1, WINDOW_ELEMS // cols)
        spans = [(s * cols, min(s + per, rows) * cols) for s in range(0, rows, per)]

        def candidates(s: int, w: torch.Tensor):
            mag, col = torch.topk(w.view(-1, cols).float().abs(), r, dim=1, sorted=True)
            rank = torch.arange(r).expand_as(mag)
            idx = (torch.arange(s // cols, s // cols + mag.shape[0])[:, None] * cols + col).reshape(-1)
            return -rank.reshape(-1).float(), mag.reshape(-1), idx
    elif rule == Q.OUTLIER_MAGNITUDE:
        spans = _windows(n, WINDOW_ELEMS)

        def candidates(s: int, w: torch.Tensor):
            mag = w.float().abs()
            if mag.numel() > k:  # only this window's k largest (and ties) can be among the k overall
                hit = torch.nonzero(mag >= torch.topk(mag, k, sorted=False).values.min()).view(-1)
                return mag[hit], mag[hit], hit + s
            return mag, mag, torch.arange(s, s + w.numel())
    elif rule == Q.OUTLIER_BLOCK_GAIN:
        nb = -(-n // block_size)
        d = min(block_size - 1, max(Q.BLOCK_GAIN_DEPTH, -(-k // nb) + 1))
        spans = _windows(n, WINDOW_ELEMS // block_size * block_size)

        def candidates(s: int, w: torch.Tensor):
            m = w.numel()
            mb = -(-m // block_size)
            mag = torch.zeros(mb * block_size)
            mag[:m] = w.float().abs()
            top, pos = torch.topk(mag.view(mb, block_size), d + 1, dim=1, sorted=True)
            sq = top.double() ** 2
            saved = (sq[:, :1] - sq[:, 1:]) / torch.arange(1, d + 1, dtype=torch.float64)
            value = torch.cummin(saved, dim=1).values.reshape(-1)
            idx = (torch.arange(mb)[:, None] * block_size + pos[:, :d]).reshape(-1)
            ok = idx < m
            return value[ok], top[:, :d].reshape(-1)[ok], idx[ok] + s
    else:
        raise LayerpackError(f"unknown outlier rule {rule!r} (one of {', '.join(Q.OUTLIER_RULES)})")
    return _top_k_streamed(src, spans, candidates, k)


def _top_k_streamed(src: TensorSource, spans, candidates, k: int) -> torch.Tensor:
    """The k best candidates over all windows under the order (primary desc, secondary desc, index
    asc) - quantize._take_ranked's order. Candidates below the current k-th primary are dropped as
    they come, and the kept set is cut back to k whenever it exceeds 4k, so memory is O(k + window)."""
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    count, floor = 0, None
    for s, _, w in _read_windows(src, spans):
        p, sec, idx = candidates(s, w)
        if floor is not None:
            keep = p >= floor  # ties with the k-th are kept: the final order decides among them
            p, sec, idx = p[keep], sec[keep], idx[keep]
        kept.append((p, sec, idx))
        count += idx.numel()
        if count > 4 * k:
            kept = [_best(kept, k)]
            count = kept[0][2].numel()
            floor = kept[0][0].min() if count >= k else None
    p, sec, idx = _best(kept, k)
    return torch.sort(idx).values


def _best(parts, k: int):
    p = torch.cat([x[0].to(torch.float64) for x in parts])
    sec = torch.cat([x[1].to(torch.float64) for x in parts])
    idx = torch.cat([x[2] for x in parts])
    order = torch.argsort(idx, stable=True)
    order = order[torch.argsort(sec[order], descending=True, stable=True)]
    order = order[torch.argsort(p[order], descending=True, stable=True)][:k]
    return p[order], sec[order], idx[order]
