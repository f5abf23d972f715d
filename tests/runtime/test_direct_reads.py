"""Streamed reads past the page cache (page_cache=False: O_DIRECT into the stream slots). The same
bytes land at the same place as a buffered read, whatever the range's offset, size and file tail;
where O_DIRECT is refused (at open or at the first read) the buffered read takes over with the same
result; a misplaced or too small region is refused; the streamer and a whole model give the same
values with and without the page cache, and a model streamed that way equals the resident one bit
for bit."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import struct

import pytest
import torch

from conftest import make_checkpoint, write_tiny_tokenizer
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime import fileio, load, streaming
from layerpack_runtime.fileio import DIRECT_ALIGN, direct_span, read_unbuffered
from layerpack_runtime.safetensors_io import SafetensorsFile
from layerpack_runtime.streaming import UnitStreamer, direct_shift, slot_bytes

A = DIRECT_ALIGN


def _direct_allowed(folder) -> bool:
    """Whether this file system takes O_DIRECT (tmpfs before Linux 6.6 and some others do not)."""
    if not getattr(os, "O_DIRECT", 0):
        return False
    path = os.path.join(folder, "probe")
    with open(path, "wb") as f:
        f.write(b"\0" * A)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        os.unlink(path)


def _needs_direct(folder):
    if not _direct_allowed(folder):
        pytest.skip(f"the file system of {folder} refuses O_DIRECT: only the buffered fallback can be checked here")


def _region(nbytes: int, misalign: int = 0) -> tuple[torch.Tensor, memoryview]:
    raw = torch.full((nbytes + 2 * A,), 0xAB, dtype=torch.uint8)
    start = (-raw.data_ptr()) % A + misalign
    return raw, memoryview(raw.numpy())[start:start + nbytes]


def _read(path, offset, n, chunk=fileio.READ_CHUNK) -> tuple[int, bool, bytes]:
    _, region = _region(direct_span(offset, n) + A)
    got, direct = read_unbuffered(str(path), region, offset, n, chunk)
    head = offset % A
    return got, direct, bytes(region[head:head + n])


@pytest.mark.parametrize("chunk", [A, 3 * A, fileio.READ_CHUNK])
def test_unbuffered_read_equals_the_file(tmp_path, chunk):
    """Offsets inside a block, at one, sizes across blocks and chunks, ranges ending in the file's
    last partial block, at its end, and past it (a truncated file: the bytes up to its end)."""
    data = os.urandom(9 * A + 1234)  # the file's tail is not a whole block
    path = tmp_path / "f"
    path.write_bytes(data)
    direct_ok = _direct_allowed(tmp_path)
    for offset in (0, 1, 8, A - 8, A, 2 * A + 40):
        for n in (1, A - 1, A, A + 1, 3 * A + 17, len(data) - offset, len(data) - offset + 5000):
            got, direct, out = _read(path, offset, n, chunk)
            want = data[offset:offset + n]
            assert got == len(want) and out[:got] == want, (offset, n)
            assert direct == direct_ok, (offset, n)


def test_unbuffered_read_of_a_large_range_in_parallel_chunks(tmp_path):
    data = os.urandom(5 * fileio.READ_CHUNK + 3 * A + 77)
    path = tmp_path / "f"
    path.write_bytes(data)
    offset = 3 * A + 328  # a safetensors data region: 8-aligned, not block-aligned
    got, direct, out = _read(path, offset, len(data) - offset)
    assert got == len(data) - offset and out == data[offset:] and direct == _direct_allowed(tmp_path)


def test_refused_at_open_falls_back_to_buffered(tmp_path, monkeypatch):
    data = os.urandom(4 * A + 99)
    path = tmp_path / "f"
    path.write_bytes(data)
    real, tried = os.open, []

    def no_direct(p, flags, *rest):
        if flags & getattr(os, "O_DIRECT", 0):
            tried.append(p)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(p, flags, *rest)

    monkeypatch.setattr(os, "open", no_direct)
    got, direct, out = _read(path, 520, len(data) - 520, chunk=A)
    assert (got, direct, out) == (len(data) - 520, False, data[520:])
    assert tried == ([str(path)] if getattr(os, "O_DIRECT", 0) else [])


def test_refused_at_read_falls_back_to_buffered(tmp_path, monkeypatch):
    """A file system that opens with O_DIRECT but refuses the read (EINVAL): buffered, same bytes."""
    _needs_direct(tmp_path)
    data = os.urandom(6 * A + 5)
    path = tmp_path / "f"
    path.write_bytes(data)
    real, refused = os.preadv, []

    def refuse_direct(fd, bufs, off):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(off)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", refuse_direct)
    got, direct, out = _read(path, 16, len(data) - 16, chunk=2 * A)
    assert (got, direct, out) == (len(data) - 16, False, data[16:]) and refused


def test_other_errors_are_raised(tmp_path, monkeypatch):
    _needs_direct(tmp_path)
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * A))
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(OSError, match="Input/output"):
        _read(path, 0, 3 * A, chunk=A)


def test_region_must_be_aligned_and_large_enough(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(os.urandom(2 * A))
    raw, region = _region(3 * A, misalign=64)
    with pytest.raises(ValueError, match="multiple of DIRECT_ALIGN"):
        read_unbuffered(str(path), region, 0, A)
    raw, region = _region(A)
    with pytest.raises(ValueError, match="needed"):
        read_unbuffered(str(path), region, 8, A)  # the range spans two blocks


# -- the streamer ------------------------------------------------------------------------------------

def _unit(path, header_pad: int) -> dict[str, torch.Tensor]:
    """A safetensors unit of several dtypes whose data region starts at 8 + header + header_pad."""
    tensors = {"w": torch.randn(300, 7), "h": torch.randn(33).half(), "q": torch.randint(0, 255, (5001,), dtype=torch.uint8),
               "l": torch.arange(9, dtype=torch.int64) * 3}
    header, offset, blobs = {}, 0, []
    for name in ("l", "w", "h", "q"):  # by element size, as the writer orders them
        raw = tensors[name].numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.float16: "F16", torch.uint8: "U8", torch.int64: "I64"}[tensors[name].dtype],
                        "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8 + header_pad)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return tensors


@pytest.mark.parametrize("pad", [0, 8 * 600, 3])
def test_streamer_reads_the_same_values_with_and_without_the_page_cache(tmp_path, pad, monkeypatch):
    """pad 3: a data region at an odd offset (not a file this project writes): O_DIRECT would put its
    tensors at addresses their dtypes cannot be viewed at, so it is read buffered; same values."""
    want = _unit(tmp_path / "u.safetensors", pad)
    st = SafetensorsFile(tmp_path / "u.safetensors")
    assert (st.data_start % 8 == 0) == (pad != 3) and (direct_shift(st) is None) == (pad == 3)
    calls = []
    monkeypatch.setattr(streaming, "read_unbuffered", lambda *a: calls.append(a[0]) or read_unbuffered(*a))
    for page_cache in (True, False):
        planned = slot_bytes(st, direct=not page_cache)  # what the planner counts for this slot
        streamer = UnitStreamer({"u": st}, ["u"], planned, torch.device("cpu"), page_cache=page_cache)
        try:
            for _ in range(3):
                got = streamer.get("u")
                assert all(torch.equal(got[k], v) for k, v in want.items())
            assert streamer.direct == (not page_cache and _direct_allowed(tmp_path))
            assert all(s.host.numel() == planned for s in streamer.slots)  # what the planner counts, no more
        finally:
            streamer.close()  # waits for the read ahead the last get() started, if it began
        reads = streamer.stats.units_read
        assert reads >= 3 and len(calls) == (reads if not page_cache and pad != 3 and getattr(os, "O_DIRECT", 0) else 0)
        calls.clear()


def test_streamer_falls_back_when_direct_is_refused(tmp_path, monkeypatch):
    want = _unit(tmp_path / "u.safetensors", 8)
    st = SafetensorsFile(tmp_path / "u.safetensors")
    real = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *r: (_ for _ in ()).throw(OSError(errno.EINVAL, "no"))
                        if flags & getattr(os, "O_DIRECT", 0) else real(p, flags, *r))
    streamer = UnitStreamer({"u": st}, ["u"], slot_bytes(st, direct=True), torch.device("cpu"), page_cache=False)
    try:
        assert streamer.direct == bool(getattr(os, "O_DIRECT", 0))
        for _ in range(2):
            got = streamer.get("u")
            assert all(torch.equal(got[k], v) for k, v in want.items())
        assert not streamer.direct  # refused once: buffered from then on (and the read-ahead hints resume)
    finally:
        streamer.close()


# -- a model -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("direct")
    ck = make_checkpoint(root / "ck", "llama", dtype=torch.float32, num_hidden_layers=6)
    write_tiny_tokenizer(ck)
    out = {}
    for name, opts in {"fp32": {}, "nf4": dict(quant="nf4"), "int8z": dict(quant="int8", compress="zstd")}.items():
        out[name] = str(root / name)
        convert(ck, out[name], ConvertOptions(quiet=True, **opts))
    return out


@pytest.mark.parametrize("kind", ["fp32", "nf4", "int8z"])
def test_model_streamed_past_the_page_cache_equals_resident(packs, kind, monkeypatch):
    resident = load(packs[kind])
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    want = resident.logits(ids)
    budget = load(packs[kind], page_cache=False).minimum_memory()
    # the planner counts O_DIRECT's headroom in both stream slots (the minimum's two buffers), and only then
    assert budget - resident.minimum_memory() == 2 * streaming.SLOT_HEADROOM
    direct = load(packs[kind], max_memory=budget, page_cache=False)
    assert direct.plan.streamed and direct.streamer.direct == _direct_allowed(os.path.dirname(packs[kind]))
    assert torch.equal(direct.logits(ids), want)
    assert direct.generate_ids([1, 5, 9], max_new_tokens=6) == resident.generate_ids([1, 5, 9], max_new_tokens=6)
    monkeypatch.setattr(streaming, "DIRECT_READS", False)  # the buffered path, for comparison: same logits
    buffered = load(packs[kind], max_memory=budget, page_cache=False)
    assert not buffered.streamer.direct and torch.equal(buffered.logits(ids), want)
