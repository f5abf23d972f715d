"""Block-wise quantization (int8 absmax, NF4) with outlier tables: the inverse of
layerpack_runtime.quant, which the error figures are computed through.

NF4 reproduces bitsandbytes.functional.quantize_4bit(x, blocksize, quant_type="nf4") bit for bit:
fp32 input, per-block absmax, x * (1/absmax) clamped to [-1, 1], nearest code by the midpoints
of the sorted code book (torch.bucketize), two codes per byte with the first in the high nibble.
Work is done in chunks of whole blocks so memory stays a small multiple of the chunk, not the tensor.
"""
from __future__ import annotations

import math

import torch

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import (
    INT8_QMAX,
    SCHEME_INT8,
    SCHEME_NF4,
    SCHEME_NONE,
    SUFFIX_ABSMAX,
    SUFFIX_CODES,
    SUFFIX_OUTLIER_IDX,
    SUFFIX_OUTLIER_VAL,
)
from layerpack_runtime.manifest import TensorEntry
from layerpack_runtime.quant import apply_outliers, dequantize_int8, dequantize_nf4, nf4_code

CHUNK_BLOCKS = 1 << 16  # blocks per chunk: 4M elements at block 64, ~16 MB of fp32 work buffers

_NF4_BOUNDS = None


def _nf4_bounds() -> torch.Tensor:
    global _NF4_BOUNDS
    if _NF4_BOUNDS is None:
        code = nf4_code("cpu")
        _NF4_BOUNDS = (code[:-1] + code[1:]) / 2  # same fp32 arithmetic as bitsandbytes
    return _NF4_BOUNDS


def _absmax_and_scaled(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 [m] (m a multiple of block_size, or the final short tail). Returns absmax [blocks]
    and x / absmax clamped to [-1, 1], as bitsandbytes computes them."""
    blocks = x.view(-1, block_size) if x.numel() % block_size == 0 else x.view(1, -1)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1), -1, 1).view(-1)
    return absmax, scaled


def _select_outliers(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (ascending) of the k largest |w|; ties at the threshold go to the lowest
    index so the choice is deterministic whatever the thread count."""
    mag = flat.abs()
    kth = torch.topk(mag.float(), k, sorted=False).values.min().to(mag.dtype)
    above = torch.nonzero(mag > kth).view(-1)
    equal = torch.nonzero(mag == kth).view(-1)[: k - above.numel()]
    return torch.sort(torch.cat([above, equal])).values


def quantize_tensor(name: str, w: torch.Tensor, scheme: str, dtype: torch.dtype, block_size: int | None,
                    outlier_fraction: float = 0.0) -> tuple[dict[str, torch.Tensor], TensorEntry]:
    """Quantize one logical tensor of the source. Returns the tensors to store and its manifest entry
    (with the relative RMS error of what the runtime will reconstruct, against the source values)."""
    shape = list(w.shape)
    if not w.is_floating_point():
        raise LayerpackError(f"tensor {name} has dtype {w.dtype}; only floating-point weights can be converted")
    if scheme == SCHEME_NONE:
        out = w.to(dtype).contiguous()
        if not bool(torch.isfinite(out).all()):
            raise LayerpackError(f"tensor {name} contains NaN or Inf values; the source checkpoint is corrupt")
        err = _rel_rms(w.reshape(-1), out.reshape(-1)) if out.dtype != w.dtype else 0.0
        return {name: out}, TensorEntry(name, shape, scheme, None, 0, err)

    flat = w.reshape(-1)
    n = flat.numel()
    k = int(round(outlier_fraction * n)) if outlier_fraction else 0
    stored: dict[str, torch.Tensor] = {}
    if k:
        idx = _select_outliers(flat, k)
        stored[name + SUFFIX_OUTLIER_IDX] = idx.to(torch.int32 if n < 2**31 else torch.int64)
        stored[name + SUFFIX_OUTLIER_VAL] = flat[idx].to(dtype)
        flat = flat.clone()
        flat[idx] = 0  # removed before block quantization: shrinks those blocks' absmax

    nblocks = -(-n // block_size)
    absmax = torch.empty(nblocks, dtype=torch.float32)
    if scheme == SCHEME_NF4:
        codes = torch.empty((n + 1) // 2, dtype=torch.uint8)
    elif scheme == SCHEME_INT8:
        codes = torch.empty(n, dtype=torch.int8)
    else:
        raise LayerpackError(f"unknown quantization scheme {scheme!r}")

    sq_err = sq_ref = 0.0
    step = CHUNK_BLOCKS * block_size
    full = n - n % block_size
    # Whole-block chunks, then the short tail block (if any) on its own.
    bounds = [(s, min(s + step, full)) for s in range(0, full, step)] + ([(full, n)] if full < n else [])
    for s, e in bounds:
        x = flat[s:e].float()
        am, scaled = _absmax_and_scaled(x, block_size)
        b0 = s // block_size
        absmax[b0: b0 + am.numel()] = am
        if scheme == SCHEME_NF4:
            q = torch.bucketize(scaled, _nf4_bounds(), out_int32=True).to(torch.uint8)
            if q.numel() % 2:
                q = torch.nn.functional.pad(q, (0, 1))
            codes[s // 2: s // 2 + q.numel() // 2] = (q[0::2] << 4) | q[1::2]
            deq = dequantize_nf4(codes[s // 2: s // 2 + q.numel() // 2], am, (e - s,), e - s if e == n and e - s < block_size else block_size, dtype)
        else:
            q = torch.round(scaled * INT8_QMAX).to(torch.int8)
            codes[s:e] = q
            deq = dequantize_int8(q, am, (e - s,), e - s if e == n and e - s < block_size else block_size, dtype)
        if not bool(torch.isfinite(am).all()):
            raise LayerpackError(f"tensor {name} contains NaN or Inf values; the source checkpoint is corrupt")
        # Error of what the runtime reconstructs (outliers are exact, so zero error there once restored).
        ref = w.reshape(-1)[s:e].float()
        sq_err += torch.linalg.vector_norm(deq.float() - x).item() ** 2
        sq_ref += torch.linalg.vector_norm(ref).item() ** 2
    stored[name + SUFFIX_CODES] = codes
    stored[name + SUFFIX_ABSMAX] = absmax
    # Restored outlier positions: the quantized value there is exactly 0 (x was 0), so the error
    # counted above at those positions is 0 as well - matching the runtime's exact restore.
    rel = math.sqrt(sq_err / sq_ref) if sq_ref > 0 else 0.0
    return stored, TensorEntry(name, shape, scheme, block_size, k, rel)


def _rel_rms(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref64 = ref.double()
    denom = ref64.square().sum().item()
    return math.sqrt((approx.double() - ref64).square().sum().item() / denom) if denom > 0 else 0.0
