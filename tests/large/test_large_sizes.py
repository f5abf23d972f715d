"""Paths that only break at 405B size, tested at CI size (issue 12, item 5): reads above 2 GiB, files
above 4 GiB, tensors of 2^31 elements or more with int64 outlier indices, headers of large layers,
and the planner's and the KV cache's arithmetic at Llama 3.1 405B's dimensions.

How without the big files: sparse files (tests/support/sparse_pack.py: a valid header, then a hole; real
bytes only where a test reads them, e.g. past 2^32), a per-call cap on os.preadv (so the read loop
runs many times on small files, as it does once past 0x7ffff000 bytes), a threshold lowered by
monkeypatch (int64 indices on a small tensor), and a few real large objects where they are cheap:
one read of 2.2 GB from a sparse file and one NF4 weight of 2^31 + 16384 elements (1 GiB of codes).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time

import pytest
import torch

from conftest import make_checkpoint, write_tiny_tokenizer
from support.sparse_pack import LLAMA_405B, sparse_pack, write_sparse_safetensors
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime import fileio, loader
from layerpack_runtime.budget import fmt_size
from layerpack_runtime.errors import FormatError, LayerpackError
from layerpack_runtime.format import MAX_HEADER_BYTES
from layerpack_runtime.pack import Pack
from layerpack_runtime.safetensors_io import SafetensorsFile
from layerpack_runtime.streaming import FileRows, UnitStreamer

LINUX_READ_MAX = 0x7FFFF000  # the most one read()/pread()/preadv() returns on Linux
GiB = 1 << 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama checkpoint and its NF4 pack with outlier tables (the template of the sparse packs)."""
    root = tmp_path_factory.mktemp("large")
    ckpt = make_checkpoint(root / "ckpt", "llama")
    write_tiny_tokenizer(ckpt)
    pack = str(root / "nf4")
    convert(ckpt, pack, ConvertOptions(quant="nf4", outliers=0.01, quiet=True))
    return {"root": root, "ckpt": ckpt, "nf4": pack}


def cap_preadv(monkeypatch, cap: int) -> list[int]:
    """Make every os.preadv return at most `cap` bytes (as Linux does at 0x7ffff000); returns the list
    of byte counts of the calls made."""
    real, calls = os.preadv, []

    def capped(fd, buffers, offset):
        n = real(fd, [memoryview(buffers[0]).cast("B")[:cap]], offset)
        calls.append(n)
        return n

    monkeypatch.setattr(os, "preadv", capped)
    return calls


# -- 1. reads above 2 GiB ---------------------------------------------------------------------------

def test_read_fully_loops_over_short_reads(tmp_path, monkeypatch):
    data = os.urandom(100_003)
    path = tmp_path / "f"
    path.write_bytes(data)
    calls = cap_preadv(monkeypatch, 4093)
    buf = bytearray(90_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fileio.read_fully(fd, buf, 7) == 90_000 and bytes(buf) == data[7:90_007]
        assert len(calls) == math.ceil(90_000 / 4093)  # a single call would have filled 4093 bytes
        # the file ends first: the bytes there, then a FormatError naming the file (never a hang)
        assert fileio.read_fully(fd, buf, 50_000) == 50_003
        with pytest.raises(FormatError, match=r"short read of layer x \(50003 of 90000 bytes at byte 50000\)"):
            fileio.read_exact(fd, buf, 50_000, str(path), "layer x")
    finally:
        os.close(fd)


def test_every_payload_reader_loops(tiny, monkeypatch):
    """Resident loads (SafetensorsFile.read), the streamer, embedding rows: with every os.preadv cut
    to 1000 bytes (odd, so cuts fall inside elements), a forward gives the same logits as uncut."""
    ids = torch.tensor([[5, 17, 42, 99]])
    want = loader.load(tiny["nf4"]).logits(ids)
    calls = cap_preadv(monkeypatch, 1000)
    resident = loader.load(tiny["nf4"])
    budget = resident.minimum_memory()
    streamed = loader.load(tiny["nf4"], max_memory=budget)
    assert streamed.plan.streamed and streamed._embed_rows is not None  # blocks streamed, embedding rows from the file
    assert torch.equal(resident.logits(ids), want)
    assert torch.equal(streamed.logits(ids), want)
    assert len(calls) > 100 and max(calls) == 1000


def test_converter_reads_loop(tiny, tmp_path, monkeypatch):
    """The converter reads source tensors through the same loop: cut reads give the same bytes."""
    cap_preadv(monkeypatch, 777)
    convert(tiny["ckpt"], str(tmp_path / "p"), ConvertOptions(quant="nf4", outliers=0.01, quiet=True))
    for rel in sorted(os.listdir(os.path.join(tiny["nf4"], "layers"))):
        with open(os.path.join(tiny["nf4"], "layers", rel), "rb") as a, open(tmp_path / "p" / "layers" / rel, "rb") as b:
            assert a.read() == b.read(), rel


@pytest.mark.slow
def test_one_read_above_2gib(tmp_path):
    """A real streamed unit of 2.2 GB (sparse: zeros, with marks across the file's 2 GiB boundary, across
    the end of what one call returns, and at the end): the streamer's read gets all of it, while one
    os.preadv into the same buffer stops at 0x7ffff000 bytes (so this test fails with a single call).
    Cost: faulting in 2.2 GB of fresh memory (about 1 s on a quiet machine, 10+ s on a loaded VM)."""
    n = 2 * GiB + 200 * (1 << 20)
    marks = {2 * GiB - 8 - 500: os.urandom(1024),        # the file's 2 GiB (the header is small)
             LINUX_READ_MAX - 500: os.urandom(1024),     # where the first call stops
             n - 1024: os.urandom(1024)}                 # the last bytes
    res = write_sparse_safetensors(str(tmp_path / "u.safetensors"), "block.000", {"w": ("U8", (n,))},
                                   {"w": list(marks.items())})
    st = SafetensorsFile(tmp_path / "u.safetensors")
    streamer = UnitStreamer({"block.000": st}, ["block.000"], n, torch.device("cpu"))
    try:
        t0 = time.perf_counter()
        w = streamer.get("block.000")["w"]
        took = time.perf_counter() - t0
        assert w.numel() == n and streamer.stats.bytes_read == n
        for at, mark in marks.items():
            assert bytes(w[at:at + len(mark)].numpy()) == mark, at
        assert not bool(w[:1 << 20].any())
        fd = os.open(st.path, os.O_RDONLY)
        try:  # the kernel's limit, on the same (now faulted-in) buffer
            assert os.preadv(fd, [memoryview(streamer.held.host.numpy())], res["data_start"]) == LINUX_READ_MAX
        finally:
            os.close(fd)
        print(f"\n2.2 GB unit read in {took:.2f} s")
    finally:
        streamer.release()
        streamer.close()


# -- 2. files above 4 GiB ---------------------------------------------------------------------------

# A tied, unquantized pack whose embedding file is 4,295,000,064 + header bytes (> 2^32): vocabulary
# 131073 x hidden 16384 in bf16; everything else tiny (1 head of 8, intermediate 2, one block).
BIG_EMBED = dict(vocab_size=131073, hidden_size=16384, intermediate_size=2, num_layers=1, num_heads=1, num_kv_heads=1,
                 head_dim=8, tie_word_embeddings=True)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_file_above_4gib(tiny, tmp_path):
    """Header offsets past 2^32, manifest sizes past 2^32 (reader and JSON schema), embedding rows read
    past 2^32, and verify's hashing of the 4.3 GB file in bounded memory (a sparse file hashes zeros)."""
    from layerpack.schema import schema_errors
    from layerpack.verify import verify_pack

    row = 16384 * 2
    rows = {0: os.urandom(row), 65536: os.urandom(row), 131071: os.urandom(row), 131072: os.urandom(row)}
    written = sparse_pack(str(tmp_path / "p"), tiny["nf4"], BIG_EMBED, scheme="none",
                          fill={"embed": {"embed.weight": [(r * row, b) for r, b in rows.items()]}})
    embed = written["embed"]
    assert embed["size"] > 1 << 32
    raw = json.load(open(tmp_path / "p" / "manifest.json"))
    assert schema_errors(raw) == []  # sizes, layer_bytes > 2^32: JSON Schema integers have no 32-bit bound
    pack = Pack(str(tmp_path / "p"))  # sizes checked on disk, the header validated against the manifest
    st = pack.layer_file("embed")
    info = st.tensors["embed.weight"]
    assert info.end == st.file_size > 1 << 32 and info.shape == (131073, 16384)
    # the last row starts exactly at 2^32 bytes into the data: read by offset, not by a 32-bit product
    fr = FileRows(st.path, info.start, info.shape, torch.bfloat16, torch.bfloat16)
    got = fr.rows(torch.tensor([131072, 0, 131071, 65536, 131072], dtype=torch.int32))
    for i, r in enumerate([131072, 0, 131071, 65536, 131072]):
        assert bytes(got[i].contiguous().view(torch.uint8).numpy()) == rows[r], r  # bytes: random bits hold NaNs
    # verify: the layer file's sha256 is a placeholder, so exactly that mismatch is reported, after
    # hashing all 4.3 GB in chunks: memory stays flat (sampled while it runs)
    peak, base, done = [0], _rss(), threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    try:
        problems = verify_pack(str(tmp_path / "p"), quiet=True)
    finally:
        done.set()
        t.join()
    assert problems == ["layers/embed.safetensors: sha256 mismatch (file is corrupt or was modified)"]
    assert peak[0] - base < 64 << 20, f"verify grew RSS by {(peak[0] - base) >> 20} MiB"
    print(f"\nverify hashed {embed['size'] / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s, RSS +{(peak[0] - base) >> 20} MiB")


def test_truncated_big_file_is_refused(tiny, tmp_path):
    """A file cut short of what its header declares past 4 GiB: refused at open, never read short."""
    written = sparse_pack(str(tmp_path / "p"), tiny["nf4"], BIG_EMBED, scheme="none")
    path = tmp_path / "p" / "layers" / "embed.safetensors"
    os.truncate(path, written["embed"]["size"] - 1)
    with pytest.raises(FormatError, match="truncated"):
        SafetensorsFile(path)
    with pytest.raises(FormatError, match="embed.safetensors: size"):
        Pack(str(tmp_path / "p"))


# -- 4. headers, the planner and the KV cache at Llama 3.1 405B's dimensions --------------------------

H, I, V, L, HEADS, KV, HD = 16384, 53248, 128256, 126, 128, 8, 128
LINEARS = {"attn.q.weight": HEADS * HD * H, "attn.k.weight": KV * HD * H, "attn.v.weight": KV * HD * H,
           "attn.o.weight": H * HEADS * HD, "mlp.gate.weight": I * H, "mlp.up.weight": I * H, "mlp.down.weight": H * I}


def _stored_bytes(n: int, scheme: str, frac: float) -> int:
    """Bytes of one quantized weight of n elements as the format stores it (FORMAT.md)."""
    k = round(frac * n)
    codes = {"nf4": (n + 1) // 2, "int8": n, "none": 2 * n}[scheme]
    scales = 0 if scheme == "none" else -(-n // {"nf4": 64, "int8": 128}[scheme]) * 4
    return codes + scales + k * ((4 if n < 2 ** 31 else 8) + 2)


@pytest.fixture(scope="module")
def packs_405b(tiny, tmp_path_factory):
    """Sparse packs with all 126 blocks of Llama 3.1 405B, in nf4 (+ outliers 0.001), int8 and bf16."""
    root = tmp_path_factory.mktemp("405b")
    out = {}
    for scheme, bs, frac in (("nf4", 64, 0.001), ("int8", 128, 0.0), ("none", None, 0.0)):
        out[scheme] = (str(root / scheme), sparse_pack(str(root / scheme), tiny["nf4"], LLAMA_405B, scheme, bs, frac), frac)
    return out


@pytest.mark.parametrize("scheme", ["nf4", "int8", "none"])
def test_405b_headers_and_unit_sizes(packs_405b, scheme):
    path, written, frac = packs_405b[scheme]
    block = sum(_stored_bytes(n, scheme, frac) for n in LINEARS.values()) + 2 * H * 2  # + two norms
    head = _stored_bytes(V * H, scheme, frac) + H * 2
    pack = Pack(path)
    for layer in pack.manifest.layers:
        st = pack.layer_file(layer)  # parsed and checked against the manifest
        assert st.data_start - 8 < 8192 < MAX_HEADER_BYTES  # a 405B unit's header is a few KiB
    st = pack.layer_file("block.000")
    assert st.file_size - st.data_start == block
    assert pack.layer_file("head").file_size - pack.layer_file("head").data_start == head
    assert pack.layer_file("embed").file_size - pack.layer_file("embed").data_start == V * H * 2  # never quantized
    if scheme == "none":  # 6.4 GB per block: offsets past 2^32 in the header
        assert block > 6e9 and max(i.end for i in st.tensors.values()) > 1 << 32
    assert pack.manifest.totals["params"] == L * (sum(LINEARS.values()) + 2 * H) + 2 * V * H + H  # 405.85B
    assert 405e9 < pack.manifest.totals["params"] < 406e9


@pytest.mark.parametrize("scheme", ["nf4", "int8", "none"])
def test_405b_planner_and_kv(packs_405b, scheme, monkeypatch):
    """Unit costs, KV and the plan at 405B, each checked against numbers computed here; resident loads
    are recorded, not performed (the payloads are holes)."""
    from layerpack_runtime.cache import KVCache

    path, written, frac = packs_405b[scheme]
    loads: list = []
    monkeypatch.setattr(loader.LayeredModel, "_load_resident", lambda self, name, deq: loads.append(name))
    m = loader.LayeredModel(Pack(path), max_memory="64GB", context=256)
    # KV cache: 2 (k, v) x 126 layers x 8 KV heads x 128 x 2 bytes (bf16) = 516,096 bytes per token
    assert m.kv_bytes(1) == 2 * 126 * 8 * 128 * 2 == 516_096
    assert m.kv_bytes(131072) == 516_096 * 131072 > 1 << 32  # the full 128K context: 67.6 GB
    cache = KVCache(L, 1, KV, 256, HD, torch.bfloat16)
    assert sum(t.k.numel() * 2 + t.v.numel() * 2 for t in cache.layers) == m.kv_bytes(256)
    del cache
    # activations of a 256-token prefill: hidden/MLP buffers, scores, logits, one dequantized chunk
    t = 256
    act = t * (8 * H + 3 * I) * 4 + HEADS * t * t * 4 + V * 4 * 2 + (((1 << 21) * (4 + 2)) if scheme != "none" else 0)
    assert m.activation_bytes(256) == act
    block = written["block.000"]["size"] - written["block.000"]["data_start"]
    head = written["head"]["size"] - written["head"]["data_start"]
    cost = {u: m._unit_cost(u) for u in m.units}
    assert cost["block.000"].stored == cost["block.000"].streamed == block
    assert cost["block.000"].dequantized == (sum(LINEARS.values()) + 2 * H) * 2
    assert cost["embed"].streamed == 0  # untied, unquantized: rows come from the file (FileRows)
    fixed = m.kv_bytes(256) + act + m.runtime_bytes()
    assert m.minimum_memory() == fixed + 2 * max(block, head)
    # the plan at 64 GB: head first, then blocks in order, in the stored form; everything counted
    p = m.plan
    assert p.total <= 64e9 and p.total == p.weights_bytes + p.buffer_bytes + p.kv_bytes + p.activation_bytes + p.runtime_bytes
    n_res = sum(1 for u in p.resident if u.startswith("block."))
    assert "head" in p.resident and p.resident["head"] is (scheme == "none")  # bf16: stored == dequantized
    assert set(p.resident) == {"head", *(f"block.{i:03d}" for i in range(n_res))} and loads == list(p.resident)
    assert p.weights_bytes == head + n_res * block and p.buffer_bytes == 2 * block
    assert head + (n_res + 1) * block + 2 * block + fixed > 64e9  # one more block would not fit
    print(f"\n405B {scheme}: block {block / 1e9:.2f} GB, minimum {m.minimum_memory() / 1e9:.2f} GB, "
          f"at 64 GB {n_res} of 126 blocks resident")
    # 8 GB (the seeds' budget): fits NF4 and int8 (two 1.8 / 3.3 GB stream buffers), not bf16 (6.4 GB each)
    if scheme == "none":
        need = re.escape(fmt_size(fixed + 2 * block, up=True))  # 12.4 GiB (named rounded up): two 6.4 GB stream buffers + KV + activations
        with pytest.raises(LayerpackError, match=rf"max_memory 7\.5 GiB is below this pack's minimum of {need} "):
            loader.LayeredModel(Pack(path), max_memory="8GB", context=256)
    else:
        assert loader.LayeredModel(Pack(path), max_memory="8GB", context=256).plan.total <= 8e9


# -- 3. tensors of 2^31 elements or more: int64 outlier indices -----------------------------------

def test_outlier_index_dtype_rule():
    """The format's rule (FORMAT.md, Outlier tables): int32 below 2^31 entries, int64 from 2^31 on,
    decided by the element count alone; 405B's embedding/head (2,101,346,304) stays below it."""
    from layerpack_runtime.manifest import TensorEntry
    from layerpack_runtime.validate import stored_spec

    def idx_dtype(shape):
        return stored_spec(TensorEntry("head.weight", list(shape), "nf4", 64, 3), "BF16")["head.weight.outlier_idx"][0]

    assert idx_dtype([V, H]) == "I32" and V * H < 2 ** 31
    assert idx_dtype([46340, 46340]) == "I32" and 46340 ** 2 < 2 ** 31 < 46341 ** 2
    assert idx_dtype([2 ** 31 - 1]) == "I32"
    assert idx_dtype([2 ** 31]) == "I64" and idx_dtype([46341, 46341]) == "I64"
    assert idx_dtype([131073, 16384]) == "I64"  # a 131K x 16K table: 2^31 + 16384 entries


def _with_int64_indices(src: str, out: str) -> None:
    """A copy of pack `src` whose outlier tables are stored as int64 (as the converter writes them
    for tensors of 2^31 entries or more), with the manifest's sizes and hashes updated."""
    from layerpack.writer import write_safetensors

    shutil.copytree(src, out)
    m = json.load(open(os.path.join(out, "manifest.json")))
    files = {f["path"]: f for f in m["files"]}
    for layer in m["layers"]:
        path = os.path.join(out, layer["file"])
        st = SafetensorsFile(path)
        tensors = st.read()
        if not any(k.endswith(".outlier_idx") for k in tensors):
            continue
        tensors = {k: v.long() if k.endswith(".outlier_idx") else v for k, v in tensors.items()}
        size, sha = write_safetensors(path, tensors, layer["name"])
        files[layer["file"]].update(size=size, sha256=sha)
    m["totals"]["layer_bytes"] = sum(files[l["file"]]["size"] for l in m["layers"])
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(m, f, indent=1, sort_keys=True)


def test_int64_outlier_indices_run_like_int32(tiny, tmp_path, monkeypatch):
    """With the 2^31 threshold lowered to 0 (so the tiny pack's tensors count as huge), int64 tables are
    what the reader demands: the int32 pack is refused, and the int64 pack gives the int32 pack's
    logits bit for bit - resident and streamed, native kernels and the pure-torch path - and verifies.
    Without the patch the int64 pack is refused (the rule holds both ways)."""
    from layerpack_runtime import kernels
    from layerpack_runtime.validate import layer_headers  # the stored layout (its int64 threshold)

    from layerpack.verify import verify_pack

    big = str(tmp_path / "i64")
    _with_int64_indices(tiny["nf4"], big)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    want = loader.load(tiny["nf4"]).logits(ids)
    with pytest.raises(FormatError, match=r"outlier_idx' is stored as I64\[\d+\], the manifest entry implies I32"):
        loader.load(big)
    monkeypatch.setattr(layer_headers, "OUTLIER_IDX_I64_FROM", 0)
    with pytest.raises(FormatError, match=r"outlier_idx' is stored as I32\[\d+\], the manifest entry implies I64"):
        loader.load(tiny["nf4"])
    resident = loader.load(big)
    qw = resident.weights_for("block.000")["mlp.up.weight"]
    assert qw.outlier_idx.dtype == torch.int64 and qw.outlier_idx.numel() > 0
    assert torch.equal(resident.logits(ids), want)
    streamed = loader.load(big, max_memory=resident.minimum_memory())
    assert streamed.plan.streamed and torch.equal(streamed.logits(ids), want)
    assert verify_pack(big, quiet=True) == []
    monkeypatch.setattr(kernels, "native", lambda: None)  # the pure-torch fallback: int64 == int32 there too
    torch_path = loader.load(big).logits(ids)
    monkeypatch.setattr(layer_headers, "OUTLIER_IDX_I64_FROM", 1 << 31)
    assert torch.equal(torch_path, loader.load(tiny["nf4"]).logits(ids))


def test_tensor_of_2_31_elements(monkeypatch):
    """One real NF4 weight of 131073 x 16384 = 2^31 + 16384 elements (1 GiB of codes): zero everywhere
    (code 7) except known values in its first and last rows and int64 outliers on both sides of 2^31.
    Row gathers, row slices and the native matvec over all of it match values computed here from
    the few non-zero entries; the pure-torch fallback agrees on the slices and gathers."""
    from layerpack_runtime import kernels
    from layerpack_runtime.format import NF4_CODE
    from layerpack_runtime.qweight import QuantWeight

    rows, cols, bs = 131073, 16384, 64
    n = rows * cols
    assert n == 2 ** 31 + 16384
    codes = torch.full(((n + 1) // 2,), 0x77, dtype=torch.uint8)   # NF4 code 7 = 0.0 in both nibbles
    absmax = torch.ones(-(-n // bs), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    planted = {0: None, rows - 2: None, rows - 1: None}           # rows given random codes and scales
    for r in planted:
        c = torch.randint(0, 256, (cols // 2,), dtype=torch.uint8, generator=g)
        s = torch.rand(cols // bs, generator=g) + 0.5
        codes[r * cols // 2:(r + 1) * cols // 2] = c
        absmax[r * cols // bs:(r + 1) * cols // bs] = s
        pairs = torch.stack([c >> 4, c & 15], 1).reshape(-1).long()
        planted[r] = torch.tensor(NF4_CODE)[pairs] * s.repeat_interleave(bs)
    # outliers (codes there are the zero code): at the start, just below and at 2^31, and at the end
    idx = torch.tensor([5, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 7, n - 1], dtype=torch.int64)
    val = torch.tensor([1.5, -2.0, 3.0, -4.5, 6.0], dtype=torch.bfloat16)
    for i in idx.tolist():
        r, c = divmod(i, cols)
        if r in planted:
            planted[r][c] = 0.0
        b = i // 2
        codes[b] = (codes[b] & 0x0F) | 0x70 if i % 2 == 0 else (codes[b] & 0xF0) | 0x07
    dense = {r: v.clone() for r, v in planted.items()}  # the expected rows, outliers included
    dense.setdefault(2 ** 31 // cols - 1, torch.zeros(cols))
    dense.setdefault(2 ** 31 // cols, torch.zeros(cols))
    for i, v in zip(idx.tolist(), val.float().tolist()):
        r, c = divmod(i, cols)
        dense.setdefault(r, torch.zeros(cols))[c] = v
    w = QuantWeight("nf4", (rows, cols), bs, codes, absmax, idx, val, torch.float32)

    def check(tag):
        ids = torch.tensor([rows - 1, 0, 2 ** 31 // cols, rows - 2, 2 ** 31 // cols - 1], dtype=torch.int32)
        got = w.rows(ids)
        for k, r in enumerate(ids.tolist()):
            assert torch.equal(got[k], dense[r]), (tag, r)
        part = w.row_slice(2 ** 31 // cols - 1, rows)  # rows across 2^31, the last one included
        assert part.outlier_idx.dtype == torch.int64 and part.outlier_idx.tolist() == [cols - 1, cols, cols + 7, 2 * cols - 1]
        deq = part.dequantize()
        assert torch.equal(deq[0], dense[2 ** 31 // cols - 1]) and torch.equal(deq[1], dense[2 ** 31 // cols])
        assert torch.equal(deq[-1], dense[rows - 1]) and torch.equal(deq[-2], dense[rows - 2])

    check("native")
    x = torch.randn(1, cols, generator=g)
    y = w.linear(x)  # native matvec over all 2^31 + 16384 entries, outliers past 2^31 included
    want = torch.zeros(rows)
    for r, v in dense.items():
        want[r] = (v.double() @ x[0].double()).float()
    assert torch.allclose(y[0], want, rtol=1e-4, atol=1e-3)
    zero = torch.ones(rows, dtype=torch.bool)
    zero[list(dense)] = False
    assert not bool(y[0][zero].any())  # rows of zero codes give exactly 0: no read went astray
    x16 = x.to(torch.bfloat16)  # bfloat16 activations: the one-row VDPBF16PS kernel (bf16-rounded weights)
    y16 = w.linear(x16)
    want16 = torch.zeros(rows)
    for r, v in dense.items():
        want16[r] = (v.to(torch.bfloat16).double() @ x16[0].double()).float()
    assert y16.dtype == torch.bfloat16 and torch.allclose(y16[0].float(), want16, rtol=1e-2, atol=1e-2)
    assert not bool(y16[0][zero].any())
    monkeypatch.setattr(kernels, "native", lambda: None)
    check("torch")


def test_torch_dequantization_in_bounded_steps(monkeypatch):
    """The pure-torch dequantization works in steps of whole blocks (its temporaries are several times
    the output: a whole 405B head at once would need ~20 GB of them); any step gives the same bits."""
    from layerpack_runtime import quant

    g = torch.Generator().manual_seed(0)
    for scheme, shape, bs in (("nf4", (37, 65), 64), ("nf4", (64, 64), 64), ("nf4", (7,), 2), ("nf4", (10, 10), 6),
                              ("int8", (3, 1001), 128), ("int8", (64, 64), 128), ("int8", (5, 3), 2)):
        n = math.prod(shape)
        codes = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g) if scheme == "nf4" else \
            torch.randint(-127, 128, (n,), dtype=torch.int8, generator=g)
        absmax = torch.rand(-(-n // bs), generator=g)
        fn = quant.dequantize_nf4 if scheme == "nf4" else quant.dequantize_int8
        whole = fn(codes, absmax, shape, bs, torch.bfloat16)
        for step in (1, 2, 3, 64, 130, 4096):
            monkeypatch.setattr(quant, "DEQUANT_CHUNK", step)
            got = fn(codes, absmax, shape, bs, torch.bfloat16)
            assert got.shape == shape and torch.equal(got.view(torch.int16), whole.view(torch.int16)), (scheme, shape, step)
        monkeypatch.setattr(quant, "DEQUANT_CHUNK", 1 << 24)


# -- 5. the Hub: sha256 computed while the bytes stream, not in a second pass ----------------------

# Runs in a subprocess (huggingface_hub reads HF_ENDPOINT at import), one job after another (one
# process: imports cost more than the jobs). Download chunks of 4 KiB (the client's default is 10 MiB)
# stand in for a multi-GB body of many chunks. Prints, per job, as JSON: the files hashed by a second
# read (layerpack's fallback check, or the client's own hashing before an upload), and the chunks and
# bytes hashed as they streamed.
_HUB_SCRIPT = r"""
import json, sys
from huggingface_hub import constants, lfs
import layerpack_runtime.remote as remote
from layerpack_runtime import stream_hash
constants.DOWNLOAD_CHUNK_SIZE = 4096
real_file, real_write, real_sha = remote.sha256_file, stream_hash._HashingFile.write, lfs.sha_fileobj
def counted_file(path, progress=None):
    count["second"].append(path.rsplit("/", 1)[-1])
    return real_file(path, progress)
def counted_write(self, data):
    count["chunks"] += 1
    count["bytes"] += len(data)
    return real_write(self, data)
def counted_sha(f, *a, **k):
    count["second"].append(getattr(f, "name", "?").rsplit("/", 1)[-1])
    return real_sha(f, *a, **k)
remote.sha256_file, stream_hash._HashingFile.write, lfs.sha_fileobj = counted_file, counted_write, counted_sha
from layerpack.hub import pull, push
from layerpack_runtime import load
for mode, repo, arg, layers in json.loads(sys.argv[1]):
    count = {"second": [], "chunks": 0, "bytes": 0}
    if mode == "pull":
        pull(repo, arg, layers=layers, quiet=True)
    elif mode == "push":
        push(arg, repo, quiet=True)
    else:
        model = load(repo)
        model.generate_ids([5, 17], max_new_tokens=2)
        for rel in model.pack.pending():
            model.pack.ensure(rel)
    count["second"].sort()
    print(json.dumps(count), flush=True)
"""


@pytest.fixture(scope="module")
def hub(tiny):
    from support.hub_server import HubServer

    with HubServer(write_token=HUB_TOKEN) as server:
        server.add_repo("tiny/nf4", tiny["nf4"])
        yield server


HUB_TOKEN = "hf_largeSizesWriteToken0123456789"


def _pack_paths(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root).replace(os.sep, "/") for d, _, ns in os.walk(root)
            if ".cache" not in os.path.relpath(d, root) for n in ns}


@pytest.mark.slow
def test_hub_hashes_while_the_bytes_stream(hub, tiny, tmp_path):
    """pull (whole, then --layers) and a lazy `run owner/name` check every file's sha256 without reading
    it again; a pull into a folder that already holds the files hashes those (nothing downloaded);
    push hashes each file once (verify) and hands the digests to the client, which would otherwise
    read every file again before the upload."""
    import subprocess
    import sys

    m = json.load(open(os.path.join(tiny["nf4"], "manifest.json")))
    sizes = {f["path"]: f["size"] for f in m["files"]}
    layer_bytes = sum(s for p, s in sizes.items() if p.startswith("layers/"))
    jobs = [("pull", "tiny/nf4", str(tmp_path / "out"), None), ("pull", "tiny/nf4", str(tmp_path / "out"), None),
            ("pull", "tiny/nf4", str(tmp_path / "part"), "embed,1,head"), ("lazy", "tiny/nf4", None, None),
            ("push", "tiny/pushed", tiny["nf4"], None)]
    env = {**os.environ, **hub.client_env(tmp_path / "home", HUB_TOKEN)}
    proc = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, json.dumps(jobs)], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh, again, part, lazy, pushed = (json.loads(l) for l in proc.stdout.strip().splitlines()[-5:])
    assert fresh["second"] == [] and fresh["bytes"] == sum(sizes.values())
    assert fresh["chunks"] >= sum(-(-s // 4096) for s in sizes.values())  # hashed chunk by chunk, as written
    assert again["bytes"] == 0 and len(again["second"]) == len(sizes)    # already there: hashed by a read
    want = {p for p in sizes if not p.startswith("layers/")} | {f"layers/{u}.safetensors" for u in ("embed", "block.001", "head")}
    assert part["second"] == [] and part["bytes"] == sum(sizes[p] for p in want)
    assert _pack_paths(tmp_path / "part") == want | {"manifest.json"}
    assert lazy["second"] == [] and lazy["bytes"] >= layer_bytes          # run owner/name: every layer file
    assert pushed["second"] == []                                          # the client re-hashed nothing
    assert {f["sha256"] for f in m["files"] if f["path"].startswith("layers/")} <= set(hub.uploads)  # server-checked


class _FakeBody:
    """A streamed answer of `size` bytes (byte i is i % 251), made chunk by chunk as read: a 6 GB layer
    file that costs nothing unless a client reads it all. Counts the bytes handed out."""

    def __init__(self, status: int, size: int, start: int = 0, chunk: int = 1 << 20):
        self.status_code, self.size, self.start, self.chunk, self.sent = status, size, start, chunk, 0
        self.headers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def raise_for_status(self):
        return self

    def iter_bytes(self):
        pos = self.start
        while pos < self.size:
            n = min(self.chunk, self.size - pos)
            self.sent += n
            yield bytes((pos + i) % 251 for i in range(min(n, 4096))) + bytes(max(0, n - 4096))
            pos += n


def _expected(start: int, n: int) -> bytes:
    """_FakeBody's bytes start .. start + n (its chunks hold the pattern only in their first 4 KiB)."""
    chunk, out = 1 << 20, bytearray()
    for p in range(start, start + n):
        out.append(p % 251 if p % chunk < 4096 else 0)
    return bytes(out)


def test_ranged_read_keeps_only_what_it_asked_for(monkeypatch):
    """The lazy runner's header probe (remote._ranged): a server that ignores the Range header and
    answers 200 with a whole 6 GB layer file costs one chunk beyond the bytes asked for, not 6 GB of
    memory; a 206 answer is taken as it comes; offsets past 2^32 are plain numbers."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import utils as hf_utils

    from layerpack_runtime.remote import RemotePack

    answers: list[_FakeBody] = []

    class Session:
        def stream(self, method, url, headers, follow_redirects):
            start, end = (int(x) for x in headers["Range"].split("=")[1].split("-"))
            body = self.next(start, end)
            answers.append(body)
            return body

    session = Session()
    monkeypatch.setattr(hf_utils, "get_session", lambda: session)
    rp = RemotePack.__new__(RemotePack)
    rp.repo_id, rp.commit, rp.revision, rp.token = "owner/big", "0" * 40, None, None
    size = 6_400_000_000
    session.next = lambda s, e: _FakeBody(200, size)  # Range ignored: the whole file from byte 0
    assert rp._ranged("layers/block.000.safetensors", 0, 65535) == _expected(0, 65536)
    assert answers[-1].sent <= 1 << 20
    assert rp._ranged("layers/block.000.safetensors", 5_000_000, 5_000_099) == _expected(5_000_000, 100)
    assert answers[-1].sent <= 5_000_100 + (1 << 20)
    session.next = lambda s, e: _FakeBody(206, e + 1, start=s)  # honoured, past 2^32
    assert rp._ranged("layers/block.000.safetensors", 5 << 30, (5 << 30) + 99) == _expected(5 << 30, 100)


def test_hostile_header_length_is_not_fetched(tmp_path):
    """A remote layer file whose 8-byte header length claims (nearly) the whole 6.4 GB file: the lazy
    runner refuses it from the first 64 KiB, without asking for the rest (which it would hold in memory)."""
    import struct
    from types import SimpleNamespace

    from layerpack_runtime.remote import HEADER_PROBE, RemotePack

    size = 6_400_000_000
    calls: list[tuple[int, int]] = []
    rp = RemotePack.__new__(RemotePack)
    rp.path, rp._cached = str(tmp_path), set()
    rp._entries = {"layers/block.000.safetensors": SimpleNamespace(size=size)}
    rp.is_local = lambda layer: False

    def ranged(rel, start, end):
        calls.append((start, end))
        assert end - start < HEADER_PROBE, f"asked for bytes {start}-{end} of a hostile header"
        return (struct.pack("<Q", size - 8) + b"{" * (end - start + 1))[:end - start + 1]

    rp._ranged = ranged
    with pytest.raises(FormatError, match="header length 6399999992 does not fit"):
        rp._header_of(SimpleNamespace(file="layers/block.000.safetensors"))
    assert calls == [(0, HEADER_PROBE - 1)]
