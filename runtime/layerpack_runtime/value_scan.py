"""`verify`'s look at every stored value, made while the file is hashed (one read of each byte).

The loader checks only the small tables of a unit (scales, outliers: validate.check_payload); a
full pass over the weights on every load would cost as much as reading them twice. `verify` reads
every byte anyway to hash it, so it also checks, chunk by chunk as the hash sees them:
- unquantized tensors (norms, biases, embedding, a bf16 pack's linears): no NaN or infinity
  (the converter refuses such sources, so a pack holding one was not written by it);
- int8 codes: never -128 (the scheme is symmetric, codes are in [-INT8_QMAX, INT8_QMAX]).
NF4 codes need no check: all 16 are valid. In a zstd pack the bytes hashed are frames, so the same
checks run on each decompressed tensor instead (check_values), as verify decompresses every frame.
"""
from __future__ import annotations

import torch

from .errors import FormatError
from .format import INT8_QMAX, SCHEME_INT8, SCHEME_NONE, ST_DTYPES, SUFFIX_CODES


# A float is NaN or infinite exactly when its exponent bits are all ones: tested on the integers of
# the same width with numpy (~100x faster than torch.isfinite on bf16 with one thread; the hash then
# dominates). Dtype -> (integer view, exponent mask).
_EXPONENT = {torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00),
             torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}


def check_values(path: str, name: str, kind: str, t: torch.Tensor) -> None:
    """kind "finite": no NaN/inf in t (a float tensor); kind "int8": no code below -INT8_QMAX."""
    if not t.numel():
        return
    flat = t.reshape(-1)
    if kind == "finite":
        view, mask = _EXPONENT[flat.dtype]
        if int((flat.view(view).numpy() & mask).max()) == mask:
            raise FormatError(f"{path}: {name} holds a NaN or infinite value")
    elif kind == "int8":
        low = int(flat.view(torch.int8).numpy().min())
        if low < -INT8_QMAX:
            raise FormatError(f"{path}: {name} holds the code {low}, outside the int8 scheme's [-{INT8_QMAX}, {INT8_QMAX}]")


def value_checks(layer) -> dict[str, str]:
    """{stored name: kind} of the tensors of one layer entry whose every value is checked."""
    out = {}
    for t in layer.tensors:
        if t.scheme == SCHEME_NONE:
            out[t.name] = "finite"
        elif t.scheme == SCHEME_INT8:
            out[t.name + SUFFIX_CODES] = "int8"
    return out


class ValueScan:
    """Fed the file's bytes in order (offset, chunk) by the hasher; holds the first problem found.
    Chunks need not align with tensors or elements: a tensor's partial element waits in `carry`."""

    def __init__(self, layer, st):
        self.path = layer.file
        checks = value_checks(layer)
        # (start, end, name, kind, dtype) in file order; a compressed tensor's bytes are a frame, not values
        self.ranges = sorted((info.start, info.end, name, checks[name], ST_DTYPES[info.dtype])
                             for name, info in st.tensors.items() if name in checks and info.logical_dtype is None)
        self.i = 0
        self.carry = b""
        self.problem: str | None = None

    def feed(self, offset: int, chunk: memoryview) -> None:
        end = offset + len(chunk)
        while self.problem is None and self.i < len(self.ranges):
            start, stop, name, kind, dtype = self.ranges[self.i]
            if start >= end:
                return
            a, b = max(start, offset), min(stop, end)
            if b > a:
                try:
                    self._check(chunk[a - offset:b - offset], name, kind, dtype)
                except FormatError as e:
                    self.problem = str(e)
            if stop > end:
                return
            self.i, self.carry = self.i + 1, b""

    def _check(self, piece: memoryview, name: str, kind: str, dtype: torch.dtype) -> None:
        size = torch.empty(0, dtype=dtype).element_size()
        if self.carry:  # complete the element split across the previous chunk
            need = size - len(self.carry)
            head = self.carry + bytes(piece[:need])
            piece = piece[need:]
            if len(head) < size:
                self.carry = head
                return
            check_values(self.path, name, kind, torch.frombuffer(bytearray(head), dtype=dtype))
        whole = len(piece) // size * size
        self.carry = bytes(piece[whole:])
        if whole:
            check_values(self.path, name, kind, torch.frombuffer(piece[:whole], dtype=dtype))
