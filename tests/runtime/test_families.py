"""Dense families beyond llama (Qwen3, Gemma 3 text, Phi-3): tiny random transformers checkpoints ->
convert (quant none and nf4) -> runtime logits against transformers, prefill and 8 cached decode
steps, resident and streamed under a small max_memory. The nf4 reference is transformers running
the *dequantized* pack weights (written back into the HF model under their HF names), so the
comparison tests the runtime's model code, not the quantization error. Plus: Mistral's sliding
window against transformers, and packs of families this runtime does not know."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import decode_diffs, make_checkpoint, rel_diff, run_cli
from layerpack.conversion.job import plan_job
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime import LayerpackError, Pack, load

REL_TOL = 1e-4
DECODE_STEPS = 8
PROMPT_LEN = 40
# name -> (conftest family, config overrides)
VARIANTS = {
    "qwen3": ("qwen3", {}),
    "qwen3_tied_bias": ("qwen3", {"tie_word_embeddings": True, "attention_bias": True}),
    # HF windows only blocks >= max_window_layers: recorded as layer_types (window 16 < PROMPT_LEN)
    "qwen3_window": ("qwen3", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}),
    "phi3": ("phi3", {}),
    "gemma3": ("gemma3", {}),
    # final logits capped; attention capping is set but, as in transformers' Gemma3, not applied
    "gemma3_softcap_untied": ("gemma3", {"attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0, "tie_word_embeddings": False}),
    "mistral": ("mistral", {}),  # sliding window 32 < PROMPT_LEN: the window shapes the mask (streamed, nf4 too)
}


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """{(variant, quant): (fp32 checkpoint, pack)}."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, (family, over) in VARIANTS.items():
        ckpt = make_checkpoint(root / f"ckpt_{name}", family, dtype=torch.float32, **over)
        for quant in ("none", "nf4"):
            pack = str(root / f"pack_{name}_{quant}")
            convert(ckpt, pack, ConvertOptions(quant=quant, quiet=True))
            out[name, quant] = (ckpt, pack)
    return out


def hf_with_pack_weights(ckpt: str, pack: str, **kw):
    """transformers' model of `ckpt` (fp32) running the pack's weights as the runtime reconstructs
    them (dequantized): each canonical tensor goes back to its HF tensor (or row range of a fused one)."""
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, **kw).eval()
    state = ref.state_dict()
    p = Pack(pack)
    written = set()
    for u in plan_job(ckpt, ConvertOptions(quiet=True)).units:
        weights = p.layer_weights(u.name, torch.float32)
        for canonical, hf in u.tensors.items():
            target = state[hf]
            if canonical in u.rows:
                a, b, _ = u.rows[canonical]
                target = target[a:b]
            with torch.no_grad():
                target.copy_(weights[canonical])
            written.add(hf)
    assert written >= {k for k in state if not k.startswith("lm_head") or not p.manifest.architecture["tie_word_embeddings"]}
    return ref


def small_budget(pack: str) -> int:
    """A max_memory that holds the head (and the embedding, unless it serves rows from its file)
    and streams blocks."""
    m = load(pack)
    costs = {u: m._unit_cost(u) for u in m.units}
    blocks = [costs[u] for u in m.block_units]
    fixed = m.fixed_bytes
    embed = 0 if m._embed_rows_from_file() else costs["embed"].stored
    return fixed + embed + costs["head"].stored + 2 * max(b.streamed for b in blocks) + 16


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_resident_and_streamed(packs, variant, quant):
    ckpt, pack = packs[variant, quant]
    ref = hf_with_pack_weights(ckpt, pack)
    resident, streamed = load(pack), load(pack, max_memory=small_budget(pack))
    assert resident.dtype == torch.float32 and resident.args.family == VARIANTS[variant][0]
    assert set(streamed.plan.streamed) & set(streamed.block_units) and not resident.plan.streamed, streamed.plan.describe()
    ids = torch.randint(3, 384, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    diffs = decode_diffs({"resident": resident, "streamed": streamed}, ref, ids, DECODE_STEPS)
    worst = max(diffs, key=diffs.get)
    print(f"\n{variant}/{quant}: max rel diff {diffs[worst]:.2e} ({worst}); streamed {streamed.plan.streamed}")
    assert diffs[worst] < REL_TOL, diffs


@pytest.mark.parametrize("variant", ["gemma3", "phi3", "qwen3_window"])
def test_batched_left_padded_generation_matches_single_prompts(packs, variant):
    """Padding masks combine with each family's windows and rope tables (prompts cross the windows)."""
    model = load(packs[variant, "none"][1])
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (37, 12, 25)]
    batched = model.generate_ids(prompts, max_new_tokens=8)
    assert batched == [model.generate_ids(p, max_new_tokens=8) for p in prompts]
    assert max(map(len, batched)) == 8


def test_qwen3_manifest_records_qk_norm(packs):
    arch = Pack(packs["qwen3", "none"][1]).manifest.architecture
    assert arch["family"] == "qwen3" and arch["qk_norm"] is True and arch["head_dim"] == 32
    assert arch["attention_bias"] is False and arch["sliding_window"] is None
    names = {t.name for t in Pack(packs["qwen3", "none"][1]).manifest.layer("block.000").tensors}
    assert {"attn.q_norm.weight", "attn.k_norm.weight"} <= names and not any(n.endswith(".bias") for n in names)
    windowed = Pack(packs["qwen3_window", "none"][1]).manifest.architecture
    assert windowed["sliding_window"] == 16 and windowed["layer_types"] == ["full_attention"] + ["sliding_attention"] * 2
    biased = {t.name for t in Pack(packs["qwen3_tied_bias", "none"][1]).manifest.layer("block.000").tensors}
    assert {"attn.q.bias", "attn.k.bias", "attn.v.bias", "attn.o.bias"} <= biased


def test_phi3_fused_projections_are_split_exactly(packs):
    from safetensors import safe_open

    ckpt, pack = packs["phi3", "none"]
    p = Pack(pack)
    arch = p.manifest.architecture
    assert arch["family"] == "phi3" and arch["sliding_window"] == 24 and arch["rope"] == {"type": "default", "theta": 10000.0}
    src = {}
    for f in os.listdir(ckpt):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(ckpt, f), "pt") as st:
                src.update({k: st.get_tensor(k) for k in st.keys() if k.startswith("model.layers.1.")})
    w = p.layer_weights("block.001")
    assert not any("qkv" in n or "gate_up" in n for n in w)
    assert w["attn.q.weight"].shape == (64, 64) and w["attn.k.weight"].shape == w["attn.v.weight"].shape == (32, 64)
    assert torch.equal(torch.cat([w["attn.q.weight"], w["attn.k.weight"], w["attn.v.weight"]]), src["model.layers.1.self_attn.qkv_proj.weight"])
    assert torch.equal(torch.cat([w["mlp.gate.weight"], w["mlp.up.weight"]]), src["model.layers.1.mlp.gate_up_proj.weight"])
    nf4 = Pack(packs["phi3", "nf4"][1]).manifest.layer("block.001")
    assert {t.name: t.scheme for t in nf4.tensors}["attn.k.weight"] == "nf4"  # each split part quantized on its own


def test_phi3_longrope_converts_but_is_refused_clearly(packs, tmp_path):
    """Phi-3 128k checkpoints use "longrope" ("su"): the pack records it; this runtime refuses it in one line."""
    import shutil

    ckpt = shutil.copytree(packs["phi3", "none"][0], tmp_path / "ckpt")
    with open(ckpt / "config.json") as f:
        cfg = json.load(f)
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=10000.0, original_max_position_embeddings=64,
               rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    with open(ckpt / "config.json", "w") as f:
        json.dump(cfg, f)
    m = convert(str(ckpt), str(tmp_path / "pack"), ConvertOptions(quiet=True))
    assert m.architecture["rope"]["type"] == "longrope" and m.architecture["rope"]["scaling"]["long_factor"] == [2.0] * 8
    with pytest.raises(LayerpackError, match=r"rope type 'longrope' is not supported"):
        load(tmp_path / "pack")
    r = run_cli("run", tmp_path / "pack", "Hello", "--max-new-tokens", "2")
    assert r.returncode == 1 and "longrope" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_gemma3_manifest_and_both_layer_types_matter(packs):
    """The tiny Gemma 3 has sliding (window 16 < the 40-token prompt) and global blocks with their own
    rope tables: each of these shapes the logits (so the parity test above exercises them all)."""
    from layerpack_runtime.models.gemma3 import FULL, SLIDING

    pack = packs["gemma3", "none"][1]
    arch = Pack(pack).manifest.architecture
    assert arch["family"] == "gemma3" and arch["activation"] == "gelu_pytorch_tanh" and arch["tie_word_embeddings"] is True
    assert arch["layer_types"] == [SLIDING, FULL, SLIDING, FULL] and arch["sliding_window"] == 16
    assert arch["rope"] == {"type": "linear", "theta": 100000.0, "scaling": {"factor": 2.0}}
    assert arch["rope_local"] == {"type": "default", "theta": 1000.0}
    assert arch["query_pre_attn_scalar"] == 24 and arch["qk_norm"] is True and arch["final_logit_softcapping"] is None
    names = {t.name for t in Pack(pack).manifest.layer("block.001").tensors}
    assert {"attn_post_norm.weight", "mlp_post_norm.weight", "attn.q_norm.weight"} <= names
    ids = torch.randint(3, 384, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(3))
    model = load(pack)
    want = model.logits(ids)
    inv = dict(model.inv_freq)
    model.inv_freq = {FULL: inv[SLIDING], SLIDING: inv[SLIDING]}
    assert rel_diff(model.logits(ids), want) > 1e-3  # global blocks use their own table
    model.inv_freq = {FULL: inv[FULL], SLIDING: inv[FULL]}
    assert rel_diff(model.logits(ids), want) > 1e-3  # ...and so do sliding ones
    model.inv_freq = inv
    model.args.sliding_window = None
    full = model.logits(ids)
    assert torch.equal(full[:, :16], want[:, :16]) and rel_diff(full[:, 16:], want[:, 16:]) > 1e-3  # the window bites after 16


# -- packs of unknown families --------------------------------------------------------------------

def _with_family(src: str, dst, family: str) -> str:
    """A copy of pack `src` whose manifest names another family (layer files linked, not copied)."""
    os.makedirs(dst / "layers")
    for root, _, files in os.walk(src):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), src)
            if rel != "manifest.json":
                os.link(os.path.join(root, f), dst / rel)
    with open(os.path.join(src, "manifest.json")) as f:
        m = json.load(f)
    m["architecture"]["family"] = family
    with open(dst / "manifest.json", "w") as f:
        json.dump(m, f)
    return str(dst)


def test_packs_without_the_new_optional_fields_still_load(packs, tmp_path):
    """Manifests written before qk_norm existed (llama-family packs) load and run as before."""
    src = packs["mistral", "none"][1]
    old = _with_family(src, tmp_path / "old", "mistral")
    with open(os.path.join(old, "manifest.json")) as f:
        m = json.load(f)
    del m["architecture"]["qk_norm"]
    with open(os.path.join(old, "manifest.json"), "w") as f:
        json.dump(m, f)
    ids = [5, 6, 7, 8]
    assert torch.equal(load(old).logits(ids), load(src).logits(ids))


def test_unknown_family_is_a_clear_error_from_load_and_cli(packs, tmp_path):
    pack = _with_family(packs["qwen3", "none"][1], tmp_path / "future", "mamba9")
    with pytest.raises(LayerpackError, match=r"'mamba9' is not supported.*supported: .*llama.*qwen3") as e:
        load(pack)
    assert "\n" not in str(e.value)
    r = run_cli("run", pack, "Hello", "--max-new-tokens", "2")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "mamba9" in r.stderr and "qwen3" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
