"""The Triton kernels behind triton_gemv.py (this module imports triton; only triton_gemv imports it,
and only when a GEMV runs, so the runtime imports and runs without triton).

y[M, N] = x[M, K] @ W[N, K]^T for a few activation rows (M <= 8), W in the pack's stored form. Each
program owns BLOCK_N output rows and walks K in tiles; products are accumulated elementwise in a
[BLOCK_M, BLOCK_N, BLOCK_K] float32 tile and reduced once at the end by a fixed tree of adjacent
pairs (_pairwise_sum: not tl.sum, whose order follows how triton spreads the tile over threads,
which changes with BLOCK_M and num_warps). No split-K, no atomics: every output is summed by one
program in an order set by BLOCK_N and BLOCK_K alone, which the caller keeps independent of M, so
a row's result has the same bits at batch 1 and batch 8, run after run.

Weight values are those of the float32 dequantization (quant.py): NF4 `table[code] * absmax`,
int8 `code * absmax`, the sum divided by 127 once per output instead of every weight (the format's
`code * (absmax / 127)`; the two differ by float32 rounding, ~1e-7 relative). Outliers (their
codes dequantize to exactly 0) are added afterwards as `val * x[:, col]`, found by binary search in
the sorted flat-index table: the rows of a program own a contiguous slice of it.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _lower_bound(idx_ptr, nnz, target, steps):
    """First position in the sorted table idx[0:nnz] whose value is >= target (int64 scalars)."""
    lo = target * 0
    hi = lo + nnz
    for _ in range(steps):
        mid = (lo + hi) // 2
        inside = mid < hi
        v = tl.load(idx_ptr + mid, mask=inside, other=0).to(tl.int64)
        right = inside & (v < target)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right | (mid >= hi), hi, mid)
    return lo


@triton.jit
def _pairwise_sum(t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOG2_L: tl.constexpr):
    """t [BLOCK_M, BLOCK_N, 2**LOG2_L] summed over its last axis as a fixed tree: (0+1), (2+3), ...,
    then the same on the halves; elementwise adds, so the bits do not depend on the layout."""
    for i in tl.static_range(LOG2_L):
        a, b = tl.split(tl.reshape(t, (BLOCK_M, BLOCK_N, 1 << (LOG2_L - i - 1), 2)))
        t = a + b
    return tl.reshape(t, (BLOCK_M, BLOCK_N))


@triton.jit
def _add_outliers(acc, n0, N, K, x_ptr, stride_xm, M, idx_ptr, val_ptr, nnz, steps,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LOG2_OUT: tl.constexpr):
    """acc[m, r] += val * x[m, col] for the outliers of rows n0..n0+BLOCK_N (flat index row * K + col)."""
    offs_m = tl.arange(0, BLOCK_M)
    first = n0.to(tl.int64) * K
    last = tl.minimum(n0 + BLOCK_N, N).to(tl.int64) * K
    lo = _lower_bound(idx_ptr, nnz, first, steps)
    hi = _lower_bound(idx_ptr, nnz, last, steps)
    OUT_BLOCK: tl.constexpr = 1 << LOG2_OUT
    n_chunks = ((hi - lo + OUT_BLOCK - 1) // OUT_BLOCK).to(tl.int32)  # a 32-bit loop bound, like the others
    for c in range(n_chunks):
        j = lo + c * OUT_BLOCK + tl.arange(0, OUT_BLOCK)
        inside = j < hi
        flat = tl.load(idx_ptr + j, mask=inside, other=0).to(tl.int64)
        val = tl.load(val_ptr + j, mask=inside, other=0).to(tl.float32)
        row = (flat // K - n0).to(tl.int32)
        col = flat % K
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :],
                     mask=(offs_m[:, None] < M) & inside[None, :], other=0).to(tl.float32)
        contrib = xv * val[None, :]                                         # [BLOCK_M, OUT_BLOCK]
        hit = row[None, :] == tl.arange(0, BLOCK_N)[:, None]                # [BLOCK_N, OUT_BLOCK]
        acc += _pairwise_sum(tl.where(hit[None, :, :], contrib[:, None, :], 0.0), BLOCK_M, BLOCK_N, LOG2_OUT)
    return acc


@triton.jit
def _store(y_ptr, out, offs_m, offs_n, stride_ym, mask):
    """y in its dtype, rounded to nearest-even as torch's .to() rounds (explicit: triton's default
    cast to bfloat16 truncates in its interpreter)."""
    if y_ptr.dtype.element_ty != tl.float32:
        out = out.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], out, mask=mask)


@triton.jit
def int8_gemv_kernel(x_ptr, codes_ptr, absmax_ptr, y_ptr, idx_ptr, val_ptr,
                     M, N, K, stride_xm, stride_ym, nnz, steps,
                     BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     LOG2_K: tl.constexpr, LOG2_OUT: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
                     ALIGNED: tl.constexpr):
    """ALIGNED: K is a multiple of BLOCK_SIZE and BLOCK_K == BLOCK_SIZE, so each row of a K tile is
    one absmax block: one scale per row per tile instead of a gather per weight."""
    BLOCK_K: tl.constexpr = 1 << LOG2_K
    n0 = tl.program_id(0) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    row_flat = offs_n.to(tl.int64) * K                 # flat index of each row's first weight
    row_block = row_flat // BLOCK_SIZE                 # its absmax block and position in it: the
    row_phase = (row_flat % BLOCK_SIZE).to(tl.int32)   # per-element block index stays 32-bit math
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        wmask = mask_n[:, None] & mask_k[None, :]
        codes = tl.load(codes_ptr + row_flat[:, None] + k[None, :], mask=wmask, other=0).to(tl.float32)
        if ALIGNED:
            w = codes * tl.load(absmax_ptr + row_block + k0 // BLOCK_SIZE, mask=mask_n, other=0.0)[:, None]
        else:
            blk = row_block[:, None] + (row_phase[:, None] + k[None, :]) // BLOCK_SIZE
            w = codes * tl.load(absmax_ptr + blk, mask=wmask, other=0.0)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                     other=0.0).to(tl.float32)
        acc += w[None, :, :] * xv[:, None, :]
    out = _pairwise_sum(acc, BLOCK_M, BLOCK_N, LOG2_K) / 127.0   # the format's INT8_QMAX, once per output
    if HAS_OUTLIERS:
        out = _add_outliers(out, n0, N, K, x_ptr, stride_xm, M, idx_ptr, val_ptr, nnz, steps,
                            BLOCK_M, BLOCK_N, LOG2_OUT)
    _store(y_ptr, out, offs_m, offs_n, stride_ym, mask_m[:, None] & mask_n[None, :])


@triton.jit
def nf4_gemv_kernel(x_ptr, codes_ptr, absmax_ptr, pairs_ptr, y_ptr, idx_ptr, val_ptr,
                    M, N, K, stride_xm, stride_ym, nnz, steps,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    LOG2_KB: tl.constexpr, LOG2_OUT: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
                    ALIGNED: tl.constexpr):
    """K and BLOCK_SIZE even (the caller checks): every row starts on a byte, and the two codes of a
    byte (element 2j in the high nibble, 2j+1 in the low one, as bitsandbytes packs) share a block.
    pairs_ptr: 256 int64 entries, each the two float32 NF4 values of one byte value (high nibble's
    in the low 32 bits), so one gather decodes two weights. ALIGNED: K is a multiple of BLOCK_SIZE
    and 2 * BLOCK_KB == BLOCK_SIZE (one scale per row per tile). x is loaded as contiguous pairs
    and split into its even and odd columns (wide loads, not two strided ones)."""
    BLOCK_KB: tl.constexpr = 1 << LOG2_KB
    n0 = tl.program_id(0) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_KB)
    offs_c = tl.arange(0, 2 * BLOCK_KB)
    mask_m = offs_m < M
    mask_n = offs_n < N
    KB = K // 2
    row_flat = offs_n.to(tl.int64) * K
    row_byte = row_flat // 2
    row_block = row_flat // BLOCK_SIZE
    row_phase = (row_flat % BLOCK_SIZE).to(tl.int32)
    acc_hi = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KB), dtype=tl.float32)   # even columns
    acc_lo = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KB), dtype=tl.float32)   # odd columns
    for j0 in range(0, KB, BLOCK_KB):
        j = j0 + offs_j
        mask_j = j < KB
        wmask = mask_n[:, None] & mask_j[None, :]
        byte = tl.load(codes_ptr + row_byte[:, None] + j[None, :], mask=wmask, other=0)
        pair = tl.load(pairs_ptr + byte.to(tl.int32))
        v_hi = pair.to(tl.int32).to(tl.float32, bitcast=True)
        v_lo = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        if ALIGNED:
            scale = tl.load(absmax_ptr + row_block + (2 * j0) // BLOCK_SIZE, mask=mask_n, other=0.0)[:, None]
        else:
            blk = row_block[:, None] + (row_phase[:, None] + 2 * j[None, :]) // BLOCK_SIZE
            scale = tl.load(absmax_ptr + blk, mask=wmask, other=0.0)
        cols = 2 * j0 + offs_c
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=mask_m[:, None] & (cols < K)[None, :],
                     other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(xv, (BLOCK_M, BLOCK_KB, 2)))
        acc_hi += (v_hi * scale)[None, :, :] * x_even[:, None, :]
        acc_lo += (v_lo * scale)[None, :, :] * x_odd[:, None, :]
    out = _pairwise_sum(acc_hi + acc_lo, BLOCK_M, BLOCK_N, LOG2_KB)
    if HAS_OUTLIERS:
        out = _add_outliers(out, n0, N, K, x_ptr, stride_xm, M, idx_ptr, val_ptr, nnz, steps,
                            BLOCK_M, BLOCK_N, LOG2_OUT)
    _store(y_ptr, out, offs_m, offs_n, stride_ym, mask_m[:, None] & mask_n[None, :])
