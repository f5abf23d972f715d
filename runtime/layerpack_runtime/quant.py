"""Dequantization of pack weights (pure torch; the math the format defines).

Block-wise schemes work on the flattened (row-major) weight split into blocks of `block_size`
elements; the last block may be shorter. The converter's quantizer (layerpack.quantizer) is the
inverse of exactly these functions, and reports its error through them.
"""
from __future__ import annotations

import math

import torch

from .format import (
    INT8_QMAX,
    NF4_CODE,
    SCHEME_INT8,
    SCHEME_NF4,
    SCHEME_NONE,
    SUFFIX_ABSMAX,
    SUFFIX_CODES,
    SUFFIX_OUTLIER_IDX,
    SUFFIX_OUTLIER_VAL,
)
from .errors import FormatError

_NF4_CACHE: dict[torch.device, torch.Tensor] = {}


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    device = torch.device(device)
    if device not in _NF4_CACHE:
        _NF4_CACHE[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return _NF4_CACHE[device]


def _scale_blocks(values: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """values: float32 [n]; scale: float32 [ceil(n/block)]. Multiplies each block by its scale."""
    n = values.numel()
    full = n - n % block_size
    out = torch.empty_like(values)
    if full:
        torch.mul(values[:full].view(-1, block_size), scale[: full // block_size].view(-1, 1), out=out[:full].view(-1, block_size))
    if full < n:
        torch.mul(values[full:], scale[-1], out=out[full:])
    return out


def nf4_unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Packed bytes -> n codes (int64). First element of each pair is the high nibble, as bitsandbytes packs."""
    packed = packed.reshape(-1)
    codes = torch.empty(packed.numel() * 2, dtype=torch.uint8, device=packed.device)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0x0F
    return codes[:n].long()


_PAIRS: dict[torch.device, torch.Tensor] = {}


def _nf4_pairs(device: torch.device) -> torch.Tensor:
    """[256, 2] float32: the (high nibble, low nibble) NF4 values of every byte value."""
    if device not in _PAIRS:
        code = torch.tensor(NF4_CODE, dtype=torch.float32)
        _PAIRS[device] = torch.stack([code.repeat_interleave(16), code.repeat(16)], 1).contiguous().to(device)
    return _PAIRS[device]


# Elements per step of the pure-torch dequantization. Its float32 (and index) temporaries are several
# times the output, so a whole 405B head (2.1B entries) at once would need ~20 GB of them; in steps of
# whole blocks they stay ~200 MB whatever the tensor. Elementwise math: the steps change no bit.
DEQUANT_CHUNK = 1 << 24


def _in_steps(part, codes: torch.Tensor, absmax: torch.Tensor, shape, block_size: int, dtype, per_byte: int) -> torch.Tensor:
    """part(codes, absmax, n) over steps of whole blocks (and whole bytes, per_byte codes in one)."""
    n = math.prod(shape)
    step = max(1, DEQUANT_CHUNK // block_size) * block_size
    step += step % per_byte * block_size  # an even number of elements when two codes share a byte
    if n <= step:
        return part(codes.reshape(-1), absmax.reshape(-1), n).to(dtype).reshape(shape)
    flat, scales = codes.reshape(-1), absmax.reshape(-1)
    out = torch.empty(n, dtype=dtype, device=codes.device)
    for s in range(0, n, step):  # Python ints: offsets past 2^31 are plain numbers
        e = min(n, s + step)
        out[s:e] = part(flat[s // per_byte: -(-e // per_byte)], scales[s // block_size: -(-e // block_size)], e - s)
    return out.view(shape)


def dequantize_nf4(packed, absmax, shape, block_size, dtype) -> torch.Tensor:
    """NF4_CODE[code] * absmax of its block, in float32, then cast to dtype."""

    def part(packed, absmax, n):
        if n % 2 == 0 and n % block_size == 0:
            # fast path: one table row per packed byte gives both of its values
            values = torch.index_select(_nf4_pairs(packed.device), 0, packed.int()).view(-1, block_size)
            return values.mul_(absmax.float().view(-1, 1)).view(-1)
        return _scale_blocks(nf4_code(packed.device)[nf4_unpack(packed, n)], absmax.float(), block_size)

    return _in_steps(part, packed, absmax, shape, block_size, dtype, 2)


def dequantize_int8(codes, absmax, shape, block_size, dtype) -> torch.Tensor:
    """code * (absmax / 127), in float32, then cast to dtype; the same bits on every device."""

    def part(codes, absmax, n):
        # The divisor is a tensor on the scales' device, not a Python number: CUDA computes
        # `tensor / number` as `tensor * (1 / number)` (one bit off for some scales: the 6 int8
        # float32 CUDA tests of issue 24), while a tensor divisor is an IEEE division everywhere,
        # as the CPU and the native kernels (qmatvec.c: absmax[k] / INT8_QMAX) compute it.
        qmax = torch.full((), INT8_QMAX, dtype=torch.float32, device=absmax.device)
        return _scale_blocks(codes.float(), absmax.float() / qmax, block_size)

    return _in_steps(part, codes, absmax, shape, block_size, dtype, 1)


def apply_outliers(weight: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """Outlier entries were zeroed before block quantization (so they dequantize to exactly 0);
    putting their exact values back restores them bit for bit."""
    weight.view(-1).index_put_((idx.long(),), val.to(weight.dtype))
    return weight


def dequantize_weight(tensors: dict[str, torch.Tensor], name: str, entry: dict, dtype: torch.dtype) -> torch.Tensor:
    """Rebuild logical weight `name` of a unit from its stored tensors, as described by its
    manifest tensor entry ({"scheme", "shape", "block_size", "outliers", ...})."""
    scheme = entry["scheme"]
    shape = tuple(entry["shape"])
    if scheme == SCHEME_NONE:
        return tensors[name].to(dtype)
    try:
        codes, absmax = tensors[name + SUFFIX_CODES], tensors[name + SUFFIX_ABSMAX]
    except KeyError as e:
        raise FormatError(f"quantized weight {name!r} lacks its stored tensor {e.args[0]!r}") from None
    if scheme == SCHEME_NF4:
        w = dequantize_nf4(codes, absmax, shape, entry["block_size"], dtype)
    elif scheme == SCHEME_INT8:
        w = dequantize_int8(codes, absmax, shape, entry["block_size"], dtype)
    else:
        raise FormatError(f"weight {name!r} uses unknown quantization scheme {scheme!r}")
    if entry.get("outliers", 0):
        w = apply_outliers(w, tensors[name + SUFFIX_OUTLIER_IDX], tensors[name + SUFFIX_OUTLIER_VAL])
    return w


def quantize_blocks_for_probe(scheme: str, n: int, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes and block scales of n weights (for timing the kernels, not for use)."""
    g = torch.Generator().manual_seed(0)
    absmax = torch.rand(-(-n // block_size), generator=g) * 0.1
    if scheme == SCHEME_NF4:
        return torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g), absmax
    return torch.randint(-INT8_QMAX, INT8_QMAX + 1, (n,), dtype=torch.int8, generator=g), absmax
