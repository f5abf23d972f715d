"""Outlier selection rules (layerpack.quantizer.OUTLIER_RULES): each picks exactly k distinct entries,
deterministically, by its own criterion; the rest of the weight stays NF4 bit-exact with
bitsandbytes (quantized with the outliers zeroed); and each reduces the error."""
from __future__ import annotations

import json

import pytest
import torch

from layerpack.convert import ConvertOptions, convert
from layerpack.quantizer import (BLOCK_GAIN_DEPTH, OUTLIER_BLOCK_GAIN, OUTLIER_MAGNITUDE, OUTLIER_ROW, OUTLIER_RULES,
                                 quantize_tensor, select_outliers_by)
from layerpack.schema import schema_errors
from layerpack_runtime import LayerpackError, Pack


def test_default_rule_is_row_and_only_recorded_with_outliers(tiny_ckpts, tmp_path):
    assert ConvertOptions().outlier_rule == OUTLIER_ROW  # chosen by scripts/sweep_outliers.py (BENCHMARKS.md)
    convert(tiny_ckpts["llama"], str(tmp_path / "plain"), ConvertOptions(quant="nf4", quiet=True))
    assert "outlier_rule" not in json.loads((tmp_path / "plain" / "manifest.json").read_text())["quantization"]
    convert(tiny_ckpts["llama"], str(tmp_path / "o"), ConvertOptions(quant="int8", outliers=0.01, quiet=True))
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["quantization"]["outlier_rule"] == OUTLIER_ROW
    # re-running the same command is still a no-op (the recorded rule compares equal)
    m = convert(tiny_ckpts["llama"], str(tmp_path / "o"), ConvertOptions(quant="int8", outliers=0.01, quiet=True))
    assert m.quantization.outlier_rule == OUTLIER_ROW


def _weights(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:: max(1, w.numel() // 50)] *= 40
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("rule", OUTLIER_RULES)
@pytest.mark.parametrize("shape,k", [((96, 160), 150), ((33,), 3), ((257, 64), 1), ((64, 64), 700)])
def test_rules_pick_k_distinct_sorted_deterministic(rule, shape, k):
    w = _weights(shape, seed=1)
    idx = select_outliers_by(rule, w, k, 64)
    assert idx.numel() == k and torch.equal(idx, torch.unique(idx)) and 0 <= int(idx.min()) and int(idx.max()) < w.numel()
    assert torch.equal(idx, select_outliers_by(rule, w.clone(), k, 64))


def test_row_rule_gives_every_row_an_equal_share_of_its_largest():
    w = _weights((50, 128), seed=2)
    idx = select_outliers_by(OUTLIER_ROW, w, 120, 64)  # 2.4 per row
    rows = idx // 128
    counts = torch.bincount(rows, minlength=50)
    assert int(counts.min()) == 2 and int(counts.max()) == 3
    mag = w.float().abs()
    for r in range(50):  # a row's picks are its largest entries
        picked = idx[rows == r] % 128
        assert mag[r, picked].min() >= mag[r][~torch.isin(torch.arange(128), picked)].max()


def test_block_gain_rule_takes_block_maxima_where_they_stand_out():
    w = torch.full((8, 64), 0.01)
    w[3, 5], w[6, 7], w[6, 9] = 1.0, 0.5, 0.49   # block 3: one spike; block 6: two near-equal ones
    idx = select_outliers_by(OUTLIER_BLOCK_GAIN, w.to(torch.bfloat16), 2, 64)
    # removing block 3's spike saves 1 - 1e-4; block 6's 0.5 saves only 0.25 - 0.24, its pair together 0.125 each
    assert idx.tolist()[0] == 3 * 64 + 5 and idx.numel() == 2
    many = select_outliers_by(OUTLIER_BLOCK_GAIN, _weights((16, 64), seed=3), 40, 64)
    assert int(torch.bincount(many // 64).max()) <= BLOCK_GAIN_DEPTH


@pytest.mark.parametrize("rule", OUTLIER_RULES)
def test_non_outlier_part_is_bitsandbytes_nf4_and_error_drops(rule):
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency (pip install -e .[test])")
    w = _weights((256, 192), seed=4)
    plain, e0 = quantize_tensor("w", w, "nf4", torch.bfloat16, 64)
    stored, e1 = quantize_tensor("w", w, "nf4", torch.bfloat16, 64, 0.01, rule)
    idx = stored["w.outlier_idx"].long()
    zeroed = w.clone()
    zeroed.view(-1)[idx] = 0
    ref_q, ref_state = bnbf.quantize_4bit(zeroed, blocksize=64, quant_type="nf4")
    assert torch.equal(stored["w.q"], ref_q.view(-1)) and torch.equal(stored["w.absmax"], ref_state.absmax)
    assert torch.equal(stored["w.outlier_val"], w.view(-1)[idx])
    assert e1.rel_rms_error < 0.9 * e0.rel_rms_error


def test_convert_with_a_rule_and_bad_rule(tiny_ckpts, tmp_path):
    for rule in (OUTLIER_MAGNITUDE, OUTLIER_ROW):
        m = convert(tiny_ckpts["llama"], str(tmp_path / rule), ConvertOptions(quant="nf4", outliers=0.02, outlier_rule=rule, quiet=True))
        d = json.loads((tmp_path / rule / "manifest.json").read_text())
        assert d["quantization"]["outlier_rule"] == rule == m.quantization.outlier_rule and not schema_errors(d)
        assert Pack(str(tmp_path / rule)).manifest.quantization.outlier_rule == rule
    a, b = (Pack(str(tmp_path / r)).read_layer("block.000")["attn.q.weight.outlier_idx"] for r in (OUTLIER_MAGNITUDE, OUTLIER_ROW))
    assert a.numel() == b.numel() and not torch.equal(a, b)
    with pytest.raises(LayerpackError, match="outlier rule"):
        convert(tiny_ckpts["llama"], str(tmp_path / "x"), ConvertOptions(quant="nf4", outliers=0.01, outlier_rule="nope"))


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_head_outliers_apply_to_the_head_only(tiny_ckpts, tmp_path, family):
    """--head-outliers: the output head (a tied embedding, which is the head) gets its own fraction;
    every other weight keeps --outliers. Recorded in the manifest (schema-valid), and the rest of the
    pack is byte-identical to a conversion without it."""
    from conftest import run_cli

    out, base = tmp_path / "head", tmp_path / "base"
    m = convert(tiny_ckpts[family], str(out), ConvertOptions(quant="nf4", outliers=0.001, head_outliers=0.02, quiet=True))
    convert(tiny_ckpts[family], str(base), ConvertOptions(quant="nf4", outliers=0.001, quiet=True))
    head = "embed.weight" if family == "llama_tied" else "head.weight"
    for layer in m.layers:
        for t in layer.tensors:
            if t.scheme == "none":
                continue
            n = 1
            for d in t.shape:
                n *= d
            assert t.outliers == round((0.02 if t.name == head else 0.001) * n), (layer.name, t.name)
    d = json.loads((out / "manifest.json").read_text())
    assert d["quantization"]["head_outlier_fraction"] == 0.02 and not schema_errors(d)
    head_unit = "embed" if family == "llama_tied" else "head"
    for layer in m.layers:
        same = (out / layer.file).read_bytes() == (base / layer.file).read_bytes()
        assert same == (layer.name != head_unit), layer.name
    assert "head outliers 0.02" in run_cli("inspect", out, check=True).stdout
    # a different head fraction is a different pack: not a silent no-op
    with pytest.raises(LayerpackError, match="overwrite"):
        convert(tiny_ckpts[family], str(out), ConvertOptions(quant="nf4", outliers=0.001, head_outliers=0.01, quiet=True))
    bad = run_cli("convert", tiny_ckpts[family], tmp_path / "bad", "--head-outliers", "0.02")
    assert bad.returncode == 1 and "needs a quantized scheme" in bad.stderr and bad.stderr.count("\n") == 1
