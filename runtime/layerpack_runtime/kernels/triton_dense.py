"""Decode-sized GEMV for plain 16-bit weights on the GPU, in Triton: y[M, N] = x[M, K] @ W[N, K]^T
for a few activation rows (M <= DENSE_MAX_ROWS).

Why: at batch 1 a linear layer is one pass over its weights, and torch's F.linear (cuBLAS) read an
8B-shaped layer at ~2.0 TB/s on an H200 whose copies move 4.2 TB/s (bench_kernels.py --device cuda),
so a resident bf16 decode step ran at ~42% of the memory's speed. This kernel streams the weight
with wide loads from enough programs to keep the memory busy: each program owns BLOCK_N rows and a
slice of K (split-K when there are too few row blocks to fill the GPU); each split writes float32
partial sums that one torch sum adds in a fixed order. No atomics, no autotuning: tile shapes are a
rule of the shape and the SM count, so the same inputs on the same GPU give the same bits (not
F.linear's bits: another summation order, float32 accumulation either way).

CUDA-graph safe: no host syncs, allocations only of the output (and the partials). triton is
imported when the first GEMV runs (the runtime does not depend on it); TRITON_INTERPRET=1 runs the
same kernel on CPU tensors (the CPU tests).
"""
from __future__ import annotations

import functools
import warnings

import torch

DENSE_MAX_ROWS = 8
BLOCK_N = 16          # output rows per program
BLOCK_K = 512         # K elements per step: 16 rows x 512 bf16 = 16 KiB in flight per program
PROGRAMS_PER_SM = 4   # split K until there are about this many programs per SM
_DTYPES = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def _importable() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return False


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether y = x @ w.T goes through this kernel: a 16-bit 2-D weight and a few rows of the same
    dtype on CUDA, triton importable."""
    if w.device.type != "cuda":  # the CPU tests call gemv() under TRITON_INTERPRET=1 directly
        return False
    return (w.dim() == 2 and w.dtype in _DTYPES and x.dtype == w.dtype and x.device == w.device
            and w.is_contiguous() and x.shape[-1] == w.shape[1] and 0 < x.numel() // x.shape[-1] <= DENSE_MAX_ROWS
            and _importable())


@functools.lru_cache(maxsize=None)
def _sm_count(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
    return 4  # the interpreter: a few splits, so the CPU tests cover the split path


def splits_for(n: int, k: int, device: str) -> int:
    """K slices per row block: enough programs for PROGRAMS_PER_SM per SM, each slice whole BLOCK_Ks."""
    row_blocks = -(-n // BLOCK_N)
    k_steps = -(-k // BLOCK_K)
    want = -(-PROGRAMS_PER_SM * _sm_count(device) // row_blocks)
    return max(1, min(want, k_steps))


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x_ptr, w_ptr, out_ptr, M, N, K, steps_per_split, stride_xm, stride_wn, stride_os, stride_om,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n, pid_s, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        k0 = pid_s * steps_per_split * BLOCK_K
        for step in range(steps_per_split):
            cols = k0 + step * BLOCK_K + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            xv = tl.load(x_ptr + m * stride_xm + cols, mask=col_ok, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += wv * xv[None, :]
        total = tl.sum(acc, axis=1)
        tl.store(out_ptr + pid_s * stride_os + m * stride_om + rows, total, mask=row_ok)

    return gemv


# (dtype, device) whose kernel failed to build or launch: it falls back to F.linear from then on,
# always the same way (a build failure is no accident), with one warning.
_FAILED: dict = {}


def gemv_or_none(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """gemv(), or None where this kernel cannot run here (the caller uses F.linear)."""
    key = (w.dtype, str(w.device))
    if key in _FAILED:
        return None
    try:
        return gemv(x, w)
    except Exception as e:  # noqa: BLE001 - e.g. a triton/CUDA combination that cannot compile it
        _FAILED[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        warnings.warn(f"layerpack: the Triton dense GEMV failed on {key[1]} ({_FAILED[key]}); using F.linear", stacklevel=2)
        return None


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w[N, K]^T in x's dtype (see usable())."""
    K, N = w.shape[1], w.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    dev = str(w.device)
    splits = splits_for(N, K, dev)
    steps = -(-K // BLOCK_K)
    per_split = -(-steps // splits)
    splits = -(-steps // per_split)  # no empty slice
    part = torch.empty(splits, M, N, dtype=torch.float32, device=w.device)
    _kernel()[(-(-N // BLOCK_N), splits, M)](x2, w, part, M, N, K, per_split, x2.stride(0), w.stride(0),
                                              part.stride(0), part.stride(1), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                                              num_warps=4)
    y = part[0] if splits == 1 else part.sum(0)
    return y.to(x.dtype).view(*x.shape[:-1], N)
