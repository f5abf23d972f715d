"""Quantizing one logical tensor window by window into a sink (the layer file being written,
writer.UnitWriter, or a dict in memory), so that a tensor of any size converts in bounded memory:
each window's codes and scales go straight to the sink, and memory is a few windows, whatever the
tensor (windows.py).

The numbers are those of the in-memory path (quantize_tensor is this function over a tensor in
memory): the window is a multiple of the quantization chunk, so every block, chunk and error sum is
computed exactly as if the tensor were whole, and the outliers are the same set
(outliers.select_outliers_stream)."""
from __future__ import annotations

import math
from typing import Protocol

import torch

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import (
    OUTLIER_IDX_I64_FROM,
    SCHEME_INT8,
    SCHEME_NF4,
    SCHEME_NONE,
    ST_DTYPES,
    SUFFIX_ABSMAX,
    SUFFIX_CODES,
    SUFFIX_OUTLIER_IDX,
    SUFFIX_OUTLIER_VAL,
    TORCH_TO_ST,
)
from layerpack_runtime.manifest import TensorEntry
from layerpack_runtime.validate import stored_layout

from . import activation_aware, parallel, windows
from .blocks import all_finite, quantize_chunk, rel_rms
from .outliers import OUTLIER_MAGNITUDE, count as outlier_count, select_outliers_stream
from .windows import InMemory, TensorSource


class Sink(Protocol):
    def write(self, name: str, start: int, t: torch.Tensor) -> None: ...


class DictSink:
    """Collects the stored tensors in memory (quantize_tensor's result)."""

    def __init__(self, specs: dict[str, tuple[torch.dtype, list[int]]]):
        self.tensors = {n: torch.empty(shape, dtype=dt) for n, (dt, shape) in specs.items()}

    def write(self, name: str, start: int, t: torch.Tensor) -> None:
        self.tensors[name].view(-1)[start: start + t.numel()] = t.reshape(-1)


def stored_specs(name: str, shape: list[int], scheme: str, dtype: torch.dtype, block_size: int | None,
                 k: int) -> dict[str, tuple[torch.dtype, list[int]]]:
    """What the layer file holds for one logical tensor: name -> (dtype, shape), known before any
    value is read (so a layer file's header can be written first). The layout is the reader's
    (validate.stored_layout, its one statement), in torch dtypes."""
    layout = stored_layout(name, shape, scheme, block_size, k, TORCH_TO_ST[dtype])
    return {stored: (ST_DTYPES[st_dtype], list(dims)) for stored, (st_dtype, dims) in layout.items()}


def quantize_tensor(name: str, w: torch.Tensor, scheme: str, dtype: torch.dtype, block_size: int | None,
                    outlier_fraction: float = 0.0, outlier_rule: str = OUTLIER_MAGNITUDE,
                    calibrated=None) -> tuple[dict[str, torch.Tensor], TensorEntry]:
    """Quantize one logical tensor in memory. Returns the tensors to store and its manifest entry
    (with the relative RMS error of what the runtime reconstructs, against the source values).
    outlier_rule: how the round(outlier_fraction * n) exact entries are chosen (outliers.OUTLIER_RULES).
    The default here stays `magnitude` (the original rule, which tests pin); the converter's default
    is `row` (ConvertOptions.outlier_rule), the rule scripts/sweep_outliers.py found best.
    calibrated: an activation_aware.Calibrated (activation statistics of this weight's input
    columns, from convert --calibrate) for activation-aware outliers and scales; None: the plain rules."""
    if not w.is_floating_point():
        raise LayerpackError(f"tensor {name} has dtype {w.dtype}; only floating-point weights can be converted")
    sink = DictSink(stored_specs(name, list(w.shape), scheme, dtype, block_size, outlier_count(outlier_fraction, w.numel())))
    entry = quantize_stream(name, InMemory(w), scheme, dtype, block_size, outlier_fraction, outlier_rule, sink,
                            calibrated=calibrated)
    return sink.tensors, entry


def quantize_stream(name: str, src: TensorSource, scheme: str, dtype: torch.dtype, block_size: int | None,
                    outlier_fraction: float, outlier_rule: str, sink: Sink, progress=None, calibrated=None) -> TensorEntry:
    """Quantize one logical tensor from `src` into `sink` (the tensors of stored_specs); returns its
    manifest entry. See quantize_tensor for the meaning of the arguments. `progress` is called with
    the source bytes of each window done (a progress bar's update)."""
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
        if calibrated is not None and len(shape) == 2:  # window by window too (whole rows): the same set
            idx = activation_aware.select_stream(src, k, calibrated, outlier_rule, block_size)
        else:
            idx = select_outliers_stream(outlier_rule, src, k, block_size)
        sink.write(name + SUFFIX_OUTLIER_IDX, 0, idx.to(torch.int32 if n < OUTLIER_IDX_I64_FROM else torch.int64))
    step = parallel.CHUNK_ELEMS // block_size * block_size
    full = n - n % block_size
    window = max(step, windows.WINDOW_ELEMS // step * step)
    pieces = windows.spans(full, window) + ([(full, n)] if full < n else [])  # whole-block windows, then the tail block
    sq_err = sq_ref = 0.0
    vals_done = 0
    pool = parallel.chunk_pool()
    for ws, we, w in windows.read_windows(src, pieces):
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
            results = list(pool.map(lambda se: quantize_chunk(w, se[0], se[1], scheme, block_size, dtype, local, codes, absmax,
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

    def block_importance(self, s: int, e: int, block_size: int) -> torch.Tensor:
        return self.cal.block_importance(self.offset + s, self.offset + e, block_size)


def _store_plain(name: str, src: TensorSource, n: int, dtype: torch.dtype, sink: Sink, progress) -> TensorEntry:
    pieces = windows.spans(n, windows.WINDOW_ELEMS)
    if len(pieces) <= 1:  # the in-memory computation, to the bit
        w = src.read(0, n).reshape(src.shape)
        out = w.to(dtype).contiguous()
        if not all_finite(out):
            raise LayerpackError(f"tensor {name} contains NaN or Inf values; the source checkpoint is corrupt")
        sink.write(name, 0, out)
        progress(n * w.element_size())
        return TensorEntry(name, list(src.shape), SCHEME_NONE, None, 0, rel_rms(w, out) if out.dtype != w.dtype else 0.0)
    sq_err = sq_ref = 0.0
    for s, _, w in windows.read_windows(src, pieces):
        out = w.to(dtype)
        if not all_finite(out):
            raise LayerpackError(f"tensor {name} contains NaN or Inf values; the source checkpoint is corrupt")
        if out.dtype != w.dtype:
            ref = w.float()
            sq_err += torch.linalg.vector_norm(out.float() - ref).item() ** 2
            sq_ref += torch.linalg.vector_norm(ref).item() ** 2
        sink.write(name, s, out)
        progress(w.numel() * w.element_size())
    return TensorEntry(name, list(src.shape), SCHEME_NONE, None, 0, math.sqrt(sq_err / sq_ref) if sq_ref > 0 else 0.0)
