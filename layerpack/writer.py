"""Writing pack files: deterministic safetensors layer files and atomic file replacement.

Every file is written to `<name>.tmp-<pid>`, flushed, fsync'ed and renamed over its final name, so
a crash leaves either the old file, the complete new one, or a stray temp file that is ignored
and cleaned up - never a half-written file under a real name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct

import torch

from layerpack_runtime.format import META_FORMAT, META_UNIT, META_ZSTD, FORMAT_VERSION, FORMAT_NAME, TORCH_TO_ST, expert_of

TMP_MARK = ".tmp-"
COPY_CHUNK = 16 << 20        # bytes per read when hashing back or assembling a file
ZSTD_WHOLE_MAX = 256 << 20   # tensors up to this size are compressed in one call (as in memory)


def tmp_name(path: str) -> str:
    return f"{path}{TMP_MARK}{os.getpid()}"


@contextlib.contextmanager
def atomic_open(path: str):
    """Yields a binary file; on success it is fsync'ed and renamed to `path`, on error removed."""
    tmp = tmp_name(path)
    f = open(tmp, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str, data: bytes) -> tuple[int, str]:
    with atomic_open(path) as f:
        f.write(data)
    return len(data), hashlib.sha256(data).hexdigest()


def write_text_atomic(path: str, text: str) -> tuple[int, str]:
    return write_bytes_atomic(path, text.encode("utf-8"))


def _raw_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _meta(unit: str) -> dict:
    return {META_FORMAT: f"{FORMAT_NAME}/{FORMAT_VERSION}", META_UNIT: unit}


def _header(items: list[tuple], meta: dict) -> tuple[bytes, dict[str, int]]:
    """items: (name, st_dtype, shape, nbytes, element size), in any order. Returns the header bytes
    (length prefix, JSON padded to 8 bytes) and each tensor's offset in the data section.
    Order: by element size descending, then name, so every tensor is aligned to its element size.
    Mixture-of-experts tensors come after all the others, grouped per expert in expert order (each
    group again by element size, then name): one expert = one contiguous byte range, read with one
    pread; its tensors are aligned relative to the start of that range."""
    header: dict = {"__metadata__": meta}
    offsets, offset = {}, 0
    for name, st_dtype, shape, nbytes, _ in sorted(items, key=_order):
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offsets[name] = offset
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def encode_tensors(tensors: dict[str, torch.Tensor], unit: str, zstd_level: int | None):
    """Header bytes and ordered payloads of a safetensors file held in memory (see _header for the
    order). With zstd, each payload becomes a U8 tensor and __metadata__ records its logical
    dtype/shape (the file stays an ordinary safetensors file)."""
    meta = _meta(unit)
    items, payloads = [], {}
    zstd_table = {}
    cctx = _compressor(zstd_level) if zstd_level is not None else None
    for name in sorted(tensors):
        t = tensors[name]
        st_dtype, shape, payload = TORCH_TO_ST[t.dtype], list(t.shape), _raw_bytes(t)
        if cctx is not None:
            zstd_table[name] = {"dtype": st_dtype, "shape": shape}
            payload = memoryview(cctx.compress(payload))
            st_dtype, shape = "U8", [len(payload)]
        items.append((name, st_dtype, shape, len(payload), t.element_size() if cctx is None else 1))
        payloads[name] = payload
    if zstd_table:
        meta[META_ZSTD] = json.dumps(zstd_table, sort_keys=True, separators=(",", ":"))
    head, offsets = _header(items, meta)
    return head, [payloads[name] for name in sorted(offsets, key=offsets.__getitem__)]


def _compressor(level: int):
    import zstandard

    return zstandard.ZstdCompressor(level=level, write_content_size=True)


def _order(item) -> tuple:
    name, elsize = item[0], item[4]
    j = expert_of(name)
    return (j is not None, -1 if j is None else j, -elsize, name)


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], unit: str, zstd_level: int | None = None) -> tuple[int, str]:
    """Atomically write a layer file held in memory; returns (size, sha256)."""
    with UnitWriter(path, unit, {n: (t.dtype, list(t.shape)) for n, t in tensors.items()}, zstd_level) as w:
        for name, t in tensors.items():
            w.write(name, 0, t)
        return w.finish()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite writes at most 0x7ffff000 bytes per call on Linux: loop until all is written."""
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


class UnitWriter:
    """One layer file written tensor by tensor and piece by piece, so a unit of any size (a 405B
    layer is 6.4 GB of bf16, an MLP matrix 1.7 GB) is written in the memory of one piece.

    `specs`: every tensor the file will hold, name -> (torch dtype, shape), given up front. Without
    zstd every size is known, so the header is written first and each piece goes straight to its
    place (pwrite); the sha256 is then computed in one sequential read of the finished file (from
    the page cache: the file was just written). With zstd the sizes are known only after
    compression: each tensor is compressed when complete (in one call up to ZSTD_WHOLE_MAX bytes,
    identical to compressing it in memory; above, as one streamed frame with its content size) into
    a spool file, and the final file is header + spool ranges, hashed while copied.
    The file appears under its name only in finish() (temp name, fsync, rename); an exception
    inside the `with` block removes every temporary file."""

    def __init__(self, path: str, unit: str, specs: dict[str, tuple[torch.dtype, list[int]]], zstd_level: int | None):
        self.path, self.unit, self.zstd_level = path, unit, zstd_level
        self.specs = {n: (dt, list(shape), math.prod(shape) * _elsize(dt)) for n, (dt, shape) in specs.items()}
        self.written = dict.fromkeys(self.specs, 0)
        self.tmp = tmp_name(path)
        self.f = open(self.tmp, "wb+")
        self._spool = None
        self._running = None  # sha256 of the bytes [0, _hashed_to) while pieces come in file order
        if zstd_level is None:
            items = [(n, TORCH_TO_ST[dt], shape, nb, _elsize(dt)) for n, (dt, shape, nb) in self.specs.items()]
            self.head, offsets = _header(items, _meta(unit))
            self.f.write(self.head)
            self.f.flush()
            self.offsets = {n: len(self.head) + o for n, o in offsets.items()}
            self._running, self._hashed_to = hashlib.sha256(self.head), len(self.head)
        else:
            self._cctx = _compressor(zstd_level)
            self._spool = open(self.tmp + ".spool", "wb+")
            self._pieces: dict[str, list[bytes]] = {}
            self._streams: dict[str, object] = {}
            self._spooled: dict[str, tuple[object, int, int]] = {}  # name -> (file, offset, length)
            self._extra: list = []  # one spool file per streamed (large) tensor

    def file_order(self) -> list[str]:
        """The tensor names in the order their bytes lie in the file (uncompressed files only)."""
        return sorted(self.offsets, key=self.offsets.__getitem__)

    def __enter__(self) -> "UnitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.f is not None:
            self._discard()

    def write(self, name: str, start: int, t: torch.Tensor) -> None:
        """Elements [start, start + t.numel()) of tensor `name` (flattened), in its declared dtype."""
        dt, _, nbytes = self.specs[name]
        if t.dtype != dt:
            raise ValueError(f"{name}: got {t.dtype}, declared {dt}")
        data = _raw_bytes(t)
        pos = start * _elsize(dt)
        if pos + len(data) > nbytes:
            raise ValueError(f"{name}: piece [{pos}, {pos + len(data)}) past its {nbytes} bytes")
        if self._spool is None:
            at = self.offsets[name] + pos
            _pwrite_all(self.f.fileno(), data, at)
            if self._running is not None:
                if at == self._hashed_to:
                    self._running.update(data)
                    self._hashed_to += len(data)
                elif len(data):
                    self._running = None  # out of order: hashed back in finish()
        else:
            self._compress_piece(name, pos, data, nbytes)
        self.written[name] += len(data)

    def _compress_piece(self, name: str, pos: int, data: memoryview, nbytes: int) -> None:
        if pos != self.written[name]:
            raise ValueError(f"{name}: zstd pieces must come in order")
        if nbytes <= ZSTD_WHOLE_MAX:
            self._pieces.setdefault(name, []).append(bytes(data))
            if pos + len(data) == nbytes:
                self._to_spool(name, [self._cctx.compress(b"".join(self._pieces.pop(name)))])
            return
        if name not in self._streams:  # its own spool file: other tensors' pieces arrive meanwhile
            spool = open(f"{self.tmp}.spool{len(self._extra)}", "wb+")
            self._extra.append(spool)
            # stream_writer with the size puts the content size in the frame header (the reader checks it)
            # (its own compressor: one ZstdCompressor's context cannot serve two frames at once)
            cctx = _compressor(self.zstd_level)
            self._streams[name] = (cctx.stream_writer(spool, size=nbytes, closefd=False), spool)
        stream, spool = self._streams[name]
        stream.write(data)
        if pos + len(data) == nbytes:
            del self._streams[name]
            stream.close()  # ends the frame; the spool file stays open (closefd=False)
            self._spooled[name] = (spool, 0, spool.seek(0, 2))

    def _to_spool(self, name: str, blobs: list[bytes]) -> None:
        begin = self._spool.seek(0, 2)
        for b in blobs:
            self._spool.write(b)
        self._spooled[name] = (self._spool, begin, self._spool.tell() - begin)

    def finish(self) -> tuple[int, str]:
        """Checks every tensor is complete, then publishes the file; returns (size, sha256)."""
        missing = [n for n, (_, _, nb) in self.specs.items() if self.written[n] != nb]
        if missing:
            raise ValueError(f"{self.path}: tensors not completely written: {missing[:5]}")
        if self._spool is None and self._running is not None and self._hashed_to == len(self.head) + sum(
                nb for _, _, nb in self.specs.values()):
            size, sha = self._hashed_to, self._running.hexdigest()
        elif self._spool is None:
            size, sha = self._hash_back()
        else:
            size, sha = self._assemble()
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        os.replace(self.tmp, self.path)
        return size, sha

    def _hash_back(self) -> tuple[int, str]:
        self.f.flush()
        h, size = hashlib.sha256(), 0
        buf = bytearray(COPY_CHUNK)
        view = memoryview(buf)
        self.f.seek(0)
        while n := self.f.readinto(buf):
            h.update(view[:n])
            size += n
        return size, h.hexdigest()

    def _assemble(self) -> tuple[int, str]:
        meta = _meta(self.unit)
        table = {n: {"dtype": TORCH_TO_ST[dt], "shape": shape} for n, (dt, shape, _) in self.specs.items()}
        if table:
            meta[META_ZSTD] = json.dumps(table, sort_keys=True, separators=(",", ":"))
        items = [(n, "U8", [ln], ln, 1) for n, (_, _, ln) in self._spooled.items()]
        head, offsets = _header(items, meta)
        h, size = hashlib.sha256(head), len(head)
        self.f.seek(0)
        self.f.truncate()
        self.f.write(head)
        for name in sorted(offsets, key=offsets.__getitem__):
            spool, begin, left = self._spooled[name]
            spool.flush()
            spool.seek(begin)
            while left:
                piece = spool.read(min(COPY_CHUNK, left))
                self.f.write(piece)
                h.update(piece)
                left -= len(piece)
                size += len(piece)
        self._close_spool()
        return size, h.hexdigest()

    def _close_spool(self) -> None:
        if self._spool is not None:
            for f in [self._spool, *self._extra]:
                f.close()
                with contextlib.suppress(OSError):
                    os.remove(f.name)
            self._spool, self._extra = None, []

    def _discard(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
        with contextlib.suppress(OSError):
            os.remove(self.tmp)
        self._close_spool()


def _elsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()
