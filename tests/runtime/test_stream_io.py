"""The streamer's reads and copies (issue 24, item 3): the parallel chunked reader returns exactly
the bytes one sequential read does (odd sizes, chunk boundaries, short files, failures, a sparse
file past 4 GiB); a slot's layout puts decompressed and realigned tensors where the streamer and
the planner expect them; the prefetch depth is automatic (2 on CUDA when the budget allows, else
1); --stats' streaming line is there and sane. CUDA-only checks (device twins, events, copy
timing) skip with the reason printed (-rs) where there is no GPU."""
from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from conftest import make_checkpoint, run_cli, write_tiny_tokenizer
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime import LayerpackError, fileio, load
from layerpack_runtime.format import META_ZSTD
from layerpack_runtime.safetensors_io import SafetensorsFile
from layerpack_runtime.streaming import SLOT_ALIGN, SLOT_HEADROOM, UnitStreamer, slot_bytes, slot_layout

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (device twins, "
                          "copy-stream events and copy timing need one: run tests/runtime/test_stream_io.py on a GPU)")


def _read(path, n, offset, parallel: bool, chunk: int = fileio.READ_CHUNK) -> tuple[int, bytes]:
    buf = bytearray(n)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = fileio.read_parallel(fd, buf, offset, chunk) if parallel else fileio.read_fully(fd, buf, offset)
    finally:
        os.close(fd)
    return got, bytes(buf)


@pytest.mark.parametrize("chunk", [4096, 4093, 1 << 16])
def test_parallel_read_equals_single_read(tmp_path, chunk):
    data = os.urandom(10 * 4096 + 17)
    path = tmp_path / "f"
    path.write_bytes(data)
    # sizes at, around and between chunk boundaries, at odd offsets; the last ones run past the end
    for n in (1, chunk - 1, chunk, chunk + 1, 3 * chunk, 3 * chunk + 5, 7 * 4096 + 1):
        for offset in (0, 1, 4095):
            got, par = _read(path, n, offset, True, chunk)
            want_n, single = _read(path, n, offset, False)
            assert got == want_n == min(n, len(data) - offset) and par == single, (n, offset)
            assert par[:got] == data[offset:offset + got]


def test_parallel_read_with_calls_cut_short(tmp_path, monkeypatch):
    """Every os.preadv cut to 1000 bytes (as Linux cuts at 0x7ffff000): each chunk's loop still fills it."""
    data = os.urandom(300_001)
    path = tmp_path / "f"
    path.write_bytes(data)
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [memoryview(bufs[0]).cast("B")[:1000]], off))
    got, par = _read(path, 250_000, 3, True, chunk=65_536)
    assert got == 250_000 and par == data[3:250_003]


def test_parallel_read_failure_waits_for_every_chunk(tmp_path, monkeypatch):
    """A chunk whose read fails: the error is raised, after every other chunk has finished (none
    still writing into the buffer); the bytes before the failure are there."""
    data = os.urandom(8 * 4096)
    path = tmp_path / "f"
    path.write_bytes(data)
    real, done = os.preadv, []

    def failing(fd, bufs, off):
        if off == 3 * 4096:
            raise OSError(5, "Input/output error")
        n = real(fd, bufs, off)
        done.append(off)
        return n

    monkeypatch.setattr(os, "preadv", failing)
    buf = bytearray(len(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="Input/output"):
            fileio.read_parallel(fd, buf, 0, chunk=4096)
    finally:
        os.close(fd)
    assert sorted(done) == [k * 4096 for k in range(8) if k != 3] and bytes(buf[:3 * 4096]) == data[:3 * 4096]


def test_parallel_read_past_4gib(tmp_path):
    """A sparse file of 4 GiB + 48 MiB: a 64 MiB range across byte 2^32, read in default-size chunks by
    the pool, equals the sequential read; marks on both sides of 2^32 and at a chunk boundary."""
    path = tmp_path / "sparse"
    size, at = (4 << 30) + (48 << 20), (4 << 30) - (16 << 20) - 3
    marks = {(4 << 30) - 512: os.urandom(1024), at + fileio.READ_CHUNK - 7: os.urandom(64), size - 100: os.urandom(100)}
    with open(path, "wb") as f:
        f.truncate(size)
        for off, b in marks.items():
            f.seek(off)
            f.write(b)
    n = 64 << 20
    got, par = _read(path, n, at, True)
    assert got == n and n > 3 * fileio.READ_CHUNK
    for off, b in list(marks.items())[:2]:  # the two inside the range
        assert par[off - at:off - at + len(b)] == b, off
    assert par == _read(path, n, at, False)[1]
    got, par = _read(path, n, size - (20 << 20) - 1, True)  # the file ends first: the bytes up to its end
    assert got == (20 << 20) + 1 and par[got - 100:got] == marks[size - 100]


def _odd_file(path) -> dict[str, torch.Tensor]:
    """A safetensors unit with an F32 tensor at an odd byte offset (as a MoE expert range can be) and a
    zstd-compressed I32 tensor: the two cases the slot layout places after the payload."""
    import zstandard

    tensors = {"a": torch.tensor([1, 2, 3], dtype=torch.uint8), "b": torch.arange(5, dtype=torch.float32) / 3,
               "c": torch.arange(1000, dtype=torch.int32) * 7, "d": torch.tensor([0.5, -1, 2, 4], dtype=torch.float16)}
    comp = zstandard.ZstdCompressor().compress(tensors["c"].numpy().tobytes())
    blobs = {"a": ("U8", [3], tensors["a"].numpy().tobytes()), "b": ("F32", [5], tensors["b"].numpy().tobytes()),
             "c": ("U8", [len(comp)], comp)}
    pad = -(3 + 20 + len(comp)) % 2
    blobs["pad"] = ("U8", [pad], b"\0" * pad)
    blobs["d"] = ("F16", [4], tensors["d"].numpy().tobytes())
    header, offset = {"__metadata__": {META_ZSTD: json.dumps({"c": {"dtype": "I32", "shape": [1000]}})}}, 0
    for name, (dt, shape, raw) in blobs.items():
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(r for _, _, r in blobs.values()))
    return tensors


def test_slot_layout_places_zstd_and_unaligned_tensors(tmp_path):
    want = _odd_file(tmp_path / "u.safetensors")
    st = SafetensorsFile(tmp_path / "u.safetensors")
    lay = slot_layout(st)
    payload = st.file_size - st.data_start
    assert lay.places["a"] == 0 and lay.places["d"] == payload - 8  # aligned: read in place
    assert lay.places["b"] >= payload and lay.places["b"] % SLOT_ALIGN == 0  # odd offset 3: copied after the payload
    assert lay.places["c"] % SLOT_ALIGN == 0 and lay.places["c"] >= lay.places["b"] + 20
    assert lay.used == lay.places["c"] + 4000 == slot_bytes(st) == slot_bytes(st, direct=True) - SLOT_HEADROOM
    # the device copy covers exactly the final bytes: the payload's plain tensors, then b and c
    assert lay.ranges[0][0] == 0 and lay.ranges[-1][1] == lay.used
    streamer = UnitStreamer({"u": st}, ["u"], slot_bytes(st), torch.device("cpu"))
    try:
        for _ in range(3):  # the same slot reused: same values every time
            got = streamer.get("u")
            assert set(got) == {"a", "b", "c", "d", "pad"}
            for k, v in want.items():
                assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
            # the resident reader agrees, and nothing was allocated per tensor: all views of the slot
            assert all(torch.equal(got[k], t) for k, t in st.read().items())
            slot = streamer.held.host
            for k in ("b", "c"):
                assert got[k].untyped_storage().data_ptr() == slot.untyped_storage().data_ptr()
    finally:
        streamer.close()


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamio")
    ck = make_checkpoint(root / "ck", "llama", dtype=torch.float32, num_hidden_layers=10)
    write_tiny_tokenizer(ck)
    out = {}
    for name, opts in {"fp32": {}, "int8z": dict(quant="int8", compress="zstd")}.items():
        out[name] = str(root / name)
        convert(ck, out[name], ConvertOptions(quiet=True, **opts))
    return out


def _tight(path, device="cpu"):
    """The smallest budget that runs the pack (depth 1): everything but the required units streams."""
    return load(path, device=device).minimum_memory()


@pytest.mark.parametrize("kind", ["fp32", "int8z"])
def test_stream_stats_and_default_depth_on_cpu(packs, kind):
    budget = _tight(packs[kind])
    m = load(packs[kind], max_memory=budget)
    assert m.streamer is not None and m.prefetch_depth == 1 and len(m.streamer.slots) == 2  # CPU default: 1 ahead
    ids = [1, 5, 9, 13]
    assert m.generate_ids(ids, max_new_tokens=4) == load(packs[kind]).generate_ids(ids, max_new_tokens=4)
    s = m.stream_stats()
    payload = sum(m._files[u].file_size - m._files[u].data_start for u in m.streamer.order)
    assert s.bytes_read >= 4 * payload and s.units_read >= 4 * len(m.streamer.order)
    assert 0 < s.io_s <= s.read_s and s.read_gbps > 0
    assert s.h2d_bytes == 0 and s.h2d_s == 0 and s.overlap == 0  # no copies to a device on CPU
    line = m.streamer.summary()
    assert "GB/s" in line and "host->device" not in line and "prefetch depth 1" in line
    deep = load(packs[kind], max_memory=load(packs[kind], prefetch_depth=2).minimum_memory(), prefetch_depth=2)
    assert deep.prefetch_depth == 2 and len(deep.streamer.slots) == 3
    assert deep.generate_ids(ids, max_new_tokens=4) == m.generate_ids(ids, max_new_tokens=4)
    with pytest.raises(LayerpackError, match="prefetch_depth must be"):
        load(packs[kind], prefetch_depth=0)


def test_cli_stats_prints_the_read_speed(packs):
    budget = load(packs["fp32"], context=16).minimum_memory()  # the run's workload (a short prompt + 3) needs less
    r = run_cli("run", packs["fp32"], "hello", "--max-new-tokens", "3", "--max-memory", f"{budget}B", "--stats", check=True)
    line = next(l for l in r.stderr.splitlines() if l.startswith("streaming: read"))
    assert " GB/s" in line and "stream slots: 2 x" in r.stderr


# -- CUDA: device twins, events, copy timing ------------------------------------------------------------

@CUDA
@pytest.mark.parametrize("kind", ["fp32", "int8z"])
def test_cuda_streaming_matches_resident_and_times_copies(packs, kind):
    dev = torch.device("cuda")
    resident = load(packs[kind], device="cuda", weight_form="stored")  # streamed units compute from the stored form too
    need2 = load(packs[kind], device="cuda", prefetch_depth=2).minimum_memory()
    m = load(packs[kind], device="cuda", max_memory=need2)
    assert m.prefetch_depth == 2 and len(m.streamer.slots) == 3  # CUDA default when the budget holds 3 slots
    assert all(s.host.is_pinned() and s.device.device.type == "cuda" for s in m.streamer.slots)
    assert load(packs[kind], device="cuda", max_memory=need2 - 1).prefetch_depth == 1  # no room for a third slot
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(m.logits(ids), resident.logits(ids))
    twins = [s.device.data_ptr() for s in m.streamer.slots]
    # The first generations make one-time allocations (the cuBLAS workspace of the stream a decode
    # graph is warmed on: 32 MiB on an H200, kernel tables); later ones must allocate nothing that stays.
    assert m.generate_ids([1, 5, 9], max_new_tokens=6) == resident.generate_ids([1, 5, 9], max_new_tokens=6)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(dev)
    assert m.generate_ids([1, 5, 9], max_new_tokens=6) == resident.generate_ids([1, 5, 9], max_new_tokens=6)
    torch.cuda.synchronize()
    assert [s.device.data_ptr() for s in m.streamer.slots] == twins  # the twins are never reallocated
    assert torch.cuda.memory_allocated(dev) - before < min(s.device.numel() for s in m.streamer.slots)
    s = m.stream_stats()
    assert s.h2d_bytes > 0 and s.h2d_s > 0 and 0 < s.h2d_gbps < 1000 and 0 <= s.overlap <= 1
    assert s.h2d_bytes <= sum(lay.used for lay in m.streamer.layouts.values()) * s.units_read
    assert "host->device" in m.streamer.summary()
