"""convert -> verify -> read back, for every family and scheme; determinism; resume after kill -9."""
from __future__ import annotations

import filecmp
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import make_checkpoint, run_cli, run_cli_killed
from layerpack.convert import ConvertOptions, convert
from layerpack.families import FAMILIES, architecture_spec
from layerpack.verify import verify_pack
from layerpack_runtime import Pack

# Max |w - dequant(w)| relative to the block's absmax: half the widest gap between adjacent codes.
NF4_HALF_GAP = max(b - a for a, b in zip((-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230),
                                        (-0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0))) / 2


def _source_state(ckpt: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in os.listdir(ckpt):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(ckpt, name), "pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
    return out


def _canonical_to_hf(family: str, unit: str) -> dict[str, str]:
    fam = FAMILIES[family]
    if unit == "embed":
        return fam.embed
    if unit == "head":
        return fam.head
    i = int(unit.split(".")[1])
    return {k: v.format(i=i) for k, v in {**fam.block, **fam.optional}.items()}


def _check_readback(pack_dir: str, ckpt: str, family: str, scheme: str, block: int):
    src = _source_state(ckpt)
    pack = Pack(pack_dir)
    seen = set()
    for layer in pack.layers():
        weights = pack.layer_weights(layer, torch.float32)
        names = _canonical_to_hf(family, layer.name)
        for canonical, w in weights.items():
            hf = names[canonical]
            ref = src[hf].float()
            seen.add(hf)
            assert list(w.shape) == list(ref.shape), hf
            entry = next(t for t in layer.tensors if t.name == canonical)
            if entry.scheme == "none":
                assert torch.equal(w, ref), f"{hf} must round-trip exactly"
                continue
            blocks = ref.view(-1).abs()
            pad = -blocks.numel() % block
            absmax = torch.nn.functional.pad(blocks, (0, pad)).view(-1, block).amax(1).repeat_interleave(block)[: blocks.numel()]
            step = absmax / 127 / 2 if scheme == "int8" else absmax * NF4_HALF_GAP
            # bound of the scheme, plus the rounding of the bf16 result
            bound = step * 1.001 + ref.view(-1).abs() * 2**-8
            assert torch.all((w.view(-1) - ref.view(-1)).abs() <= bound), f"{hf}: error beyond the {scheme} bound"
    tied = pack.manifest.architecture["tie_word_embeddings"]
    assert seen == set(src) - ({"lm_head.weight"} if tied else set()), "every source weight is in the pack"


@pytest.mark.parametrize("family", ["llama", "llama_tied", "mistral", "qwen2"])
@pytest.mark.parametrize("scheme", ["none", "int8", "nf4"])
def test_convert_verify_readback(tiny_ckpts, tmp_path, family, scheme):
    ckpt = tiny_ckpts[family]
    out = tmp_path / "pack"
    m = convert(ckpt, str(out), ConvertOptions(quant=scheme, quiet=True))
    assert verify_pack(str(out), quiet=True) == []
    base = family.split("_")[0]
    _check_readback(str(out), ckpt, base, scheme, m.quantization.block_size or 1)
    # layer units: embed, one per block, head
    assert [l.name for l in m.layers] == ["embed", "block.000", "block.001", "block.002", "head"]
    if family == "qwen2":
        assert {"attn.q.bias", "attn.k.bias", "attn.v.bias"} <= {t.name for t in m.layers[1].tensors}
    if family == "mistral":
        assert m.architecture["sliding_window"] == 32
    tied = family == "llama_tied"
    assert m.quantization.quantized_embedding == (tied and scheme != "none")
    assert ("head.weight" in {t.name for t in m.layers[-1].tensors}) == (not tied)
    for layer in m.layers:  # norms and biases never quantized; linears always (when a scheme is set)
        for t in layer.tensors:
            if t.name.endswith("norm.weight") or t.name.endswith(".bias"):
                assert t.scheme == "none"
            elif t.name != "embed.weight":
                assert t.scheme == scheme


def test_layer_files_are_ordinary_safetensors(tiny_ckpts, tmp_path):
    out = tmp_path / "pack"
    convert(tiny_ckpts["llama"], str(out), ConvertOptions(quant="nf4", outliers=0.01, quiet=True))
    with safe_open(str(out / "layers" / "block.001.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {"attn.q.weight.q", "attn.q.weight.absmax", "attn.q.weight.outlier_idx", "attn.q.weight.outlier_val", "attn_norm.weight"} <= keys
        assert f.metadata()["layerpack.unit"] == "block.001"
        assert f.get_tensor("attn.q.weight.q").dtype == torch.uint8


@pytest.mark.parametrize("opts", [dict(quant="none"), dict(quant="int8", outliers=0.005), dict(quant="nf4", outliers=0.01, compress="zstd")])
def test_deterministic_byte_identical(tiny_ckpts, tmp_path, opts):
    a, b = tmp_path / "a", tmp_path / "b"
    convert(tiny_ckpts["qwen2"], str(a), ConvertOptions(quiet=True, **opts))
    convert(tiny_ckpts["qwen2"], str(b), ConvertOptions(quiet=True, **opts))
    files = sorted(os.path.relpath(os.path.join(r, f), a) for r, _, fs in os.walk(a) for f in fs)
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors and len(match) == len(files)


def test_zstd_pack_reads_back_identically(tiny_ckpts, tmp_path):
    plain, packed = tmp_path / "p", tmp_path / "z"
    convert(tiny_ckpts["llama"], str(plain), ConvertOptions(quant="int8", quiet=True))
    m = convert(tiny_ckpts["llama"], str(packed), ConvertOptions(quant="int8", compress="zstd", quiet=True))
    assert m.quantization.compression == "zstd" and verify_pack(str(packed), quiet=True) == []
    p, z = Pack(str(plain)), Pack(str(packed))
    for layer in p.layers():
        a, b = p.read_layer(layer), z.read_layer(layer.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_kill_minus_9(tiny_ckpts, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ck", "llama", num_hidden_layers=6)
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["convert", ckpt, None, "--quant", "nf4", "--outliers", "0.01", "--quiet"]
    run_cli(*[a if a else ref for a in args], check=True)
    killed = run_cli_killed("units", 4, *[a if a else out for a in args])
    assert killed.returncode == -9
    assert not (out / "manifest.json").exists() and verify_pack(str(out), quiet=True) != []
    done_before = {n: os.stat(out / "layers" / n).st_mtime_ns for n in os.listdir(out / "layers")}
    assert len(done_before) == 4
    (out / "layers" / "block.004.safetensors.tmp-99999").write_bytes(b"half-written")  # debris of a crash mid-write
    run_cli(*[a if a else out for a in args], check=True)
    # finished units were not redone, and the result equals an uninterrupted run byte for byte
    assert all(os.stat(out / "layers" / n).st_mtime_ns == t for n, t in done_before.items())
    files = sorted(os.path.relpath(os.path.join(r, f), ref) for r, _, fs in os.walk(ref) for f in fs)
    assert sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs) == files
    match, mismatch, errors = filecmp.cmpfiles(ref, out, files, shallow=False)
    assert not mismatch and not errors
    # and re-running the finished command is a no-op success
    again = run_cli(*[a if a else out for a in args])
    assert again.returncode == 0


def test_rerun_with_other_options_refuses_then_overwrite(tiny_ckpts, tmp_path):
    out = tmp_path / "pack"
    run_cli("convert", tiny_ckpts["llama"], out, "--quiet", check=True)
    r = run_cli("convert", tiny_ckpts["llama"], out, "--quant", "int8", "--quiet")
    assert r.returncode == 1 and "--overwrite" in r.stderr
    run_cli("convert", tiny_ckpts["llama"], out, "--quant", "int8", "--quiet", "--overwrite", check=True)
    assert json.loads((out / "manifest.json").read_text())["quantization"]["scheme"] == "int8"
    assert verify_pack(str(out), quiet=True) == []


def test_pickle_source_refused_unless_allowed(tiny_ckpts, tmp_path):
    st_pack, pk_pack = tmp_path / "st", tmp_path / "pk"
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    shutil.copy(os.path.join(tiny_ckpts["llama"], "config.json"), ckpt)
    torch.save(_source_state(tiny_ckpts["llama"]), ckpt / "pytorch_model.bin")
    r = run_cli("convert", ckpt, tmp_path / "x", "--quiet")
    assert r.returncode == 1 and "--allow-pickle" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "manifest.json").exists()
    run_cli("convert", ckpt, pk_pack, "--quiet", "--allow-pickle", check=True)
    run_cli("convert", tiny_ckpts["llama"], st_pack, "--quiet", check=True)
    for name in os.listdir(st_pack / "layers"):  # same weights -> the same layer files
        assert filecmp.cmp(st_pack / "layers" / name, pk_pack / "layers" / name, shallow=False)


def test_architecture_spec_llama3_rope_and_transformers4_spelling():
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 16384,
        "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": False,
    }
    spec = architecture_spec(cfg)
    assert spec["rope"] == {"type": "llama3", "theta": 500000.0, "scaling": {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    assert spec["head_dim"] == 128 and spec["num_kv_heads"] == 8 and spec["eos_token_ids"] == [128001, 128008, 128009]


def test_fault_object_interrupts_and_the_rerun_resumes(tiny_ckpts, tmp_path):
    """The converter's interruption points (layerpack/conversion/faults.py), injected in-process: a
    fault raised once 2 units are recorded leaves a resumable folder; the re-run keeps those units
    and ends with the bytes of an uninterrupted conversion."""
    from layerpack.conversion.faults import ConvertFaults

    class Stop(Exception):
        pass

    class StopAfterTwoUnits(ConvertFaults):
        def __init__(self):
            self.windows, self.units = 0, []

        def window_done(self):
            self.windows += 1

        def unit_recorded(self, units_done):
            self.units.append(units_done)
            if units_done >= 2:
                raise Stop

    opts = ConvertOptions(quant="int8", outliers=0.01, quiet=True)
    ref, out = tmp_path / "ref", tmp_path / "out"
    convert(tiny_ckpts["llama"], str(ref), opts)
    faults = StopAfterTwoUnits()
    with pytest.raises(Stop):
        convert(tiny_ckpts["llama"], str(out), opts, faults=faults)
    assert faults.units == [1, 2] and faults.windows >= 2  # one window per tensor of the two units at least
    assert not (out / "manifest.json").exists()
    assert sorted(os.listdir(out / "layers")) == ["block.000.safetensors", "embed.safetensors"]
    done_before = {n: os.stat(out / "layers" / n).st_mtime_ns for n in os.listdir(out / "layers")}
    convert(tiny_ckpts["llama"], str(out), opts)
    assert all(os.stat(out / "layers" / n).st_mtime_ns == t for n, t in done_before.items())
    files = sorted(os.path.relpath(os.path.join(r, f), ref) for r, _, fs in os.walk(ref) for f in fs)
    assert sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs) == files
    _, mismatch, errors = filecmp.cmpfiles(ref, out, files, shallow=False)
    assert not mismatch and not errors
