"""The runtime's layered generation against transformers: logits of tiny fp32 checkpoints of every
family (prefill and KV-cache decode steps), greedy generation of the real SmolLM2 in bf16 token for
token, an NF4 pack that still answers; batching with left padding, sampling, stop strings, chat
templates, errors, the `layerpack run` command, and no toolkit imports."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import decode_diffs, make_checkpoint, rel_diff, run_cli, write_tiny_tokenizer
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime import LayerpackError, load
from layerpack_runtime.generate import SamplingParams, sample
from layerpack_runtime.models import llama, module_for

REL_TOL = 1e-4
DECODE_STEPS = 16
PROMPT_LEN = 40  # > mistral's sliding window of 32: the window shapes the mask
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
# name -> (HF family, config overrides)
VARIANTS = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "llama3_rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "linear_rope": ("llama", {"rope_parameters": LINEAR_ROPE}),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{variant: (fp32 checkpoint, pack converted with --quant none)}; llama also has a tokenizer."""
    root = tmp_path_factory.mktemp("runtime")
    out = {}
    for name, (family, over) in VARIANTS.items():
        ckpt = make_checkpoint(root / f"ckpt_{name}", family, dtype=torch.float32, **over)
        if name == "llama":
            write_tiny_tokenizer(ckpt)
        pack = str(root / f"pack_{name}")
        convert(ckpt, pack, ConvertOptions(quant="none", quiet=True))
        out[name] = (ckpt, pack)
    return out


@pytest.fixture(scope="module")
def tiny_llama(tiny):
    return load(tiny["llama"][1])


# -- parity with transformers -----------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers_prefill_and_decode(tiny, variant):
    import transformers

    ckpt, pack = tiny[variant]
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    model = load(pack)
    assert model.dtype == torch.float32 and model.args.family == VARIANTS[variant][0]
    ids = torch.randint(3, 384, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    diffs = decode_diffs({"runtime": model}, ref, ids, DECODE_STEPS)
    with torch.no_grad():
        diffs["no_cache"] = rel_diff(model.logits(ids), ref(ids).logits)
    print(f"\n{variant}: max rel diff {max(diffs.values()):.2e} ({', '.join(f'{k} {v:.1e}' for k, v in diffs.items())})")
    assert max(diffs.values()) < REL_TOL, diffs


def test_sliding_window_is_applied(tiny):
    model = load(tiny["mistral"][1])
    ids = torch.randint(3, 384, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(2))
    windowed = model.logits(ids)
    model.args.sliding_window = None
    full = model.logits(ids)
    window = 32
    assert torch.equal(windowed[:, :window], full[:, :window])  # the window does not bite yet
    assert rel_diff(windowed[:, window:], full[:, window:]) > 1e-3  # ...and then it does


def test_qwen2_per_layer_sliding_window(tmp_path):
    """HF Qwen2 windows only blocks >= max_window_layers: the converter records that as `layer_types`,
    and the runtime then matches transformers (and differs when every block is windowed)."""
    import transformers

    from layerpack_runtime import Pack
    from layerpack_runtime.loader import LayeredModel

    ckpt = make_checkpoint(tmp_path / "ckpt", "qwen2", dtype=torch.float32, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    convert(ckpt, str(tmp_path / "pack"), ConvertOptions(quant="none", quiet=True))
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    pack = Pack(tmp_path / "pack")
    assert pack.manifest.architecture["layer_types"] == ref.config.layer_types == ["full_attention"] + ["sliding_attention"] * 2
    ids = torch.randint(3, 384, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = ref(ids).logits
    assert rel_diff(load(tmp_path / "pack").logits(ids), want) < REL_TOL
    pack.manifest.architecture["layer_types"] = ["sliding_attention"] * 3  # every block windowed: different
    assert rel_diff(LayeredModel(pack).logits(ids), want) > 1e-3
    pack.manifest.architecture["layer_types"] = None  # a qwen2 window without layer_types is ambiguous: refused
    with pytest.raises(LayerpackError, match="sliding window"):
        LayeredModel(pack)


def test_rope_scaling_changes_frequencies(tiny):
    base = llama.rope_inv_freq(load(tiny["llama"][1]).args)
    l3 = llama.rope_inv_freq(load(tiny["llama3_rope"][1]).args)
    lin = llama.rope_inv_freq(load(tiny["linear_rope"][1]).args)
    assert torch.allclose(lin, base / 2)
    # llama3: long wavelengths divided by the factor, the rest smoothly less (original context 16 here)
    assert torch.allclose(l3[-1], base[-1] / 4) and bool((l3 <= base).all()) and bool((l3 > base / 4 - 1e-7).all())


# -- generation mechanics -----------------------------------------------------------------------

def test_batched_left_padded_generation_matches_single_prompts(tiny):
    for variant in ("mistral", "qwen2"):  # sliding window + padding; biases
        model = load(tiny[variant][1])
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (37, 12, 25)]
        batched = model.generate_ids(prompts, max_new_tokens=10)
        assert batched == [model.generate_ids(p, max_new_tokens=10) for p in prompts]
        assert max(map(len, batched)) == 10  # a row that hits EOS ends (mistral's third at once); the others go on


def test_padded_logits_match_unpadded(tiny):
    model = load(tiny["llama"][1])
    g = torch.Generator().manual_seed(4)
    short, long = torch.randint(3, 384, (9,), generator=g), torch.randint(3, 384, (15,), generator=g)
    ids = torch.stack([torch.cat([torch.zeros(6, dtype=torch.long), short]), long])
    mask = torch.stack([torch.cat([torch.zeros(6, dtype=torch.long), torch.ones(9, dtype=torch.long)]), torch.ones(15, dtype=torch.long)])
    out = model.forward(ids, cache=model.new_cache(2, 15), attention_mask=mask)
    assert rel_diff(out[0, 6:], model.logits(short)[0]) < REL_TOL and rel_diff(out[1], model.logits(long)[0]) < REL_TOL


def test_chunked_prefill_matches_whole_sequence(tiny):
    model = load(tiny["mistral"][1])  # the second chunk crosses the sliding window
    ids = torch.randint(3, 384, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(6))
    cache = model.new_cache(1, PROMPT_LEN)
    chunks = torch.cat([model.forward(ids[:, :25], cache=cache), model.forward(ids[:, 25:], cache=cache)], dim=1)
    assert rel_diff(chunks, model.logits(ids)) < REL_TOL


def test_greedy_generate_ids_feeds_argmax(tiny):
    model = load(tiny["qwen2"][1])
    ids = torch.randint(3, 384, (8,), generator=torch.Generator().manual_seed(5)).tolist()
    new = model.generate_ids(ids, max_new_tokens=6)
    seq = list(ids)
    for _ in range(6):  # cache-free recomputation of every step
        seq.append(int(model.logits(seq)[0, -1].argmax()))
    assert new == seq[len(ids):]


def test_sampling():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    assert sample(logits, SamplingParams()).tolist() == [1]
    assert sample(logits, SamplingParams(temperature=5.0, top_k=1)).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    picks = {sample(logits, SamplingParams(temperature=1.0, top_k=2), g).item() for _ in range(200)}
    assert picks == {1, 2}
    # top_p: token 1 alone holds < 0.6 of the mass, tokens 1+2 more: only they survive
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.6), g).item() for _ in range(200)}
    assert picks == {1, 2}
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.01), g).item() for _ in range(50)}
    assert picks == {1}
    for bad in (SamplingParams(temperature=-1), SamplingParams(top_k=-2), SamplingParams(top_p=0.0), SamplingParams(top_p=1.5)):
        with pytest.raises(LayerpackError):
            bad.check()


def test_text_generation_stream_stop_and_seed(tiny_llama):
    m = tiny_llama
    text = m.generate("Hello world", max_new_tokens=12)
    assert isinstance(text, str) and text
    assert "".join(m.generate("Hello world", max_new_tokens=12, stream=True)) == text
    assert m.last_stats.steps == 12 and m.last_stats.prompt_tokens == len(m.tokenizer.encode("Hello world"))
    # A stop string ends generation and is not part of the text, streamed or not.
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text[: text.find(stop)]
    assert m.generate("Hello world", max_new_tokens=12, stop=[stop]) == cut
    assert "".join(m.generate("Hello world", max_new_tokens=12, stop=stop, stream=True)) == cut
    assert m.generate(["Hello world", "The quick fox"], max_new_tokens=12)[0] == text
    s1 = m.generate("Hello world", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert s1 == m.generate("Hello world", max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert m.generate("Hello world", max_new_tokens=0) == ""


def test_tokenizer_and_chat_template_match_transformers(tiny, tiny_llama):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(tiny["llama"][0])
    tok = tiny_llama.tokenizer
    assert tok.bos_id == 1 and 2 in tok.eos_ids
    for text in ("Hello world", "layer by layer, the quick dog"):
        assert tok.encode(text) == hf(text)["input_ids"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    ref = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert tiny_llama.encode_prompt(msgs) == ref and ref.count(1) == 1  # one BOS: the template's
    assert tiny_llama.encode_prompt("Hello world", chat=True) == hf.apply_chat_template(
        [{"role": "user", "content": "Hello world"}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert tiny_llama.generate("Hello world", chat=True, max_new_tokens=4) == tiny_llama.generate(
        [{"role": "user", "content": "Hello world"}], max_new_tokens=4)


def test_chat_without_jinja2_is_a_clear_error(tiny, monkeypatch):
    model = load(tiny["llama"][1])
    monkeypatch.setitem(sys.modules, "jinja2", None)  # import jinja2 -> ImportError
    with pytest.raises(LayerpackError, match="jinja2"):
        model.generate("Hello", chat=True, max_new_tokens=2)
    assert model.generate("Hello", max_new_tokens=2) is not None  # plain prompts need no jinja2


def test_errors_are_layerpack_errors(tiny):
    with pytest.raises(LayerpackError, match=r"'gpt2'.*llama, mistral, .*qwen2, .*qwen3"):
        module_for("gpt2")
    arch = dict(load(tiny["llama"][1]).manifest.architecture)
    with pytest.raises(LayerpackError, match=r"'yarn'.*default, linear, llama3"):
        llama.ModelArgs.from_dict({**arch, "rope": {"type": "yarn", "theta": 1e4, "scaling": {"factor": 4.0}}})
    with pytest.raises(LayerpackError, match="'gemma3'"):  # a family of another runtime module
        llama.ModelArgs.from_dict({**arch, "family": "gemma3"})
    no_tok = load(tiny["qwen2"][1])
    with pytest.raises(LayerpackError, match="tokenizer.json"):
        no_tok.generate("Hello", max_new_tokens=2)
    assert len(no_tok.generate_ids([5, 6, 7], max_new_tokens=3)) == 3  # token ids need no tokenizer
    no_template = load(tiny["llama"][1])
    no_template.tokenizer.chat_template = None
    with pytest.raises(LayerpackError, match="no chat template"):
        no_template.generate("Hello", chat=True)
    with pytest.raises(LayerpackError, match="outside the vocabulary"):
        no_tok.logits([1, 384])
    with pytest.raises(LayerpackError, match="single prompt"):
        load(tiny["llama"][1]).generate(["a", "b"], stream=True)
    with pytest.raises(LayerpackError, match="device"):
        load(tiny["llama"][1], device="nonsense")
    with pytest.raises(LayerpackError, match="dtype"):
        load(tiny["llama"][1], dtype="int8")


def test_compute_dtype_override(tiny):
    ckpt, pack = tiny["llama"]
    m32, m16 = load(pack), load(pack, dtype="bf16")
    assert m16.dtype == torch.bfloat16 and m16.weights_for("block.000")["attn.q.weight"].dtype == torch.bfloat16
    ids = list(range(3, 30))
    assert rel_diff(m16.logits(ids), m32.logits(ids)) < 0.05


# -- the CLI and dependencies ---------------------------------------------------------------------

def test_cli_run_streams_the_same_text(tiny, tiny_llama):
    pack = tiny["llama"][1]
    r = run_cli("run", pack, "Hello world", "--max-new-tokens", "10", "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == tiny_llama.generate("Hello world", max_new_tokens=10) + "\n"
    assert "tokens/s" in r.stderr and "prefill" in r.stderr
    r = run_cli("run", pack, "Hello world", "--chat", "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "20",
                "--top-p", "0.9", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout == tiny_llama.generate("Hello world", chat=True, max_new_tokens=5, temperature=0.8, top_k=20, top_p=0.9, seed=3) + "\n"
    r = run_cli("run", tiny["qwen2"][1], "Hello")  # no tokenizer: one line, exit 1
    assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("run", pack, "Hello", "--device", "nonsense")
    assert r.returncode == 1 and "device" in r.stderr


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'transformers', 'bitsandbytes', 'click', 'jsonschema', 'huggingface_hub', 'safetensors', 'layerpack'}:
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, Block())
from layerpack_runtime import load
m = load(sys.argv[1])
print(repr(m.generate('Hello world', max_new_tokens=4)), repr(m.generate('Hello', chat=True, max_new_tokens=3)))
"""


def test_generation_needs_no_toolkit_dependencies(tiny):
    r = subprocess.run([sys.executable, "-c", BLOCKER, tiny["llama"][1]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


EXIT_CHECK = r"""
import atexit, gc, sys
out = open(sys.argv[2], "w")  # never closed: module teardown at exit must still flush it
# registered before the model is made, so it runs after the runtime's exit hook (atexit is LIFO)
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))
from layerpack_runtime import load
m = load(sys.argv[1])
out.write(repr(m.generate('Hello world', max_new_tokens=4)))
print("frozen before exit:", gc.get_freeze_count() > 0, flush=True)
"""


def test_exit_skips_the_shutdown_collection_and_still_flushes(tiny, tmp_path):
    """loader._skip_exit_collection: a process that made a model freezes its heap at exit (the
    shutdown collections then skip torch's objects: scripts/bench_startup.py), not before, and
    what the program wrote is still there."""
    written = tmp_path / "out.txt"
    r = subprocess.run([sys.executable, "-c", EXIT_CHECK, tiny["llama"][1], str(written)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["frozen before exit: False", "frozen at exit: True"]
    assert written.read_text() == repr(load(tiny["llama"][1]).generate('Hello world', max_new_tokens=4))


# -- the real SmolLM2-135M-Instruct -----------------------------------------------------------------

CHAT = [{"role": "user", "content": "Write a short poem about the ocean."}]


@pytest.fixture(scope="module")
def smol_packs(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("smol_runtime")
    variants = {"none": {}, "nf4": dict(quant="nf4"), "fp32": dict(dtype="fp32")}
    for name, opts in variants.items():
        convert(smollm2, str(root / name), ConvertOptions(quiet=True, **opts))
    return {name: str(root / name) for name in variants}


@pytest.mark.slow
def test_smollm2_fp32_logits_match_transformers_prefill_and_16_decode_steps(smollm2, smol_packs):
    """The real model, fp32 pack vs transformers fp32 on the same weights, with the KV cache;
    resident and streamed (a budget of ~40% of the pack) give the same logits."""
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    model = load(smol_packs["fp32"])
    streamed = load(smol_packs["fp32"], max_memory=int(0.4 * model.plan.weights_bytes) + 60_000_000)
    assert streamed.plan.streamed
    ids = torch.tensor([model.encode_prompt(CHAT)])
    with torch.no_grad():
        out = ref(ids, use_cache=True)
    caches = [m.new_cache(1, ids.shape[1] + 16) for m in (model, streamed)]
    first = [m.forward(ids, cache=c) for m, c in zip((model, streamed), caches)]
    assert torch.equal(first[0], first[1])
    diffs = [rel_diff(first[0], out.logits)]
    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(16):
        with torch.no_grad():
            out = ref(tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        got = [m.forward(tok, cache=c) for m, c in zip((model, streamed), caches)]
        assert torch.equal(got[0], got[1])
        diffs.append(rel_diff(got[0], out.logits))
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    print(f"\nSmolLM2 fp32: max rel diff {max(diffs):.2e}")
    assert max(diffs) < REL_TOL, diffs


@pytest.mark.slow
def test_smollm2_bf16_greedy_matches_transformers(smollm2, smol_packs):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    enc = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = ref.generate(**enc, max_new_tokens=32, do_sample=False)
    expected = out[0, enc["input_ids"].shape[1]:].tolist()
    eos = ref.generation_config.eos_token_id
    if expected and expected[-1] in (eos if isinstance(eos, list) else [eos]):
        expected = expected[:-1]

    model = load(smol_packs["none"])
    assert model.dtype == torch.bfloat16
    assert model.encode_prompt(CHAT) == enc["input_ids"][0].tolist()
    assert model.generate_ids(CHAT, max_new_tokens=32) == expected
    text = model.generate(CHAT, max_new_tokens=32)
    assert text == tok.decode(expected, skip_special_tokens=True)
    print(f"\nSmolLM2 bf16 greedy: {text!r}\n{model.last_stats.summary()}")


@pytest.mark.slow
def test_smollm2_nf4_knows_paris(smol_packs):
    model = load(smol_packs["nf4"])
    answer = model.generate("What is the capital of France?", chat=True, max_new_tokens=24)
    print(f"\nSmolLM2 nf4: {answer!r}\n{model.last_stats.summary()}")
    assert "Paris" in answer
