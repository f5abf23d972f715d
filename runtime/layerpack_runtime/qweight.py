"""Quantized weights kept in their stored form and used by the linear layer as they are (gpt-fast
style): a streamed or resident 4-bit layer costs its 4-bit bytes of memory, not 16.

How a QuantWeight computes, fastest first:
* CPU, up to GEMV_MAX_ROWS activation rows (decode, small batches): the native kernels
  (kernels/qmatvec.c) multiply straight from the codes, no dequantized copy: at the speed of the
  stored bytes. Outlier tables are added as a sparse correction. 2..8 rows (a serving engine's
  decode step) share each decode of the codes; with bfloat16 activations and AVX512-BF16 they
  multiply the weights rounded to bfloat16, as the dequantize + GEMM path does (qmatvec.c);
  NF4 so up to 32 rows (speculative verify passes, serving batches), where that still beats GEMM.
* CUDA, up to GEMV_MAX_ROWS activation rows, int8 and NF4: the Triton GEMV
  (kernels/triton_gemv.py) when triton is installed: straight from the codes, outliers added by
  the kernel, no host sync (CUDA-graph safe). Without triton, one row of NF4: bitsandbytes' fused
  4-bit GEMV (`matmul_4bit`) when installed.
* Otherwise (prefill, odd layouts, no compiler): dequantize once - by the native kernel when
  there is one, else pure torch (quant.py: a 256-entry table maps each packed byte to its two NF4
  values) or bitsandbytes on CUDA - in row chunks, then one GEMM. Outlier tables are written back
  after dequantization (their quantized value is exactly 0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import kernels
from .kernels import triton_gemv
from .format import SCHEME_INT8, SCHEME_NF4, SUFFIX_ABSMAX, SUFFIX_CODES, SUFFIX_OUTLIER_IDX, SUFFIX_OUTLIER_VAL
from .quant import apply_outliers, dequantize_int8, dequantize_nf4

# Weights larger than this are dequantized and multiplied in row chunks, so a 128K-vocabulary head
# needs a chunk's worth of working memory, not a full-precision copy of itself.
CHUNK_ELEMS = 1 << 21
# Up to this many activation rows multiply straight from the codes (one tile: the weights are decoded
# once for all of them); more rows dequantize in chunks and use GEMM. Measured (bench_kernels.py):
# at 16 rows dequantize + GEMM already wins on 8B/405B-sized matrices, at 4-8 rows the codes do.
# Exception on the CPU: NF4 with bfloat16 activations and AVX512-BF16 up to 32 rows (_cpu_nf4_max_rows).
GEMV_MAX_ROWS = 8
_CODE_DTYPES = {SCHEME_NF4: torch.uint8, SCHEME_INT8: torch.int8}


def _cpu_nf4_max_rows(scheme: str, x: torch.Tensor) -> int:
    """More rows than GEMV_MAX_ROWS that the native NF4 kernel still multiplies faster than
    dequantize + GEMM on this CPU (bfloat16 activations with AVX512-BF16: 32; see
    lp_nf4_batch_max in kernels/qmatvec.c), else GEMV_MAX_ROWS."""
    if scheme != SCHEME_NF4 or x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return GEMV_MAX_ROWS
    lib = kernels.native()
    fn = getattr(lib, "lp_nf4_batch_max", None) if lib is not None else None
    return int(fn(1)) if fn is not None else GEMV_MAX_ROWS
_VAL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bnb_matmul():
    try:
        from bitsandbytes import matmul_4bit  # optional: fused 4-bit GEMV on CUDA

        return matmul_4bit
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return None


def _bnb():
    try:
        import bitsandbytes.functional as bnbf  # optional: only on CUDA, only if installed

        return bnbf
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return None


_NF4_CODES: dict = {}


def _nf4_code(bnbf, device: torch.device) -> torch.Tensor:
    """bitsandbytes' NF4 code book on `device`, made once: get_4bit_type copies a Python list to the
    device on every call, a host-to-device copy that a CUDA graph capture refuses (decode_step.py)."""
    key = str(device)
    if key not in _NF4_CODES:
        _NF4_CODES[key] = bnbf.get_4bit_type("nf4", device=device)
    return _NF4_CODES[key]


class QuantWeight:
    """One quantized weight: codes + absmax (+ outliers), dequantized on use to `dtype`."""

    __slots__ = ("scheme", "shape", "block_size", "codes", "absmax", "outlier_idx", "outlier_val", "dtype", "_gemv", "_triton")

    def __init__(self, scheme, shape, block_size, codes, absmax, outlier_idx, outlier_val, dtype):
        self.scheme, self.shape, self.block_size = scheme, tuple(shape), int(block_size)
        self.codes, self.absmax, self.outlier_idx, self.outlier_val, self.dtype = codes, absmax, outlier_idx, outlier_val, dtype
        self._gemv = None  # (codes, absmax) the native GEMV was last found to take (see _linear_native)
        self._triton = None  # (codes, absmax, outlier_idx, outlier_val) the Triton GEMV was last found to take

    @classmethod
    def from_stored(cls, tensors: dict[str, torch.Tensor], name: str, entry, dtype: torch.dtype) -> "QuantWeight":
        return cls(entry.scheme, entry.shape, entry.block_size, tensors[name + SUFFIX_CODES], tensors[name + SUFFIX_ABSMAX],
                   tensors.get(name + SUFFIX_OUTLIER_IDX), tensors.get(name + SUFFIX_OUTLIER_VAL), dtype)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax, self.outlier_idx, self.outlier_val) if t is not None)

    def to(self, device: torch.device, non_blocking: bool = False) -> "QuantWeight":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return QuantWeight(self.scheme, self.shape, self.block_size, move(self.codes), move(self.absmax),
                           move(self.outlier_idx), move(self.outlier_val), self.dtype)

    def _native_layout(self) -> bool:
        """Whether the native kernels can read these tensors as they are: contiguous CPU tensors of
        the format's dtypes and the exact element counts of the shape (never read past a tensor)."""
        n = self.numel
        codes_n = (n + 1) // 2 if self.scheme == SCHEME_NF4 else n
        return (self.codes.device.type == "cpu" and self.codes.dtype == _CODE_DTYPES.get(self.scheme)
                and self.codes.is_contiguous() and self.codes.numel() == codes_n
                and self.absmax.dtype == torch.float32 and self.absmax.is_contiguous()
                and self.block_size > 0 and self.absmax.numel() == -(-n // self.block_size))

    def dequantize(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight in `dtype`; on CPU, written into `out` (a reusable scratch buffer) when given."""
        device = self.codes.device
        w = self._dequantize_native(out) if device.type == "cpu" else None
        if w is None and self.scheme == SCHEME_NF4:
            w = self._nf4_cuda() if device.type == "cuda" else None
            if w is None:
                w = dequantize_nf4(self.codes, self.absmax, self.shape, self.block_size, self.dtype)
        elif w is None and self.scheme == SCHEME_INT8:
            w = dequantize_int8(self.codes, self.absmax, self.shape, self.block_size, self.dtype)
        elif w is None:
            raise ValueError(self.scheme)
        if self.outlier_idx is not None and self.outlier_idx.numel():
            w = apply_outliers(w, self.outlier_idx, self.outlier_val)
        return w

    def _dequantize_native(self, out: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.dtype not in _VAL_DTYPES or not self._native_layout() or (self.scheme == SCHEME_NF4 and self.block_size % 2):
            return None
        lib = kernels.native()
        if lib is None:
            return None
        # the kernel writes float32 or bfloat16 directly; float16 goes through float32
        out_dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
        if out is not None and (out.dtype != out_dtype or out.numel() < self.numel):
            out = None
        w = kernels.dequantize(lib, self.scheme, self.codes, self.absmax, self.numel, self.block_size, out_dtype, out)
        return w.to(self.dtype).view(self.shape)

    def _nf4_cuda(self) -> torch.Tensor | None:
        bnbf = _bnb()
        if bnbf is None:
            return None
        state = bnbf.QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=_nf4_code(bnbf, self.codes.device),
                                blocksize=self.block_size, quant_type="nf4", dtype=self.dtype)
        return bnbf.dequantize_4bit(self.codes.view(-1, 1), state)

    def row_slice(self, r0: int, r1: int) -> "QuantWeight":
        """Rows [r0, r1) as a QuantWeight of their own; r0 must start a block (and a byte for NF4)."""
        cols = self.shape[1]
        f0, f1 = r0 * cols, r1 * cols
        assert f0 % self.block_size == 0 and (self.scheme != SCHEME_NF4 or f0 % 2 == 0), (r0, cols, self.block_size)
        flat_codes = self.codes.reshape(-1)
        codes = flat_codes[f0 // 2: (f1 + 1) // 2] if self.scheme == SCHEME_NF4 else flat_codes[f0:f1]
        idx = val = None
        if self.outlier_idx is not None and self.outlier_idx.numel():
            bounds = torch.tensor([f0, f1], device=self.outlier_idx.device, dtype=self.outlier_idx.dtype)
            lo, hi = (int(i) for i in torch.searchsorted(self.outlier_idx, bounds))
            idx, val = self.outlier_idx[lo:hi] - f0, self.outlier_val[lo:hi]
        return QuantWeight(self.scheme, (r1 - r0, cols), self.block_size, codes,
                           self.absmax[f0 // self.block_size: -(-f1 // self.block_size)], idx, val, self.dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows, cols = self.shape[0], self.shape[-1]
        if len(self.shape) == 2 and (x.numel() <= GEMV_MAX_ROWS * cols or x.numel() <= _cpu_nf4_max_rows(self.scheme, x) * cols):
            y = self._linear_native(x) if x.device.type == "cpu" else self._linear_cuda(x) if x.device.type == "cuda" else None
            if y is not None:
                return y if bias is None else y.add_(bias)
        if len(self.shape) != 2 or rows * cols <= CHUNK_ELEMS:
            return F.linear(x, self.dequantize(), bias)
        # row chunks that start on a block (and byte) boundary: a multiple of `align` rows
        align = self.block_size // math.gcd(cols, self.block_size)
        if self.scheme == SCHEME_NF4 and (cols * align) % 2:
            align *= 2
        step = max(align, CHUNK_ELEMS // cols // align * align)
        out = torch.empty(*x.shape[:-1], rows, dtype=x.dtype, device=x.device)
        scratch = torch.empty(step * cols, dtype=torch.float32 if self.dtype == torch.float16 else self.dtype) \
            if x.device.type == "cpu" else None  # one buffer for every chunk's dequantized rows
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            out[..., r0:r1] = F.linear(x, self.row_slice(r0, r1).dequantize(scratch), None if bias is None else bias[r0:r1])
        return out

    def native_gemv_ok(self) -> bool:
        """Whether the native GEMVs take these tensors as they are (also decode_block.py's check)."""
        if self._gemv is None or self._gemv[0] is not self.codes or self._gemv[1] is not self.absmax:
            cols = self.shape[-1]
            if len(self.shape) != 2 or (self.scheme == SCHEME_NF4 and (cols % 2 or self.block_size % 2)) or not self._native_layout():
                return False
            self._gemv = (self.codes, self.absmax)
        idx, val = self.outlier_idx, self.outlier_val
        return (idx is None or not idx.numel() or (idx.dtype in (torch.int32, torch.int64) and idx.is_contiguous()
                                                    and val.dtype in _VAL_DTYPES and val.is_contiguous() and val.numel() == idx.numel()))

    def _linear_native(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ W.T straight from the codes (CPU, few rows), or None when the kernel cannot take it.
        A decode step calls this ~200 times, so the layout check is remembered for the tensors it
        was made on (a weight whose tensors are replaced is checked again), and bfloat16
        activations go to the kernel as they are (it widens them and rounds its results back
        exactly as .to() would: no conversions or their allocations here)."""
        rows, cols = self.shape
        if not self.native_gemv_ok():
            return None
        idx, val = self.outlier_idx, self.outlier_val
        lib = kernels.native()
        if lib is None:
            return None
        if x.dtype == torch.bfloat16:
            y = kernels.matvec(lib, self.scheme, self.codes, self.absmax, rows, cols, self.block_size,
                               x.reshape(-1, cols).contiguous(), idx, val)
            return y.view(*x.shape[:-1], rows)
        x2 = x.reshape(-1, cols).to(torch.float32).contiguous()
        y = kernels.matvec(lib, self.scheme, self.codes, self.absmax, rows, cols, self.block_size, x2, idx, val)
        return y.to(x.dtype).view(*x.shape[:-1], rows)

    def _linear_cuda(self, x: torch.Tensor) -> torch.Tensor | None:
        """x @ W.T from the codes on CUDA (few rows), or None. NF4, one row: bitsandbytes' fused 4-bit
        GEMV when installed (measured on an H200 inside a CUDA graph: 494-569 GB/s against our Triton
        NF4 GEMV's 234-415, BENCHMARKS.md "GPU"); otherwise, and for int8 (1595 GB/s against the old
        dequantize + F.linear's 115) and 2-8 rows, the Triton GEMV. A rule of the installed packages
        and the weight's layout, never a timing."""
        if self.scheme == SCHEME_NF4:  # one row: bitsandbytes' GEMV read NF4 1.2-2.4x faster than ours on an H200
            y = self._linear_bnb(x)
            if y is not None:
                return y
        return self._linear_triton(x)

    def _linear_bnb(self, x: torch.Tensor) -> torch.Tensor | None:
        """bitsandbytes' fused 4-bit GEMV for one activation row of an NF4 weight on CUDA, or None."""
        if self.scheme != SCHEME_NF4 or x.numel() != x.shape[-1] or self.shape[1] % self.block_size:
            return None
        bnb = _bnb_matmul()
        bnbf = _bnb()
        if bnb is None or bnbf is None:
            return None
        state = bnbf.QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=_nf4_code(bnbf, x.device),
                                blocksize=self.block_size, quant_type="nf4", dtype=x.dtype)
        y = bnb(x, self.codes.view(-1, 1).t(), quant_state=state)
        if self.outlier_idx is not None and self.outlier_idx.numel():
            idx = self.outlier_idx.long()
            contrib = x.reshape(-1)[idx % self.shape[1]] * self.outlier_val.to(x.dtype)
            y.view(-1).index_add_(0, idx // self.shape[1], contrib)
        return y

    def _linear_triton(self, x: torch.Tensor) -> torch.Tensor | None:
        """The Triton GEMV (kernels/triton_gemv.py), or None where it cannot take these tensors. The
        layout check is remembered for the tensors it was made on, as in _linear_native."""
        if x.dtype not in _VAL_DTYPES or x.numel() == 0 or not triton_gemv.usable_on(x.device):
            return None
        tensors = (self.codes, self.absmax, self.outlier_idx, self.outlier_val)
        if self._triton is None or any(a is not b for a, b in zip(self._triton, tensors)):
            if self.codes.device != x.device or not triton_gemv.supported(self.scheme, self.shape, self.block_size, *tensors):
                return None
            self._triton = tensors
        rows, cols = self.shape
        y = triton_gemv.gemv(self.scheme, self.codes, self.absmax, self.shape, self.block_size, x.reshape(-1, cols),
                             self.outlier_idx, self.outlier_val)
        return None if y is None else y.view(*x.shape[:-1], rows)

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
            uniq = uniq.long()  # flat offsets (row * hidden) pass 2^31 in a big table: never int32 ids
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


def concat_rows(parts: list) -> "QuantWeight | None":
    """The QuantWeights `parts` stacked by rows as one weight (a fused q/k/v or gate/up), or None
    where that is not the same weights: every part must end on a block boundary (and a byte, for
    NF4), so the fused matrix has exactly the parts' blocks, codes and scales in order. The native
    GEMV computes each output row alone from its own codes, so every row keeps its bits."""
    if not parts or not all(isinstance(p, QuantWeight) and len(p.shape) == 2 for p in parts):
        return None
    first = parts[0]
    if any((p.scheme, p.block_size, p.dtype, p.shape[1], p.codes.device, p.codes.dtype, p.absmax.dtype)
           != (first.scheme, first.block_size, first.dtype, first.shape[1], first.codes.device, first.codes.dtype, first.absmax.dtype)
           or p.numel % p.block_size or (p.scheme == SCHEME_NF4 and p.numel % 2) for p in parts):
        return None
    tables = [p.outlier_idx is not None and p.outlier_idx.numel() > 0 for p in parts]
    idx = val = None
    if any(tables):
        vals = [p.outlier_val for p, t in zip(parts, tables) if t]
        if len({v.dtype for v in vals}) != 1:
            return None
        offsets, idxs, total = 0, [], sum(p.numel for p in parts)
        wide = torch.int64 if total >= 2**31 or any(p.outlier_idx.dtype == torch.int64 for p, t in zip(parts, tables) if t) else torch.int32
        for p, t in zip(parts, tables):
            if t:
                idxs.append(p.outlier_idx.to(torch.int64) + offsets)
            offsets += p.numel
        idx, val = torch.cat(idxs).to(wide), torch.cat(vals)
    codes = torch.cat([p.codes.reshape(-1) for p in parts])
    if first.scheme == SCHEME_INT8:
        codes = codes.view(-1, first.shape[1])
    return QuantWeight(first.scheme, (sum(p.shape[0] for p in parts), first.shape[1]), first.block_size, codes,
                       torch.cat([p.absmax.reshape(-1) for p in parts]), idx, val, first.dtype)


def split_rows(fused: "QuantWeight", parts: list) -> list:
    """The parts again, their codes and scales now views of `fused` (no second copy); outlier
    tables stay the parts' own."""
    out, f0 = [], 0
    flat_codes, absmax = fused.codes.reshape(-1), fused.absmax
    for p in parts:
        n = p.numel
        c0, c1 = (f0 // 2, (f0 + n) // 2) if p.scheme == SCHEME_NF4 else (f0, f0 + n)
        codes = flat_codes[c0:c1].view(p.codes.shape)
        out.append(QuantWeight(p.scheme, p.shape, p.block_size, codes, absmax[f0 // p.block_size:(f0 + n) // p.block_size].view(p.absmax.shape),
                               p.outlier_idx, p.outlier_val, p.dtype))
        f0 += n
    return out


def _dense_gemv_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One activation row against a plain 2-D bfloat16 CPU weight: the native bf16 GEMV takes it."""
    return (weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and weight.dim() == 2 and x.numel() == weight.shape[1]
            and x.device.type == "cpu" and weight.device.type == "cpu" and weight.is_contiguous()
            and not (x.requires_grad or weight.requires_grad))


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for plain tensors (one bfloat16 row with LAYERPACK_BF16_GEMV=1: the native GEMV,
    which reads the weight about twice as fast as torch's batch-1 F.linear but sums in another
    order, so it is opt-in: bf16 parity with transformers is bit for bit by default; with a bias
    F.linear adds it before rounding, so biased layers keep F.linear); anything else computes itself: a QuantWeight, or the
    converter's calibration recorder (layerpack/quantizer/activation_stats.py), which sees the input
    of every linear."""
    if isinstance(weight, torch.Tensor):
        if bias is None and kernels.dense_gemv() and _dense_gemv_ok(x, weight):
            lib = kernels.native()
            if lib is not None:
                return kernels.bf16_matvec(lib, weight, x.contiguous()).view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight, bias)
    return weight.linear(x, bias)


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


def choose_form(scheme: str, device: torch.device, weight_form: str = "auto") -> tuple[bool, str]:
    """Whether resident quantized units are kept dequantized (True) or in their stored form, and why.

    A rule, never a measurement: the same pack, options, device and installed kernels give the same
    plan - and so the same bits - however busy the machine is (a timing probe used to decide this,
    and flipped under load). `auto`: the stored form wherever a native kernel multiplies from the
    codes (CPU with the compiled kernels, int8 and NF4 on CUDA with triton, NF4 on CUDA with
    bitsandbytes): it moves 4 or 8 bits per weight, so a larger budget is never spent on a copy that
    decodes slower; elsewhere (no compiler, int8 on CUDA without triton, other devices) the
    pure-torch path from the codes is several times slower than a dequantized weight, so memory
    left over goes to dequantized copies. Scoring (eval: long
    prefills) asks for dequantized forms itself (UnitRange.prefer_dequantized)."""
    if scheme not in _CODE_DTYPES:
        return True, "unquantized"
    if weight_form != "auto":
        return weight_form == "dequantized", f"{weight_form} (asked for)"
    if device.type == "cpu":
        if kernels.native() is not None:
            return False, f"stored (native {scheme} kernel, {kernels.isa()})"
        return True, "dequantized where memory allows (no native kernel: the pure-torch path from the codes is slower)"
    if device.type == "cuda" and scheme == SCHEME_NF4 and _bnb_matmul() is not None:
        return False, "stored (bitsandbytes 4-bit GEMV" + (", Triton for 2-8 rows)" if triton_gemv.triton_importable() else ")")
    if device.type == "cuda" and triton_gemv.triton_importable():
        return False, f"stored (Triton {scheme} GEMV)"
    return True, f"dequantized where memory allows (no {device.type} kernel for {scheme} codes)"
