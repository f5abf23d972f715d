"""The converter at scale, with small stand-ins: tensors larger than one window are read, quantized
and written window by window (streamquant.py, writer.UnitWriter) and must give exactly what the
whole-tensor computation gives; a kill -9 in the middle of a unit resumes to the same bytes."""
from __future__ import annotations

import json
import os

import pytest
import torch

from layerpack.quantizer import InMemory, OUTLIER_RULES, quantize_tensor, select_outliers_by, select_outliers_stream
from layerpack.quantizer import Calibrated, activation_aware, parallel, windows
from layerpack.quantizer.activation_aware import METHODS
from layerpack.source import FileTensor
from layerpack.writer import UnitWriter, encode_tensors, write_safetensors
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.safetensors_io import SafetensorsFile


@pytest.fixture
def small_windows(monkeypatch):
    """Windows of 4096 elements (chunks of 1024): a 64x200 tensor spans 4 windows."""
    monkeypatch.setattr(parallel, "CHUNK_ELEMS", 1024)
    monkeypatch.setattr(windows, "WINDOW_ELEMS", 4096)


def _weights(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[torch.randint(0, w.numel(), (w.numel() // 500,), generator=g)] *= 40  # a heavy tail
    return w.to(dtype)


@pytest.mark.parametrize("rule", OUTLIER_RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_selection_equals_whole(small_windows, rule, dtype):
    w = _weights((64, 200), dtype, seed=1)
    for k in (1, 37, 640, 3000):
        whole = select_outliers_by(rule, w, k, 64)
        streamed = select_outliers_stream(rule, InMemory(w), k, 64)
        assert streamed.numel() == k
        assert torch.equal(whole, streamed), (rule, k)


class _CountingSource(InMemory):
    """InMemory that records the largest piece ever read (what the converter holds of the tensor)."""

    def __init__(self, t):
        super().__init__(t)
        self.largest = 0

    def read(self, start, stop):
        self.largest = max(self.largest, stop - start)
        return super().read(start, stop)


@pytest.mark.parametrize("methods", [("weighted",), ("features",), ("weighted", "features"), ("scales",), METHODS])
@pytest.mark.parametrize("rule", OUTLIER_RULES)
def test_calibrated_selection_streamed_equals_whole(small_windows, methods, rule):
    """convert --calibrate's outlier choice on a tensor larger than one window (64x200 = 12800
    elements, windows of 4096) is the whole-tensor choice, and no read is larger than a window."""
    w = _weights((64, 200), torch.bfloat16, seed=4)
    w.view(-1)[::97] = w.view(-1)[5]  # ties: equal scores across rows and windows
    g = torch.Generator().manual_seed(5)
    sq = torch.rand(200, generator=g) ** 4 * 3
    mx = torch.rand(200, generator=g) * 4
    mx[[3, 50, 199]] = 9.0  # feature columns (|x| >= 6)
    cal = Calibrated(sq, mx, methods)
    for k in (1, 37, 640, 3000):
        whole = activation_aware.select(w, k, cal, lambda w_, k_: select_outliers_by(rule, w_, k_, 64))
        src = _CountingSource(w)
        streamed = activation_aware.select_stream(src, k, cal, rule, 64)
        assert streamed.numel() == k and torch.equal(whole, streamed), (methods, rule, k)
        assert 0 < src.largest <= windows.WINDOW_ELEMS, src.largest


def test_calibrated_quantization_streamed_equals_whole(monkeypatch):
    """The whole quantize path with --calibrate statistics (outliers and scale search), windowed vs whole."""
    w = _weights((64, 203), torch.bfloat16, seed=6)
    g = torch.Generator().manual_seed(7)
    cal = Calibrated(torch.rand(203, generator=g) ** 3, torch.rand(203, generator=g) * 8, METHODS)
    monkeypatch.setattr(parallel, "CHUNK_ELEMS", 1024)
    whole, e_whole = quantize_tensor("w", w, "nf4", torch.bfloat16, 64, 0.01, "row", calibrated=cal)
    monkeypatch.setattr(windows, "WINDOW_ELEMS", 2048)
    parts, e_parts = quantize_tensor("w", w, "nf4", torch.bfloat16, 64, 0.01, "row", calibrated=cal)
    assert whole.keys() == parts.keys()
    for name in whole:
        assert torch.equal(whole[name], parts[name]), name
    assert e_whole == e_parts


@pytest.mark.parametrize("scheme,block,fraction", [("nf4", 64, 0.0), ("nf4", 64, 0.01), ("int8", 128, 0.005), ("nf4", 64, 0.3)])
def test_streamed_quantization_equals_whole(monkeypatch, scheme, block, fraction):
    """Same codes, scales, outliers; the same error figure (the same chunk sums, in order)."""
    w = _weights((64, 203), torch.bfloat16, seed=2)  # 12992 elements: not a multiple of the block (a tail block)
    monkeypatch.setattr(parallel, "CHUNK_ELEMS", 1024)
    whole, e_whole = quantize_tensor("w", w, scheme, torch.bfloat16, block, fraction, "row")
    monkeypatch.setattr(windows, "WINDOW_ELEMS", 2048)
    parts, e_parts = quantize_tensor("w", w, scheme, torch.bfloat16, block, fraction, "row")
    assert whole.keys() == parts.keys()
    for name in whole:
        assert torch.equal(whole[name], parts[name]), name
    assert e_whole == e_parts


def test_streamed_plain_store(small_windows):
    w = _weights((64, 200), torch.float32, seed=3)
    stored, entry = quantize_tensor("w", w, "none", torch.bfloat16, None)
    assert torch.equal(stored["w"], w.to(torch.bfloat16))
    ref = (stored["w"].float() - w).norm() / w.norm()
    assert entry.rel_rms_error == pytest.approx(float(ref), rel=1e-5)
    w[3, 7] = float("nan")
    with pytest.raises(LayerpackError, match="NaN"):
        quantize_tensor("w", w, "none", torch.bfloat16, None)


def test_unit_writer_pieces_in_any_order_give_the_in_memory_file(tmp_path):
    tensors = {"a.codes": torch.arange(1000, dtype=torch.uint8), "a.absmax": torch.rand(16),
               "n.weight": torch.randn(77).to(torch.bfloat16), "b.outlier_idx": torch.arange(5, dtype=torch.int64)}
    ref = tmp_path / "ref.safetensors"
    size, sha = write_safetensors(str(ref), tensors, "block.000")
    out = tmp_path / "pieces.safetensors"
    with UnitWriter(str(out), "block.000", {n: (t.dtype, list(t.shape)) for n, t in tensors.items()}, None) as w:
        for start in (600, 0, 300):  # out of order
            w.write("a.codes", start, tensors["a.codes"][start: start + 300 if start < 600 else None])
        for name in ("n.weight", "b.outlier_idx", "a.absmax"):
            w.write(name, 0, tensors[name])
        assert w.finish() == (size, sha)
    assert out.read_bytes() == ref.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["pieces.safetensors", "ref.safetensors"]


def test_unit_writer_zstd_streams_large_tensors(tmp_path, monkeypatch):
    """Above ZSTD_WHOLE_MAX a tensor is compressed as one streamed frame; the runtime reads it back."""
    import layerpack.writer as W

    monkeypatch.setattr(W, "ZSTD_WHOLE_MAX", 1000)
    big = torch.randint(0, 16, (5000,), dtype=torch.uint8)
    small = torch.rand(8)
    path = tmp_path / "z.safetensors"
    with UnitWriter(str(path), "block.000", {"big.codes": (torch.uint8, [5000]), "s.absmax": (torch.float32, [8])}, 3) as w:
        w.write("big.codes", 0, big[:2000])
        w.write("s.absmax", 0, small)  # another tensor completes while the big one is in progress
        w.write("big.codes", 2000, big[2000:])
        w.finish()
    got = SafetensorsFile(str(path)).read()
    assert torch.equal(got["big.codes"], big) and torch.equal(got["s.absmax"], small)
    # Below the limit the bytes are those of compressing in memory (packs stay byte-identical).
    monkeypatch.setattr(W, "ZSTD_WHOLE_MAX", 1 << 20)
    head, payloads = encode_tensors({"big.codes": big, "s.absmax": small}, "block.000", 3)
    with UnitWriter(str(path), "block.000", {"big.codes": (torch.uint8, [5000]), "s.absmax": (torch.float32, [8])}, 3) as w:
        w.write("big.codes", 0, big)
        w.write("s.absmax", 0, small)
        w.finish()
    assert path.read_bytes() == head + b"".join(bytes(p) for p in payloads)


def test_unit_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(ValueError, match="not completely written"):
        with UnitWriter(str(tmp_path / "x.safetensors"), "block.000", {"a": (torch.float32, [10])}, None) as w:
            w.write("a", 0, torch.zeros(5))
            w.finish()
    with pytest.raises(RuntimeError):
        with UnitWriter(str(tmp_path / "y.safetensors"), "block.000", {"a": (torch.uint8, [10000])}, 3) as w:
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_file_tensor_loops_over_short_reads_and_refuses_truncation(tmp_path, monkeypatch):
    data = torch.randn(10000).to(torch.bfloat16)
    path = tmp_path / "t.bin"
    path.write_bytes(b"x" * 24 + data.view(torch.uint8).numpy().tobytes())
    real = os.preadv
    calls = []

    def capped(fd, buffers, offset):  # Linux caps one call at 0x7ffff000 bytes: here at 1000
        calls.append(1)
        return real(fd, [memoryview(buffers[0])[:1000]], offset)

    monkeypatch.setattr(os, "preadv", capped)
    ft = FileTensor(str(path), 24, [100, 100], torch.bfloat16, "t")
    assert torch.equal(ft.read(123, 9000), data[123:9000])
    assert len(calls) >= 17
    monkeypatch.setattr(os, "preadv", real)
    os.truncate(path, 24 + 2 * 5000)
    with pytest.raises(LayerpackError, match="short read"):
        ft.read(0, 10000)


def test_convert_with_small_windows_gives_the_same_layer_files(tmp_path, tiny_ckpts):
    """The whole converter with windows of 8192 elements (every matrix of the tiny model spans
    several): layer files identical to a conversion with whole tensors."""
    from layerpack.convert import ConvertOptions, convert

    opts = dict(quant="nf4", outliers=0.01, quiet=True)
    convert(tiny_ckpts["llama"], str(tmp_path / "whole"), ConvertOptions(**opts))
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(windows, "WINDOW_ELEMS", 8192)
        mp.setattr(parallel, "CHUNK_ELEMS", 8192)
        convert(tiny_ckpts["llama"], str(tmp_path / "windows"), ConvertOptions(**opts))
    finally:
        mp.undo()
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    windowed = json.loads((tmp_path / "windows" / "manifest.json").read_text())
    assert [f["sha256"] for f in whole["files"]] == [f["sha256"] for f in windowed["files"]]


@pytest.mark.slow
def test_kill_minus_9_inside_a_streamed_unit_resumes_to_the_same_bytes(tmp_path):
    """An untied 8200 x 4096 embedding and head (33.6M elements each: two windows): the process is
    SIGKILLed after the head's first window, i.e. in the middle of a unit being streamed."""
    import filecmp

    from conftest import make_checkpoint, run_cli, run_cli_killed

    ckpt = make_checkpoint(tmp_path / "ck", "llama", vocab_size=8200, hidden_size=4096, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, head_dim=8, shard_size="200MB")
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["convert", ckpt, None, "--quant", "nf4", "--outliers", "0.001", "--quiet"]
    run_cli(*[a if a else ref for a in args], check=True)
    # windows: embed 2, block.000's 9 tensors 1 each, then the head's first window
    killed = run_cli_killed("windows", 12, *[a if a else out for a in args])
    assert killed.returncode == -9
    layers = sorted(os.listdir(out / "layers"))
    assert layers[:2] == ["block.000.safetensors", "embed.safetensors"] and layers[2].startswith("head.safetensors.tmp-"), layers
    assert not (out / "manifest.json").exists()
    run_cli(*[a if a else out for a in args], check=True)
    files = sorted(os.path.relpath(os.path.join(r, f), ref) for r, _, fs in os.walk(ref) for f in fs)
    assert sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs) == files
    _, mismatch, errors = filecmp.cmpfiles(ref, out, files, shallow=False)
    assert not mismatch and not errors
