"""Decode-sized GEMV on the GPU straight from the pack's int8 and NF4 codes, written in Triton.

y[M, N] = x[M, K] @ W[N, K]^T for M in 1..GEMV_MAX_ROWS activation rows (x float32, bfloat16 or
float16; float32 accumulation; y in x's dtype), reading each stored byte once: at batch 1 a
linear layer is a pass over its weights, so the speed limit is memory bandwidth, and the stored
form moves 2x (int8) or ~4x (NF4) fewer bytes than bf16. The kernels are in
triton_gemv_kernels.py; triton is imported only when a GEMV runs (the runtime depends on torch,
not triton: without it QuantWeight keeps its other paths).

The launch is CUDA-graph safe: no host syncs (nothing is read back; the outlier rows of each
program are found by a binary search on the device), and no allocation but the output. The first
call for a device builds the 256-entry NF4 byte table there (a host-to-device copy) and the first
call for each (scheme, block shapes) compiles the kernel: run the step once before capturing it.

Tile shapes are a rule of the shapes and the device's SM count, never a timing (no autotuning), so
the same inputs on the same GPU give the same bits. Results are not bit-identical to dequantize +
F.linear (another summation order); tests/test_triton_gemv.py states the tolerance.
"""
from __future__ import annotations

import functools
import os
import sys

import torch

from ..format import NF4_CODE

LOG2_OUT = 5            # 32 outliers handled per step of a program
ACC_PER_ROW = 2048      # float32 accumulator elements per program and activation row
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401  (optional: only for the GPU kernels)

        return True
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return False


def interpreting() -> bool:
    """TRITON_INTERPRET=1: triton runs the kernels with numpy on CPU tensors (the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def usable_on(device: torch.device) -> bool:
    """Whether these kernels run on tensors of `device`: CUDA with triton, or CPU under the interpreter."""
    if not triton_importable():
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _kernels():
    from . import triton_gemv_kernels  # imports triton: deferred to the first GEMV

    return triton_gemv_kernels


_PAIRS: dict[torch.device, torch.Tensor] = {}
# Kernel variants (scheme, tile, flags, dtype, device) launched once already, and those whose first
# launch (when triton compiles them) failed: a variant that cannot be built on this GPU, triton and
# CUDA falls back to the other paths (always the same way: a build failure is no accident), said once.
_LAUNCHED: set = set()
_FAILED: dict = {}


def nf4_pairs(device: torch.device) -> torch.Tensor:
    """[256] int64: byte b -> the float32 bits of NF4[b >> 4] (low 32 bits) and NF4[b & 15] (high 32)."""
    if device not in _PAIRS:
        code = torch.tensor(NF4_CODE, dtype=torch.float32)
        pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], 1).contiguous()
        if pairs.view(torch.int64)[1].item() & 0xFFFFFFFF != pairs[1, 0].view(torch.int32).item() & 0xFFFFFFFF:
            raise RuntimeError("the NF4 pair table assumes a little-endian host")
        _PAIRS[device] = pairs.view(torch.int64).view(-1).to(device)
    return _PAIRS[device]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int | None) -> int:
    if device_index is None:
        return 1  # the interpreter: one "SM", tile shapes from the acccumulator budget alone
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def aligned(scheme: str, k: int, block_size: int) -> bool:
    """Whether the kernel's K tile is one absmax block (one scale per row per tile, no gather per
    weight): K a multiple of a power-of-two block of 32..512 weights (the converter's 64 and 128
    on real models' widths)."""
    return k % block_size == 0 and 32 <= block_size <= 512 and block_size & (block_size - 1) == 0


@functools.lru_cache(maxsize=None)
def tile_shape(scheme: str, m: int, n: int, k: int, sms: int, block_size: int = 0) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) - BLOCK_K counted in stored bytes for NF4 (two weights each).

    A rule, not a measurement. BLOCK_N and BLOCK_K - which set the order of every output's sum -
    do not depend on M, so a row gets the same bits alone and in a batch: the K tile is one absmax
    block where aligned(), else up to 512 bytes per row (wide code loads); BLOCK_N x BLOCK_K float32
    accumulators per activation row (twice for NF4's two nibbles) fill ACC_PER_ROW, and BLOCK_N
    shrinks while there are fewer than 4 programs per SM, so a short matrix (k/v projections) still
    occupies the whole GPU. More rows get more warps (the same registers a thread)."""
    block_m = _pow2_at_least(m)
    if scheme == "nf4":
        block_k = block_size // 2 if aligned(scheme, k, block_size) else min(256, _pow2_at_least(max(1, k // 2)))
        block_n = max(1, ACC_PER_ROW // 2 // block_k)
    else:
        block_k = block_size if aligned(scheme, k, block_size) else min(512, _pow2_at_least(k))
        block_n = max(1, ACC_PER_ROW // block_k)
    block_n = min(block_n, _pow2_at_least(n))
    while block_n > 1 and -(-n // block_n) < 4 * sms:
        block_n //= 2
    return block_m, block_n, block_k, 4 if block_m <= 2 else 8


def supported(scheme: str, shape, block_size: int, codes: torch.Tensor, absmax: torch.Tensor,
              outlier_idx: torch.Tensor | None, outlier_val: torch.Tensor | None) -> bool:
    """Whether gemv() takes this weight as it is: 2-D, the format's dtypes, contiguous tensors of the
    exact element counts (never read past a tensor), for NF4 even K and block size; outliers as
    int32/int64 flat indices with float values of the same count, on the codes' device."""
    if len(shape) != 2 or block_size <= 0:
        return False
    rows, cols = shape
    n = rows * cols
    if scheme == "nf4":
        if cols % 2 or block_size % 2 or codes.dtype != torch.uint8 or codes.numel() != n // 2:
            return False
    elif scheme == "int8":
        if codes.dtype != torch.int8 or codes.numel() != n:
            return False
    else:
        return False
    if not (codes.is_contiguous() and absmax.dtype == torch.float32 and absmax.is_contiguous()
            and absmax.numel() == -(-n // block_size) and absmax.device == codes.device):
        return False
    if outlier_idx is not None and outlier_idx.numel():
        return (outlier_idx.dtype in (torch.int32, torch.int64) and outlier_idx.is_contiguous()
                and outlier_val is not None and outlier_val.dtype in _X_DTYPES and outlier_val.is_contiguous()
                and outlier_val.numel() == outlier_idx.numel() and outlier_idx.device == codes.device
                and outlier_val.device == codes.device)
    return True


def gemv(scheme: str, codes: torch.Tensor, absmax: torch.Tensor, shape, block_size: int, x: torch.Tensor,
         outlier_idx: torch.Tensor | None = None, outlier_val: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [M, K] (M <= 8; float32/bfloat16/float16) @ W.T -> [M, N] in x's dtype, or None where this
    kernel variant failed to build here (the caller falls back). The caller checks supported();
    outlier_idx must be sorted (the format stores it so)."""
    rows, cols = shape
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != cols or x.dtype not in _X_DTYPES or m < 1:
        raise ValueError(f"gemv: x must be [M, {cols}] float32/bfloat16/float16, got {tuple(x.shape)} {x.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    lib = _kernels()
    device_index = x.device.index if x.device.type == "cuda" else None
    if x.device.type == "cuda" and device_index is None:
        device_index = torch.cuda.current_device()
    block_m, block_n, block_k, num_warps = tile_shape(scheme, m, rows, cols, _sm_count(device_index), block_size)
    y = torch.empty(m, rows, dtype=x.dtype, device=x.device)
    nnz = 0 if outlier_idx is None else outlier_idx.numel()
    idx, val = (outlier_idx, outlier_val) if nnz else (absmax, absmax)  # never read without outliers
    grid = (-(-rows // block_n),)
    common = dict(BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, LOG2_OUT=LOG2_OUT,
                  HAS_OUTLIERS=bool(nnz), ALIGNED=aligned(scheme, cols, block_size), num_warps=num_warps)
    log2_k = block_k.bit_length() - 1
    variant = (scheme, block_k, x.dtype, idx.dtype if nnz else None, val.dtype if nnz else None, x.device,
               tuple(sorted(common.items())))
    if variant in _FAILED:
        return None
    try:
        if scheme == "nf4":
            lib.nf4_gemv_kernel[grid](x, codes, absmax, nf4_pairs(x.device), y, idx, val, m, rows, cols,
                                      x.stride(0), y.stride(0), nnz, max(1, nnz.bit_length()), LOG2_KB=log2_k, **common)
        else:
            lib.int8_gemv_kernel[grid](x, codes, absmax, y, idx, val, m, rows, cols,
                                       x.stride(0), y.stride(0), nnz, max(1, nnz.bit_length()), LOG2_K=log2_k, **common)
    except Exception as e:  # noqa: BLE001 - only a first launch (the build) is forgiven
        if variant in _LAUNCHED:
            raise
        _FAILED[variant] = e
        print(f"warning: the Triton {scheme} GEMV could not be built here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              "using the slower paths for it", file=sys.stderr)
        return None
    _LAUNCHED.add(variant)
    return y
