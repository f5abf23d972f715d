"""Quantized weights kept in their stored form and dequantized inside the linear layer, at use
(gpt-fast style): a streamed or resident 4-bit layer costs its 4-bit bytes of memory, not 16.

CPU: pure torch (quant.dequantize_nf4: a 256-entry table maps each packed byte to its two NF4
values, so one index_select does two codes). CUDA: bitsandbytes' dequantization kernel when it is installed
(the NF4 layout is theirs), else the same pure-torch path. Outlier tables are written back after
dequantization (their quantized value is exactly 0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .format import SCHEME_INT8, SCHEME_NF4, SUFFIX_ABSMAX, SUFFIX_CODES, SUFFIX_OUTLIER_IDX, SUFFIX_OUTLIER_VAL
from .quant import apply_outliers, dequantize_int8, dequantize_nf4

# Weights larger than this are dequantized and multiplied in row chunks, so a 128K-vocabulary head
# needs a chunk's worth of working memory, not a full-precision copy of itself.
CHUNK_ELEMS = 1 << 21


def _bnb():
    try:
        import bitsandbytes.functional as bnbf  # optional: only on CUDA, only if installed

        return bnbf
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return None


class QuantWeight:
    """One quantized weight: codes + absmax (+ outliers), dequantized on use to `dtype`."""

    __slots__ = ("scheme", "shape", "block_size", "codes", "absmax", "outlier_idx", "outlier_val", "dtype")

    def __init__(self, scheme, shape, block_size, codes, absmax, outlier_idx, outlier_val, dtype):
        self.scheme, self.shape, self.block_size = scheme, tuple(shape), int(block_size)
        self.codes, self.absmax, self.outlier_idx, self.outlier_val, self.dtype = codes, absmax, outlier_idx, outlier_val, dtype

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], name: str, entry, dtype: torch.dtype) -> "QuantWeight":
        return cls(entry.scheme, entry.shape, entry.block_size, tensors[name + SUFFIX_CODES], tensors[name + SUFFIX_ABSMAX],
                   tensors.get(name + SUFFIX_OUTLIER_IDX), tensors.get(name + SUFFIX_OUTLIER_VAL), dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax, self.outlier_idx, self.outlier_val) if t is not None)

    def to(self, device: torch.device, non_blocking: bool = False) -> "QuantWeight":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QuantWeight(self.scheme, self.shape, self.block_size, move(self.codes), move(self.absmax),
                           move(self.outlier_idx), move(self.outlier_val), self.dtype)

    def dequantize(self) -> torch.Tensor:
        device = self.codes.device
        if self.scheme == SCHEME_NF4:
            w = self._nf4_cuda() if device.type == "cuda" else None
            if w is None:
                w = dequantize_nf4(self.codes, self.absmax, self.shape, self.block_size, self.dtype)
        elif self.scheme == SCHEME_INT8:
            w = dequantize_int8(self.codes, self.absmax, self.shape, self.block_size, self.dtype)
        else:
            raise ValueError(self.scheme)
        if self.outlier_idx is not None and self.outlier_idx.numel():
            w = apply_outliers(w, self.outlier_idx, self.outlier_val)
        return w

    def _nf4_cuda(self) -> torch.Tensor | None:
        bnbf = _bnb()
        if bnbf is None:
            return None
        state = bnbf.QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=bnbf.get_4bit_type("nf4", device=self.codes.device),
                                blocksize=self.block_size, quant_type="nf4", dtype=self.dtype)
        return bnbf.dequantize_4bit(self.codes.view(-1, 1), state)

    def row_slice(self, r0: int, r1: int) -> "QuantWeight":
        """Rows [r0, r1) as a QuantWeight of their own (r0 * cols and r1 * cols must fall on block
        boundaries; a block may straddle two rows inside the slice)."""
        cols = self.shape[1]
        per_row_codes = cols // 2 if self.scheme == SCHEME_NF4 else cols
        idx = val = None
        if self.outlier_idx is not None and self.outlier_idx.numel():
            lo, hi = (int(i) for i in torch.searchsorted(self.outlier_idx, torch.tensor([r0 * cols, r1 * cols], device=self.outlier_idx.device,
                                                                                           dtype=self.outlier_idx.dtype)))
            idx, val = self.outlier_idx[lo:hi] - r0 * cols, self.outlier_val[lo:hi]
        b0, b1 = r0 * cols // self.block_size, r1 * cols // self.block_size
        return QuantWeight(self.scheme, (r1 - r0, cols), self.block_size, self.codes.reshape(-1)[r0 * per_row_codes: r1 * per_row_codes],
                           self.absmax.reshape(-1)[b0:b1], idx, val, self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = self.shape[0], self.shape[-1]
        if len(self.shape) != 2 or rows * cols <= CHUNK_ELEMS or cols % 2 or (rows * cols) % self.block_size:
            return F.linear(x, self.dequantize(), bias)
        # chunks of whole blocks: `unit` rows end on a block boundary even when blocks straddle rows
        unit = self.block_size // math.gcd(cols, self.block_size)
        step = max(unit, CHUNK_ELEMS // cols // unit * unit)
        out = torch.empty(*x.shape[:-1], rows, dtype=x.dtype, device=x.device)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out[..., r0:r1] = F.linear(x, self.row_slice(r0, r1).dequantize(), None if bias is None else bias[r0:r1])
        return out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding gather of a (tied, quantized) embedding: dequantize only the rows needed when
        rows are whole blocks, else the whole matrix."""
        rows, hidden = self.shape[0], self.shape[-1]
        bs = self.block_size
        if len(self.shape) == 2 and (rows * hidden) % bs == 0 and bs % 2 == 0:
            # Only the blocks holding the selected rows are dequantized (int8 and NF4, blocks aligned
            # to rows or not, with or without outliers): dequantizing a big vocabulary's whole
            # embedding would cost several times the weight in float32 work buffers, far beyond the
            # memory plan's activations.
            uniq, inv = torch.unique(ids.reshape(-1), return_inverse=True)
            first = uniq * hidden // bs                               # first block of each row
            span = -(-hidden // bs) + 1                               # blocks a row can touch
            blocks = (first[:, None] + torch.arange(span, device=uniq.device)).clamp_(max=rows * hidden // bs - 1)
            per_block = bs // 2 if self.scheme == SCHEME_NF4 else bs
            codes = self.codes.reshape(-1, per_block)[blocks.reshape(-1)]
            absmax = self.absmax.reshape(-1)[blocks.reshape(-1)]
            part = QuantWeight(self.scheme, (blocks.numel() * bs,), bs, codes.reshape(-1), absmax, None, None, self.dtype)
            values = part.dequantize().view(uniq.numel(), span * bs)
            offset = (uniq * hidden - first * bs)[:, None] + torch.arange(hidden, device=uniq.device)
            out = values.gather(1, offset)
            if self.outlier_idx is not None and self.outlier_idx.numel():
                # outliers are sorted flat indices: those of row r lie in [r * hidden, (r + 1) * hidden)
                bounds = torch.stack([uniq * hidden, (uniq + 1) * hidden]).to(self.outlier_idx.dtype)
                lo, hi = torch.searchsorted(self.outlier_idx, bounds)
                counts = hi - lo
                which = torch.repeat_interleave(torch.arange(uniq.numel(), device=uniq.device), counts)
                pos = torch.repeat_interleave(lo - torch.cumsum(counts, 0) + counts, counts) + torch.arange(int(counts.sum()), device=uniq.device)
                flat = self.outlier_idx[pos].long() - uniq[which] * hidden + which * hidden
                out.view(-1).index_put_((flat,), self.outlier_val[pos].to(out.dtype))
            return out[inv].view(*ids.shape, hidden)
        return F.embedding(ids, self.dequantize())


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for plain tensors and QuantWeights alike."""
    if isinstance(weight, QuantWeight):
        return weight.linear(x, bias)
    return F.linear(x, weight, bias)


def embedding(ids: torch.Tensor, weight) -> torch.Tensor:
    """Row gather from a plain tensor, a QuantWeight, or anything else with rows(ids) (FileRows)."""
    if isinstance(weight, torch.Tensor):
        return F.embedding(ids, weight)
    return weight.rows(ids)


def compute_form(layer, stored: dict[str, torch.Tensor], dtype: torch.dtype, dequantize: bool) -> dict[str, object]:
    """A unit's logical tensors for the model code: plain tensors in `dtype`, and quantized weights
    either as QuantWeight (dequantized at use) or, with dequantize=True, dequantized once now."""
    out: dict[str, object] = {}
    for t in layer.tensors:
        if t.scheme == "none":
            v = stored[t.name]
            out[t.name] = v if v.dtype == dtype else v.to(dtype)
        else:
            q = QuantWeight.from_stored(stored, t.name, t, dtype)
            out[t.name] = q.dequantize() if dequantize else q
    return out
