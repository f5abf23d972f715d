"""scripts/make_synthetic.py --pack (scripts/synthetic_pack.py): a pack of random codes written
directly must be what `convert` writes for a checkpoint of the same shapes - same layer files
(header bytes, sizes), same manifest but for the source, the layer hashes and the error figures -
pass `verify` and the loader's checks, and run. Tiny Llama-3.1-shaped models (8B's config with
small sizes); a few seconds."""
from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import make_synthetic  # noqa: E402
from synthetic_pack import PackSpec, write_pack  # noqa: E402
from layerpack.conversion import build  # noqa: E402
from layerpack.conversion.options import ConvertOptions  # noqa: E402
from layerpack_runtime import load  # noqa: E402
from layerpack_runtime.errors import LayerpackError  # noqa: E402
from layerpack_runtime.pack import Pack  # noqa: E402

TINY = dict(make_synthetic.LLAMA_8B, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=384, num_hidden_layers=2, bos_token_id=1, eos_token_id=[2])


def _spec(quant: str, outliers: float = 0.0, seed: int = 0, cfg: dict = TINY) -> PackSpec:
    return PackSpec(name=f"synthetic-tiny-{cfg['num_hidden_layers']}L-seed{seed}", config=cfg,
                    tensors=make_synthetic.hf_tensors(cfg), quant=quant, outliers=outliers, seed=seed)


def _header(path: str) -> bytes:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return f.read(n)


def _comparable(manifest: dict) -> dict:
    """A manifest without what a synthetic pack cannot share with a converted one."""
    m = copy.deepcopy(manifest)
    m.pop("source")
    m["files"] = [{k: v for k, v in f.items() if not (k == "sha256" and f["path"].startswith("layers/"))} for f in m["files"]]
    for layer in m["layers"]:
        for t in layer["tensors"]:
            t.pop("rel_rms_error")
    return m


@pytest.mark.parametrize("quant,outliers", [("nf4", 0.0), ("int8", 0.0), ("none", 0.0), ("nf4", 0.01), ("int8", 0.01)])
def test_synthetic_pack_is_laid_out_as_convert_writes_it(tmp_path, quant, outliers):
    src = tmp_path / "src"
    make_synthetic.write_checkpoint(str(src), TINY, tokenizer="", quiet=True)
    converted = tmp_path / "converted"
    build.build_pack(str(src), str(converted), ConvertOptions(quant=quant, outliers=outliers, quiet=True))
    synthetic = tmp_path / "synthetic"
    write_pack(str(synthetic), _spec(quant, outliers), quiet=True)
    with open(converted / "manifest.json") as f:
        m_conv = json.load(f)
    with open(synthetic / "manifest.json") as f:
        m_syn = json.load(f)
    assert _comparable(m_syn) == _comparable(m_conv)
    assert m_syn["source"]["id"] == "synthetic-tiny-2L-seed0"
    for layer in m_conv["layers"]:
        assert _header(str(synthetic / layer["file"])) == _header(str(converted / layer["file"])), layer["file"]
    assert sorted(os.listdir(synthetic)) == sorted(os.listdir(converted))  # no staging folder left behind
    assert Pack(str(synthetic)).verify() == []  # sha256 of every file, headers, tables, every value


def test_synthetic_pack_runs_resident_and_streamed(tmp_path):
    out = tmp_path / "nf4"
    write_pack(str(out), _spec("nf4", outliers=0.01), workers=2, quiet=True)
    resident = load(str(out), verify=True)
    logits = resident.logits(torch.tensor([[5, 17, 33, 90, 7]]))
    assert logits.shape == (1, 5, TINY["vocab_size"]) and torch.isfinite(logits).all()
    assert logits.std() > 0.1  # the random weights carry a signal through the layers (not all zeros)
    ids = resident.generate_ids([5, 17, 33], max_new_tokens=6)
    assert len(ids) == 6 and all(0 <= t < TINY["vocab_size"] for t in ids)
    streamed = load(str(out), max_memory=resident.minimum_memory())
    assert set(streamed.placement().values()) != {"resident"}
    assert streamed.generate_ids([5, 17, 33], max_new_tokens=6) == ids  # streamed units give the same tokens


def test_synthetic_pack_same_seed_same_bits_whatever_the_workers(tmp_path):
    a = write_pack(str(tmp_path / "a"), _spec("int8", outliers=0.01), workers=1, quiet=True)
    b = write_pack(str(tmp_path / "b"), _spec("int8", outliers=0.01), workers=3, quiet=True)
    c = write_pack(str(tmp_path / "c"), _spec("int8", outliers=0.01, seed=1), workers=1, quiet=True)
    layer_sha = lambda m: [f.sha256 for f in m.files if f.path.startswith("layers/")]  # noqa: E731
    assert layer_sha(a) == layer_sha(b)
    assert not set(layer_sha(a)) & set(layer_sha(c))


def test_synthetic_pack_refuses_and_resumes(tmp_path):
    out = tmp_path / "p"
    write_pack(str(out), _spec("nf4"), quiet=True)
    mtime = os.path.getmtime(out / "manifest.json")
    write_pack(str(out), _spec("nf4"), quiet=True)  # the same pack: nothing to do
    assert os.path.getmtime(out / "manifest.json") == mtime
    with pytest.raises(LayerpackError, match="not empty"):
        write_pack(str(out), _spec("int8"), quiet=True)
    write_pack(str(out), _spec("int8"), overwrite=True, quiet=True)
    assert Pack(str(out)).verify() == []


@pytest.mark.parametrize("args,message", [
    (["--pack", "P"], "--pack and --quant go together"),
    (["OUT", "--pack", "P", "--quant", "nf4"], "either a checkpoint folder OUT or --pack OUT"),
    (["--pack", "P", "--quant", "nf4", "--shape", "llama3-8b", "--layers", "33"], "--layers must be in 1..32"),
    (["--pack", "P", "--quant", "none", "--outliers", "0.01", "--tokenizer", ""], "quantized"),
])
def test_make_synthetic_bad_options(tmp_path, monkeypatch, args, message):
    args = [str(tmp_path / "p") if a == "P" else a for a in args]
    monkeypatch.setattr(sys, "argv", ["make_synthetic.py", *args])
    with pytest.raises(SystemExit) as e:
        make_synthetic.main()
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code)


def test_make_synthetic_error_is_one_line(tmp_path):
    """The same as a user sees it: one `error:` line, no traceback, non-zero exit."""
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "other").write_text("x")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_synthetic.py"), "--pack", str(tmp_path / "p"),
                        "--quant", "nf4", "--shape", "llama3-8b", "--layers", "1", "--tokenizer", ""],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'p'}: exists and is not empty; choose a new folder or pass --overwrite"]


def test_checkpoint_shapes_and_same_bytes_whatever_the_workers(tmp_path):
    cfg = make_synthetic.model_config("llama3-8b", 8, "")
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["vocab_size"], cfg["num_hidden_layers"]) == (4096, 14336, 32, 8, 128, 128256, 8)
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["rope_theta"] == 500000.0
    shapes = dict(make_synthetic.hf_tensors(cfg))
    assert shapes["model.layers.7.self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes["model.layers.7.mlp.down_proj.weight"] == (4096, 14336)
    assert "model.layers.8.mlp.down_proj.weight" not in shapes and shapes["lm_head.weight"] == (128256, 4096)
    one, three = tmp_path / "w1", tmp_path / "w3"
    make_synthetic.write_checkpoint(str(one), TINY, tokenizer="", workers=1, quiet=True)
    make_synthetic.write_checkpoint(str(three), TINY, tokenizer="", workers=3, quiet=True)
    names = sorted(n for n in os.listdir(one) if n.endswith(".safetensors"))
    assert len(names) == 2 + 2 * TINY["num_hidden_layers"]
    for n in names + ["model.safetensors.index.json", "config.json"]:
        assert (one / n).read_bytes() == (three / n).read_bytes(), n


def test_unit_writer_hash_as_written_equals_hash_read_back(tmp_path):
    """UnitWriter hashes pieces that arrive in file order as they come and reads nothing back; any
    other order is hashed back from the file: the same sha256 either way, and the file's own."""
    import hashlib

    from layerpack.writer import UnitWriter

    g = torch.Generator().manual_seed(0)
    tensors = {"a.absmax": torch.rand(40, generator=g), "a.q": torch.randint(0, 255, (1000,), generator=g, dtype=torch.uint8),
               "norm.weight": torch.randn(64, generator=g).to(torch.bfloat16)}
    specs = {n: (t.dtype, list(t.shape)) for n, t in tensors.items()}
    results = []
    for order in ("file", "reversed", "pieces out of order"):
        path = tmp_path / f"{order}.safetensors"
        with UnitWriter(str(path), "block.000", specs, None) as w:
            names = w.file_order() if order != "reversed" else w.file_order()[::-1]
            for n in names:
                flat = tensors[n].reshape(-1)
                halves = [(0, flat[:10]), (10, flat[10:])]
                for start, piece in (halves if order != "pieces out of order" else halves[::-1]):
                    w.write(n, start, piece)
            running = w._running is not None
            results.append(w.finish())
        assert running == (order == "file")
        assert results[-1] == (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    assert results[0] == results[1] == results[2]


def test_synthetic_codes_are_uniform():
    """Every NF4 code and both int8 signs equally likely (an earlier draft drew 63-bit words, which
    left every 8th byte's top bit 0)."""
    import numpy as np

    from synthetic_pack import _Contents

    nf4 = _Contents(0, "block.000", "mlp.up.weight", [512, 512], "nf4", 64, 0)
    codes = torch.cat([t() for _, t in nf4.pieces(".q")]).numpy()
    counts = np.bincount(np.concatenate([codes >> 4, codes & 15]), minlength=16)
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()
    per_lane = [(codes[k::8] >> 7).mean() for k in range(8)]  # each byte position of a 64-bit word
    assert min(per_lane) > 0.45 and max(per_lane) < 0.55
    int8 = _Contents(0, "block.000", "mlp.up.weight", [512, 512], "int8", 128, 0)
    q = torch.cat([t() for _, t in int8.pieces(".q")]).numpy()
    assert q.min() == -127 and q.max() == 127 and 0.45 < (q < 0).mean() < 0.55
