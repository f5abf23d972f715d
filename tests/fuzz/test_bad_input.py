"""Bad input: one clear line on stderr, non-zero exit, and never a pack that verify accepts."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pytest

from conftest import make_checkpoint, run_cli
from layerpack.verify import verify_pack


def _one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _no_pack(out):
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    assert verify_pack(str(out), quiet=True) != []


@pytest.fixture()
def ckpt(tmp_path):
    return make_checkpoint(tmp_path / "ck", "llama")


def test_missing_path(tmp_path):
    _one_line_error(run_cli("convert", tmp_path / "nope", tmp_path / "out"), "no such folder")
    _no_pack(tmp_path / "out")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 100)
    _one_line_error(run_cli("convert", f, tmp_path / "out"), "is a file")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(run_cli("convert", tmp_path / "empty", tmp_path / "out"), "no config.json")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    _one_line_error(run_cli("convert", tmp_path / "empty", tmp_path / "out"), "no weights found")


def test_unknown_architecture_lists_supported(ckpt, tmp_path):
    cfg = json.loads(open(os.path.join(ckpt, "config.json")).read())
    cfg["architectures"] = ["FancyFutureForCausalLM"]
    open(os.path.join(ckpt, "config.json"), "w").write(json.dumps(cfg))
    line = _one_line_error(run_cli("convert", ckpt, tmp_path / "out"), "FancyFutureForCausalLM")
    assert "LlamaForCausalLM" in line and "MistralForCausalLM" in line and "Qwen2ForCausalLM" in line


def _first_shard(ckpt):
    return os.path.join(ckpt, sorted(n for n in os.listdir(ckpt) if n.endswith(".safetensors"))[0])


def test_truncated_safetensors(ckpt, tmp_path):
    shard = _first_shard(ckpt)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    _one_line_error(run_cli("convert", ckpt, tmp_path / "out"), "truncated")
    _no_pack(tmp_path / "out")


@pytest.mark.parametrize("garbage", [b"\xff" * 8 + b"{}", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", b"abc"])
def test_corrupt_safetensors_header(ckpt, tmp_path, garbage):
    shard = _first_shard(ckpt)
    data = open(shard, "rb").read()
    open(shard, "wb").write(garbage + data[len(garbage):])
    _one_line_error(run_cli("convert", ckpt, tmp_path / "out"), "not a valid safetensors file")
    _no_pack(tmp_path / "out")


def test_nan_weights_rejected(tmp_path):
    import torch

    ck = make_checkpoint(tmp_path / "ck", "llama", dtype=torch.float32)
    from safetensors.torch import load_file, save_file

    shard = _first_shard(ck)
    sd = load_file(shard)
    k = next(iter(sd))
    sd[k].view(-1)[0] = float("nan")
    save_file(sd, shard, metadata={"format": "pt"})
    for quant in ("none", "nf4"):
        _one_line_error(run_cli("convert", ck, tmp_path / f"out{quant}", "--quant", quant), "NaN")
        _no_pack(tmp_path / f"out{quant}")


def test_output_not_writable(ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    _one_line_error(run_cli("convert", ckpt, blocker / "out"), "cannot create output folder")


def test_output_not_empty_is_not_clobbered(ckpt, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    _one_line_error(run_cli("convert", ckpt, out), "not empty")
    assert (out / "thesis.txt").read_text() == "do not delete"


def test_shape_mismatch_with_config(ckpt, tmp_path):
    cfg = json.loads(open(os.path.join(ckpt, "config.json")).read())
    cfg["intermediate_size"] = 128
    open(os.path.join(ckpt, "config.json"), "w").write(json.dumps(cfg))
    _one_line_error(run_cli("convert", ckpt, tmp_path / "out"), "config.json implies")


def test_layer_count_mismatch(ckpt, tmp_path):
    cfg = json.loads(open(os.path.join(ckpt, "config.json")).read())
    cfg["num_hidden_layers"] = 2
    open(os.path.join(ckpt, "config.json"), "w").write(json.dumps(cfg))
    _one_line_error(run_cli("convert", ckpt, tmp_path / "out"), "does not use")


@pytest.mark.parametrize("args,needle", [(["--outliers", "0.7", "--quant", "nf4"], "--outliers"),
                                         (["--outliers", "0.01"], "needs a quantized scheme"),
                                         (["--block-size", "7", "--quant", "int8"], "--block-size")])
def test_bad_options(ckpt, tmp_path, args, needle):
    _one_line_error(run_cli("convert", ckpt, tmp_path / "out", *args), needle)


@contextlib.contextmanager
def _small_filesystem(tmp_path, size="96k"):
    """A tiny tmpfs (a real ENOSPC). Needs root; CI runs as root here, elsewhere we say why we skip."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to provoke ENOSPC (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full(ckpt, tmp_path):
    with _small_filesystem(tmp_path) as mnt:
        out = mnt / "out"
        _one_line_error(run_cli("convert", ckpt, out), "disk full")
        _no_pack(out)
        leftovers = [n for r, _, fs in os.walk(out) for n in fs if ".tmp-" in n]
        assert leftovers == [], "temporary files must be removed on failure"


def test_verify_lists_every_problem(ckpt, tmp_path):
    out = tmp_path / "pack"
    run_cli("convert", ckpt, out, "--quant", "nf4", "--quiet", check=True)
    assert run_cli("verify", out, "--quiet").returncode == 0
    # flip one byte in one layer, delete another, add a stray file
    p = out / "layers" / "block.001.safetensors"
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    os.remove(out / "layers" / "head.safetensors")
    (out / "layers" / "extra.safetensors").write_bytes(b"")
    r = run_cli("verify", out, "--quiet")
    assert r.returncode == 1
    err = r.stderr
    assert "block.001.safetensors: sha256 mismatch" in err and "head.safetensors: missing" in err and "extra.safetensors: not listed" in err


def test_verify_rejects_newer_major_version_and_tampered_manifest(ckpt, tmp_path):
    out = tmp_path / "pack"
    run_cli("convert", ckpt, out, "--quiet", check=True)
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "format_version": "2.0.0"}))
    r = run_cli("verify", out, "--quiet")
    assert r.returncode == 1 and "newer than this reader supports" in r.stderr
    r = run_cli("inspect", out)
    _one_line_error(r, "newer than this reader supports")
    bad = {**m, "files": m["files"] + [{"path": "../../etc/passwd", "size": 1, "sha256": "0" * 64}]}
    (out / "manifest.json").write_text(json.dumps(bad))
    assert "outside the pack" in run_cli("verify", out, "--quiet").stderr
    (out / "manifest.json").write_text(json.dumps({**m, "totals": {}}))
    assert "schema" not in (r := run_cli("verify", out, "--quiet")).stdout and r.returncode == 1 and "totals.params" in r.stderr


def test_incomplete_pack_is_not_accepted(ckpt, tmp_path):
    out = tmp_path / "pack"
    run_cli("convert", ckpt, out, "--quiet", check=True)
    os.remove(out / "manifest.json")
    r = run_cli("verify", out)
    assert r.returncode == 1 and "manifest.json: missing" in r.stderr
    _one_line_error(run_cli("inspect", out), "not a complete layerpack")
