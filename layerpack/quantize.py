"""Block-wise quantization (int8 absmax, NF4) with outlier tables: the inverse of
layerpack_runtime.quant, which defines the reconstruction the error figures are measured on.

NF4 reproduces bitsandbytes.functional.quantize_4bit(x, blocksize, quant_type="nf4") bit for bit:
fp32 input, per-block absmax, x * (1/absmax) clamped to [-1, 1], the code whose interval (split at
the midpoints of the sorted code book) holds the value - ties go down, as torch.bucketize does -
and two codes per byte, the first in the high nibble.

Speed: the work is split into chunks of whole blocks processed by two threads (torch and numpy
release the GIL), and the nearest-code search uses a 64K-entry lookup table instead of a binary
search (see _Nf4Table), which is what makes >= 200 MB/s of bf16 input possible on 2 cores.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import (
    INT8_QMAX,
    NF4_CODE,
    SCHEME_NF4,
)
from layerpack_runtime.manifest import TensorEntry

# Outlier selection rules (which k entries of a weight are kept exactly; see select_outliers_by),
# defined in the torch-free choices.py (the CLI's --outlier-rule choices).
from .choices import OUTLIER_BLOCK_GAIN, OUTLIER_MAGNITUDE, OUTLIER_ROW, OUTLIER_RULES  # noqa: E402, F401
BLOCK_GAIN_DEPTH = 4               # candidates per quantization block under block-gain (more if k needs them)

CHUNK_ELEMS = 1 << 21   # per chunk (a multiple of every block size we allow up to 2^21): ~8 MB fp32
WORKERS = 2
SAMPLE_ELEMS = 1 << 20  # sample size for the outlier threshold estimate


class _Nf4Table:
    """Exact nearest-NF4-code search by table lookup. [-1, 1] is cut into 2^16 - 1 equal cells,
    indexed by a uint16 (no clamping pass: 1.0 lands in the last cell); a cell (or its neighbour)
    that contains one of the 15 decision boundaries is marked 255 and its values are resolved by an
    exact searchsorted; every other cell maps to one code. Marking neighbours too makes the result
    exact even if float rounding puts a value into the adjacent cell."""

    CELLS = (1 << 16) - 1

    def __init__(self):
        code = np.asarray(NF4_CODE, dtype=np.float32)
        self.bounds = (code[:-1] + code[1:]) / np.float32(2)  # fp32 midpoints, as bitsandbytes computes them
        b64 = self.bounds.astype(np.float64)
        edges = -1.0 + np.arange(self.CELLS + 2, dtype=np.float64) * (2.0 / self.CELLS)
        below_lo = np.searchsorted(b64, edges[:-1], side="left")   # boundaries < cell start
        below_hi = np.searchsorted(b64, edges[1:], side="left")    # boundaries < cell end
        straddle = below_hi != below_lo
        marked = straddle | np.roll(straddle, 1) | np.roll(straddle, -1)
        self.table = np.where(marked, 255, below_lo).astype(np.uint8)  # CELLS + 1 entries: x = 1.0 has its own
        self.scale = np.float32(self.CELLS / 2)

    def codes(self, scaled: np.ndarray) -> np.ndarray:
        """scaled: float32 in [-1, 1] -> uint8 codes, identical to bucketize(scaled, bounds, right=False)."""
        cell = ((scaled + np.float32(1.0)) * self.scale).astype(np.uint16)
        q = np.take(self.table, cell)
        hard = np.flatnonzero(q == 255)
        if hard.size:
            q[hard] = np.searchsorted(self.bounds, scaled[hard], side="left")
        return q


_NF4 = _Nf4Table()
_NF4_CODE_NP = np.asarray(NF4_CODE, dtype=np.float32)
_NF4_ZERO = np.uint8(NF4_CODE.index(0.0))
_POOL = ThreadPoolExecutor(WORKERS, thread_name_prefix="quantize")


def _block_stats(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 chunk (whole blocks, or one short tail block). Per-block absmax and x/absmax in [-1, 1]."""
    blocks = x.view(-1, block_size) if x.numel() % block_size == 0 else x.view(1, -1)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
    return absmax, scaled


def _quantize_chunk(src: torch.Tensor, s: int, e: int, scheme: str, block_size: int, dtype: torch.dtype,
                    outliers: torch.Tensor | None, codes: torch.Tensor, absmax: torch.Tensor,
                    calibrated=None) -> tuple[float, float]:
    """Quantize src[s:e] into codes/absmax (disjoint slices, so chunks run in parallel).
    Returns (squared error of the reconstruction in `dtype`, squared norm of the source)."""
    ref = src[s:e].float()
    x = ref
    if outliers is not None and outliers.numel():
        lo, hi = torch.searchsorted(outliers, torch.tensor([s, e]))
        if hi > lo:
            x = ref.clone()
            x[outliers[lo:hi] - s] = 0  # removed before block quantization: shrinks those blocks' absmax
    am, scaled = _block_stats(x, block_size)
    if not _all_finite(am):
        raise LayerpackError("contains NaN or Inf values; the source checkpoint is corrupt")
    if calibrated is not None and "scales" in calibrated.methods:  # convert --calibrate: see calibrated.py (c)
        from .calibrated import choose_scales

        am, scaled = choose_scales(x, am, calibrated.element_importance(s, e), scheme, block_size)
    b0 = s // block_size
    absmax[b0: b0 + am.numel()] = am
    if scheme == SCHEME_NF4:
        q = _NF4.codes(scaled.numpy())
        codes_f = torch.from_numpy(np.take(_NF4_CODE_NP, q))
        if q.size % 2:  # odd count: bitsandbytes pads the scaled values with 0.0, i.e. the code of 0
            q = np.append(q, _NF4_ZERO)
        codes[s // 2: s // 2 + q.size // 2] = torch.from_numpy((q[0::2] << 4) | q[1::2])
        deq = _per_block(codes_f, am, block_size)
    else:
        q = torch.round(scaled * INT8_QMAX).to(torch.int8)
        codes[s:e] = q
        deq = _per_block(q.float(), am / INT8_QMAX, block_size)
    # Outlier positions reconstruct to 0 here and to their exact value in the runtime: zero error,
    # which comparing with x (outliers zeroed) rather than ref accounts for.
    # fp32 norms per chunk (fast); the sum across chunks is a Python float.
    err = torch.linalg.vector_norm(deq.to(dtype).float() - x).item()
    return err * err, torch.linalg.vector_norm(ref).item() ** 2


def _per_block(values: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """values [n] * their block's scale (whole blocks, or one short tail block)."""
    if values.numel() % block_size == 0:
        return (values.view(-1, block_size) * scale.view(-1, 1)).view(-1)
    return values * scale


def select_outliers(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending flat indices of the k largest |w| (ties at the threshold: lowest indices first, so
    the choice is deterministic). A strided sample estimates a threshold that about 2k entries pass;
    the exact top-k is then found among those candidates only, not by sorting the whole tensor."""
    n = flat.numel()
    stride = max(1, n // SAMPLE_ELEMS)
    sample = flat[::stride].float().abs()
    want = min(sample.numel(), math.ceil(2 * k * sample.numel() / n) + 16)
    thr = torch.topk(sample, want, sorted=True).values[-1].item() if want < sample.numel() else 0.0
    while True:
        spans = [(s, min(s + CHUNK_ELEMS, n)) for s in range(0, n, CHUNK_ELEMS)]
        parts = list(_POOL.map(lambda se: _candidates(flat, se[0], se[1], thr), spans))
        idx = torch.cat([p[0] for p in parts])
        mag = torch.cat([p[1] for p in parts])
        if idx.numel() >= k or thr == 0.0:
            break
        thr /= 2  # the sample under-estimated the tail (rare): widen and retry
    kth = torch.topk(mag, k, sorted=False).values.min()
    above = idx[mag > kth]
    equal = idx[mag == kth][: k - above.numel()]
    return torch.sort(torch.cat([above, equal])).values


def select_outliers_by(rule: str, w: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """Ascending flat indices of the k entries of w kept exactly, by `rule` (OUTLIER_RULES)."""
    if rule == OUTLIER_MAGNITUDE:
        return select_outliers(w.reshape(-1), k)
    if rule == OUTLIER_ROW:
        return _select_row(w, k)
    if rule == OUTLIER_BLOCK_GAIN:
        return _select_block_gain(w.reshape(-1), k, block_size)
    raise LayerpackError(f"unknown outlier rule {rule!r} (one of {', '.join(OUTLIER_RULES)})")


def _take_ranked(primary: torch.Tensor, secondary: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """The k candidates first by `primary` (descending), then `secondary` (descending), then lowest
    index: a deterministic order (stable sorts, least significant key first)."""
    order = torch.argsort(idx, stable=True)
    order = order[torch.argsort(secondary[order], descending=True, stable=True)]
    order = order[torch.argsort(primary[order], descending=True, stable=True)]
    return torch.sort(idx[order[:k]]).values


def _select_row(w: torch.Tensor, k: int) -> torch.Tensor:
    """Per output row (dim 0; a 1-D weight is one row): every row's largest |w| first (largest of
    those first), then every row's second largest, ...: rows get equal shares, so no row's scale is
    left to one huge entry while another row keeps several."""
    rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    r = min(rows.shape[1], -(-k // rows.shape[0]))
    mag, col = torch.topk(rows.float().abs(), r, dim=1, sorted=True)
    rank = torch.arange(r).expand_as(mag)
    idx = (torch.arange(rows.shape[0])[:, None] * rows.shape[1] + col).reshape(-1)
    return _take_ranked(-rank.reshape(-1).float(), mag.reshape(-1), idx, k)


def _select_block_gain(flat: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """Greedy on the error saved. A block's quantization error scales with its absmax squared (every
    code is a fraction of it), so taking out its j largest entries saves about
    block_size * (m0^2 - m_j^2) (m: the block's sorted magnitudes). Candidates are each block's top
    BLOCK_GAIN_DEPTH entries (more when k needs them), valued by the average saving of the prefix they complete, made
    non-increasing along the block (a deeper entry is only worth taking after the ones above it)."""
    n = flat.numel()
    nb = -(-n // block_size)
    mag = torch.zeros(nb * block_size)
    mag[:n] = flat.float().abs()
    d = min(block_size - 1, max(BLOCK_GAIN_DEPTH, -(-k // nb) + 1))  # deeper only when k needs it
    top, pos = torch.topk(mag.view(nb, block_size), d + 1, dim=1, sorted=True)
    sq = top.double() ** 2
    saved = (sq[:, :1] - sq[:, 1:]) / torch.arange(1, d + 1, dtype=torch.float64)  # average saving of prefix j
    value = torch.cummin(saved, dim=1).values
    idx = (torch.arange(nb)[:, None] * block_size + pos[:, :d]).reshape(-1)
    value, secondary, idx = value.reshape(-1), top[:, :d].reshape(-1), idx
    ok = idx < n
    return _take_ranked(value[ok], secondary[ok], idx[ok], k)


def _candidates(flat: torch.Tensor, s: int, e: int, thr: float) -> tuple[torch.Tensor, torch.Tensor]:
    mag = flat[s:e].float().abs()
    hit = torch.nonzero(mag >= thr).view(-1)
    return hit + s, mag[hit]


def quantize_tensor(name: str, w: torch.Tensor, scheme: str, dtype: torch.dtype, block_size: int | None,
                    outlier_fraction: float = 0.0, outlier_rule: str = OUTLIER_MAGNITUDE,
                    calibrated=None) -> tuple[dict[str, torch.Tensor], TensorEntry]:
    """Quantize one logical tensor of the source. Returns the tensors to store and its manifest entry
    (with the relative RMS error of what the runtime reconstructs, against the source values).
    outlier_rule: how the round(outlier_fraction * n) exact entries are chosen (OUTLIER_RULES). The
    default here stays `magnitude` (the original rule, which tests pin); the converter's default is
    `row` (ConvertOptions.outlier_rule), the rule scripts/sweep_outliers.py found best.
    calibrated: a calibrated.Calibrated (activation statistics of this weight's input columns, from
    convert --calibrate) for activation-aware outliers and scales; None: the plain rules above."""
    from .streamquant import DictSink, InMemory, outlier_count, quantize_stream, stored_specs

    if not w.is_floating_point():
        raise LayerpackError(f"tensor {name} has dtype {w.dtype}; only floating-point weights can be converted")
    sink = DictSink(stored_specs(name, list(w.shape), scheme, dtype, block_size, outlier_count(outlier_fraction, w.numel())))
    entry = quantize_stream(name, InMemory(w), scheme, dtype, block_size, outlier_fraction, outlier_rule, sink,
                            calibrated=calibrated)
    return sink.tensors, entry


def _rel_rms(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref32 = ref.float()
    denom = torch.linalg.vector_norm(ref32).item()
    return torch.linalg.vector_norm(approx.float() - ref32).item() / denom if denom > 0 else 0.0


def _all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf check without isfinite()'s full-size temporaries: NaN and +-Inf propagate into min/max."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
