"""Validated, dependency-free reading of safetensors files.

We parse the header ourselves instead of using `safetensors.safe_open` because (1) every
offset and size is checked before a byte of payload is trusted (a truncated or hostile file
fails with a clear message, never a crash or a huge allocation), (2) reads are positional reads
(fileio.read_fully, of any size) into buffers we own, so memory is exactly what we asked for (no mmap pages
lingering in RSS while streaming a 100 GB model), and (3) zstd-compressed payloads of a pack
are decompressed transparently.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import FormatError
from .fileio import read_parallel
from .format import MAX_HEADER_BYTES, MAX_TENSOR_RANK, META_ZSTD, ST_DTYPES
from .validate import check_zstd_table, load_json

# Source checkpoints may hold dtypes a pack never does; we can index them and explain, not read them.
_EXTRA_SOURCE_DTYPES = {
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "U16": getattr(torch, "uint16", None),
    "U32": getattr(torch, "uint32", None),
    "U64": getattr(torch, "uint64", None),
}
_ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in {**ST_DTYPES, **_EXTRA_SOURCE_DTYPES}.items() if dt is not None}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str          # safetensors dtype string of the stored bytes
    shape: tuple[int, ...]
    start: int          # absolute byte offset in the file
    end: int
    # For zstd-compressed payloads: the logical dtype/shape after decompression.
    logical_dtype: str | None = None
    logical_shape: tuple[int, ...] | None = None

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def out_dtype(self) -> str:
        return self.logical_dtype or self.dtype

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.logical_shape if self.logical_shape is not None else self.shape


def _fail(path: str, what: str) -> FormatError:
    return FormatError(f"{path}: not a valid safetensors file ({what})")


class SafetensorsFile:
    """A validated safetensors file. Construction reads only the header."""

    def __init__(self, path: str | os.PathLike, head: bytes | None = None, file_size: int | None = None):
        """Reads and validates the header of the file at `path`; or, for a file still downloading,
        validates `head` (its first bytes, header included) against its known `file_size`."""
        self.path = os.fspath(path)
        self.ensure_local: Callable[[], None] | None = None  # set for a file still downloading: blocks until it is there
        try:
            if head is None:
                self.file_size = os.path.getsize(self.path)
                with open(self.path, "rb") as f:
                    prefix = f.read(8)
                    n = self._header_len(prefix)
                    raw = f.read(n)
            else:
                self.file_size = int(file_size)  # type: ignore[arg-type]
                n = self._header_len(head[:8])
                raw = head[8:8 + n]
                if len(raw) < n:
                    raise _fail(self.path, f"header of {n} bytes, only {len(raw)} received")
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read ({e.strerror or e})") from None
        try:  # bounded, no duplicate keys, bounded nesting (validate.load_json)
            header = load_json(raw, "header", MAX_HEADER_BYTES)
        except FormatError as e:
            raise _fail(self.path, f"header is not acceptable JSON: {e}") from None
        if not isinstance(header, dict):
            raise _fail(self.path, "header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        self._header_names = list(header)
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise _fail(self.path, "__metadata__ must map strings to strings")
        self.metadata: dict[str, str] = meta
        self.data_start = 8 + n
        data_len = self.file_size - self.data_start
        zstd_info = self._zstd_table(meta)
        infos: dict[str, TensorInfo] = {}
        spans = []
        for name, entry in header.items():
            if not isinstance(entry, dict):
                raise _fail(self.path, f"entry {name!r} is not an object")
            dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            if not (isinstance(dtype, str) and dtype in _ITEMSIZE):  # str first: a hostile dict is unhashable
                raise _fail(self.path, f"tensor {name!r} has unknown dtype {dtype!r}")
            if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_RANK and all(type(d) is int and d >= 0 for d in shape)):
                raise _fail(self.path, f"tensor {name!r} has an invalid shape {shape!r}")
            if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs) and 0 <= offs[0] <= offs[1]):
                raise _fail(self.path, f"tensor {name!r} has invalid data_offsets {offs!r}")
            if offs[1] > data_len:
                raise _fail(self.path, f"tensor {name!r} ends at byte {offs[1]} but only {data_len} data bytes exist; truncated?")
            if offs[1] - offs[0] != math.prod(shape) * _ITEMSIZE[dtype]:
                raise _fail(self.path, f"tensor {name!r}: {offs[1] - offs[0]} bytes do not match {dtype}{shape}")
            logical = zstd_info.get(name)
            infos[name] = TensorInfo(
                name, dtype, tuple(shape), self.data_start + offs[0], self.data_start + offs[1],
                logical[0] if logical else None, logical[1] if logical else None,
            )
            spans.append((offs[0], offs[1]))
        # The spec forbids holes and overlaps: the tensors tile the data region exactly.
        spans.sort()
        pos = 0
        for b, e in spans:
            if b != pos:
                raise _fail(self.path, "tensor data overlaps or leaves holes")
            pos = e
        if pos != data_len:
            raise _fail(self.path, f"{data_len - pos} trailing bytes after the last tensor")
        self.tensors = infos

    def _header_len(self, prefix: bytes) -> int:
        if len(prefix) < 8:
            raise _fail(self.path, "shorter than 8 bytes")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or 8 + n > self.file_size:
            raise _fail(self.path, f"header length {n} does not fit in a file of {self.file_size} bytes; truncated?")
        return n

    def ready(self) -> None:
        """Wait until the file's data can be read (immediately, unless it is still downloading)."""
        if self.ensure_local is not None:
            self.ensure_local()

    def _zstd_table(self, meta: dict[str, str]) -> dict[str, tuple[str, tuple[int, ...]]]:
        if META_ZSTD not in meta:
            return {}
        try:
            table = load_json(meta[META_ZSTD], META_ZSTD, MAX_HEADER_BYTES)
        except FormatError as e:
            raise _fail(self.path, f"malformed {META_ZSTD} metadata: {e}") from None
        return check_zstd_table(self.path, table, self._header_names)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, names=None) -> dict[str, torch.Tensor]:
        """Read tensors (all by default) into memory we own, in file order, decompressing zstd payloads."""
        infos = sorted((self.tensors[n] for n in (names if names is not None else self.tensors)), key=lambda i: i.start)
        out: dict[str, torch.Tensor] = {}
        self.ready()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for info in infos:
                # torch.empty: no zero-fill (a bytearray would touch every page twice)
                raw = torch.empty(info.nbytes, dtype=torch.uint8)
                if info.nbytes and read_parallel(fd, raw.numpy(), info.start) != info.nbytes:  # large ones: chunks in parallel
                    raise _fail(self.path, f"short read of tensor {info.name!r}; file changed or truncated")
                out[info.name] = self._to_tensor(info, raw)
        finally:
            os.close(fd)
        return out

    def read_tensor(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def _to_tensor(self, info: TensorInfo, raw: torch.Tensor) -> torch.Tensor:
        dtype = ST_DTYPES.get(info.out_dtype) or _EXTRA_SOURCE_DTYPES.get(info.out_dtype)
        if dtype is None:
            raise _fail(self.path, f"tensor {info.name!r} has dtype {info.out_dtype} that this torch cannot represent")
        if info.logical_dtype is not None:
            buf = zstd_decompress(self.path, info, raw.numpy())
            return torch.frombuffer(buf, dtype=dtype).reshape(info.out_shape) if buf else torch.empty(info.out_shape, dtype=dtype)
        if raw.numel() == 0:
            return torch.empty(info.out_shape, dtype=dtype)
        return raw.view(dtype).reshape(info.out_shape)


def zstd_decompress(path: str, info: TensorInfo, buf, out=None):
    """Decompress one tensor's frame (`buf`: any bytes-like object) into exactly the bytes its
    logical dtype/shape need, straight into `out` (a writable buffer of that size, e.g. part of a
    pinned stream slot) or into a new bytearray; returns that buffer. The frame's declared content
    size is checked first: zstandard allocates what a frame declares (ignoring max_output_size), so
    a frame declaring gigabytes must be refused before it is decompressed; a frame that holds less
    or more than it declares, or trailing data, is refused too."""
    import zstandard  # imported lazily: only compressed packs need it

    expected = math.prod(info.out_shape) * _ITEMSIZE[info.out_dtype]
    src = memoryview(buf).cast("B")
    try:
        declared = zstandard.frame_content_size(src)
    except zstandard.ZstdError as e:
        raise _fail(path, f"tensor {info.name!r}: zstd payload is corrupt ({e})") from None
    if declared != expected:
        raise _fail(path, f"tensor {info.name!r}: zstd frame declares {'no' if declared < 0 else declared} content size, "
                          f"expected {expected} bytes")
    out = bytearray(expected) if out is None else out
    dst = memoryview(out).cast("B")
    if len(dst) != expected:
        raise ValueError(f"output buffer of {len(dst)} bytes for {expected} decompressed bytes")
    got = 0
    try:  # readinto decompresses in place: no intermediate bytes object of the tensor's size
        reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=False)
        while got < expected:
            k = reader.readinto(dst[got:])
            if k <= 0:
                break
            got += k
        extra = reader.read(1) if got == expected else b""
    except zstandard.ZstdError as e:
        raise _fail(path, f"tensor {info.name!r}: zstd payload is corrupt ({e})") from None
    if got != expected:
        raise _fail(path, f"tensor {info.name!r}: decompressed to {got} bytes, expected {expected}")
    if extra:
        raise _fail(path, f"tensor {info.name!r}: zstd payload is corrupt (data past its declared {expected} bytes)")
    return out


def itemsize(st_dtype: str) -> int:
    return _ITEMSIZE[st_dtype]
