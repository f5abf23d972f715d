"""Writing pack files: deterministic safetensors layer files and atomic file replacement.

Every file is written to `<name>.tmp-<pid>`, flushed, fsync'ed and renamed over its final name, so
a crash leaves either the old file, the complete new one, or a stray temp file that is ignored
and cleaned up - never a half-written file under a real name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct

import torch

from layerpack_runtime.format import META_FORMAT, META_UNIT, META_ZSTD, FORMAT_VERSION, FORMAT_NAME, TORCH_TO_ST, expert_of

TMP_MARK = ".tmp-"


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


def encode_tensors(tensors: dict[str, torch.Tensor], unit: str, zstd_level: int | None):
    """Header bytes and ordered payloads of a safetensors file. Order: by element size descending,
    then name, so every tensor is aligned to its element size (the header is padded to 8 bytes).
    Mixture-of-experts tensors come after all the others, grouped per expert in expert order (each
    group again by element size, then name): one expert = one contiguous byte range, read with one
    pread; its tensors are aligned relative to the start of that range.
    With zstd, each payload becomes a U8 tensor and __metadata__ records its logical dtype/shape
    (the file stays an ordinary safetensors file)."""
    meta = {META_FORMAT: f"{FORMAT_NAME}/{FORMAT_VERSION}", META_UNIT: unit}
    items = []
    zstd_table = {}
    if zstd_level is not None:
        import zstandard

        cctx = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True)
    for name in sorted(tensors):
        t = tensors[name]
        st_dtype, shape, payload = TORCH_TO_ST[t.dtype], list(t.shape), _raw_bytes(t)
        if zstd_level is not None:
            zstd_table[name] = {"dtype": st_dtype, "shape": shape}
            payload = memoryview(cctx.compress(payload))
            st_dtype, shape = "U8", [len(payload)]
        items.append((name, st_dtype, shape, payload, t.element_size() if zstd_level is None else 1))
    if zstd_table:
        meta[META_ZSTD] = json.dumps(zstd_table, sort_keys=True, separators=(",", ":"))
    items.sort(key=_order)
    header: dict = {"__metadata__": meta}
    offset = 0
    for name, st_dtype, shape, payload, _ in items:
        header[name] = {"dtype": st_dtype, "shape": shape, "data_offsets": [offset, offset + len(payload)]}
        offset += len(payload)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, [it[3] for it in items]


def _order(item) -> tuple:
    name, elsize = item[0], item[4]
    j = expert_of(name)
    return (j is not None, -1 if j is None else j, -elsize, name)


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], unit: str, zstd_level: int | None = None) -> tuple[int, str]:
    """Atomically write a layer file; returns (size, sha256) computed from the bytes written."""
    head, payloads = encode_tensors(tensors, unit, zstd_level)
    h = hashlib.sha256(head)
    size = len(head)
    with atomic_open(path) as f:
        f.write(head)
        for p in payloads:
            f.write(p)
            h.update(p)
            size += len(p)
    return size, h.hexdigest()
