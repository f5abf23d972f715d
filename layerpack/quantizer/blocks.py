"""Block-wise quantization of one chunk of a weight (int8 absmax, NF4): the inverse of
layerpack_runtime.quant, which defines the reconstruction the error figures are measured on.

NF4 reproduces bitsandbytes.functional.quantize_4bit(x, blocksize, quant_type="nf4") bit for bit:
fp32 input, per-block absmax, x * (1/absmax) clamped to [-1, 1], the nearest code (nf4.py), and two
codes per byte, the first in the high nibble. Chunks are disjoint runs of whole blocks, so
stream.py quantizes several at once on parallel.chunk_pool()."""
from __future__ import annotations

import numpy as np
import torch

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import INT8_QMAX, SCHEME_NF4

from . import parallel
from .activation_aware import choose_scales
from .nf4 import NF4_ENCODER, NF4_VALUES, NF4_ZERO_CODE


def block_stats(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: fp32 chunk (whole blocks, or one short tail block). Per-block absmax and x/absmax in [-1, 1]."""
    blocks = x.view(-1, block_size) if x.numel() % block_size == 0 else x.view(1, -1)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)).clamp_(-1, 1).view(-1)
    return absmax, scaled


def quantize_chunk(src: torch.Tensor, s: int, e: int, scheme: str, block_size: int, dtype: torch.dtype,
                   outliers: torch.Tensor | None, codes: torch.Tensor, absmax: torch.Tensor,
                   calibrated=None) -> tuple[float, float]:
    """Quantize src[s:e] into codes/absmax (disjoint slices, so chunks run in parallel).
    outliers: ascending positions in src kept exactly (zeroed here); calibrated: an
    activation_aware.Calibrated (seen from src's first element) whose "scales" method chooses the
    block scales, or None. Returns (squared error of the reconstruction in `dtype`, squared norm
    of the source)."""
    ref = src[s:e].float()
    x = ref
    if outliers is not None and outliers.numel():
        lo, hi = torch.searchsorted(outliers, torch.tensor([s, e]))
        if hi > lo:
            x = ref.clone()
            x[outliers[lo:hi] - s] = 0  # removed before block quantization: shrinks those blocks' absmax
    am, scaled = block_stats(x, block_size)
    if not all_finite(am):
        raise LayerpackError("contains NaN or Inf values; the source checkpoint is corrupt")
    b0 = s // block_size
    if calibrated is not None and "scales" in calibrated.methods:  # convert --calibrate: activation_aware.py (c)
        deq = _search_scales(x, am, scaled, calibrated.block_importance(s, e, block_size), s, scheme, block_size,
                             codes, absmax)
    elif scheme == SCHEME_NF4:
        absmax[b0: b0 + am.numel()] = am
        q = NF4_ENCODER.codes(scaled.numpy())
        _store_nf4(q, codes, s)
        deq = per_block(torch.from_numpy(np.take(NF4_VALUES, q)), am, block_size)
    else:
        absmax[b0: b0 + am.numel()] = am
        q = torch.round(scaled * INT8_QMAX).to(torch.int8)
        codes[s:e] = q
        deq = per_block(q.float(), am / INT8_QMAX, block_size)
    # Outlier positions reconstruct to 0 here and to their exact value in the runtime: zero error,
    # which comparing with x (outliers zeroed) rather than ref accounts for.
    # fp32 norms per chunk (fast); the sum across chunks is a Python float.
    err = torch.linalg.vector_norm(deq.to(dtype).float() - x).item()
    return err * err, torch.linalg.vector_norm(ref).item() ** 2


def _search_scales(x: torch.Tensor, am: torch.Tensor, scaled: torch.Tensor, wts: torch.Tensor, s: int, scheme: str,
                   block_size: int, codes: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """The calibrated scale search (activation_aware.choose_scales) of the chunk at s, its codes
    and scales stored; returns the reconstruction. Every block is searched on its own, so the
    chunk's blocks go in tiles of parallel.SEARCH_TILE blocks (their temporaries stay in cache) to
    two threads at once (parallel.run_pieces: a weight of SmolLM2's size is a single chunk, which
    left one core idle during the search, most of --calibrate's cost): the same bits as one run on
    one thread (tests/convert/test_calibrate.py)."""
    blocks = scaled.view(am.numel(), -1)
    xb = x.view(blocks.shape)
    bs = blocks.shape[1]
    deq = torch.empty_like(x)
    b0 = s // block_size

    def run(r0: int, r1: int) -> None:
        sc, q, vals = choose_scales(xb[r0:r1], am[r0:r1], blocks[r0:r1], wts[r0:r1], scheme)
        absmax[b0 + r0: b0 + r1] = sc
        p0, p1 = r0 * bs, r1 * bs
        if scheme == SCHEME_NF4:
            _store_nf4(q, codes, s + p0)  # p0 is even (an even block size), so whole bytes
            deq[p0:p1] = per_block(vals.reshape(-1), sc, block_size)
        else:
            codes[s + p0: s + p1] = q.reshape(-1).to(torch.int8)
            deq[p0:p1] = per_block(q.reshape(-1).float(), sc / INT8_QMAX, block_size)

    parallel.run_pieces(run, am.numel())
    return deq


def _store_nf4(q: np.ndarray, codes: torch.Tensor, s: int) -> None:
    """NF4 code indices of positions s.. -> two per byte, the first in the high nibble."""
    if q.size % 2:  # odd count: bitsandbytes pads the scaled values with 0.0, i.e. the code of 0
        q = np.append(q, NF4_ZERO_CODE)
    codes[s // 2: s // 2 + q.size // 2] = torch.from_numpy((q[0::2] << 4) | q[1::2])


def per_block(values: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """values [n] * their block's scale (whole blocks, or one short tail block)."""
    if values.numel() % block_size == 0:
        return (values.view(-1, block_size) * scale.view(-1, 1)).view(-1)
    return values * scale


def rel_rms(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """||approx - ref|| / ||ref|| in fp32 (0 for an all-zero ref)."""
    ref32 = ref.float()
    denom = torch.linalg.vector_norm(ref32).item()
    return torch.linalg.vector_norm(approx.float() - ref32).item() / denom if denom > 0 else 0.0


def all_finite(t: torch.Tensor) -> bool:
    """NaN/Inf check without isfinite()'s full-size temporaries: NaN and +-Inf propagate into min/max."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.reshape(-1))
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
