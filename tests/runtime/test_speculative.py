"""Speculative decoding (speculative.py, drafts.py, cache.add_tree/keep): a token tree verified in
one pass gives the logits of each path run alone; greedy output is the plain output token for
token (llama, gemma3 with its sliding window, mixtral; resident and streamed); sampled output has
the target's distribution (chi-square tests that a deliberately broken rule fails); drafts must
share the tokenizer."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from conftest import make_checkpoint, one_line_error, run_cli, write_tiny_tokenizer
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime import load as _load
from layerpack_runtime import drafts
from layerpack_runtime.cache import KVCache
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.generate import GenerationStats, SamplingParams
from layerpack_runtime.speculative import Speculation, SpeculationStats, speculative_tokens

FAMILIES = ("llama", "gemma3", "mixtral")


def load(*args, **kwargs):
    return _load(*args, **{"threads": 1, **kwargs})  # tiny models: one thread is fastest on a busy machine
# A prompt with repeats (prompt lookup finds matches) longer than gemma3's 16-token window.
PROMPT = [1, 5, 9, 13, 7, 5, 9, 13, 22, 40, 5, 9, 13, 7, 61, 5, 9, 30, 31, 32, 5, 9, 13]


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    """fp32 packs: {family}, and a draft for llama (another seed, same tokenizer)."""
    root = tmp_path_factory.mktemp("spec")
    out = {}
    for name, fam, seed in [("llama", "llama", 0), ("gemma3", "gemma3", 0), ("mixtral", "mixtral", 0), ("llama_draft", "llama", 1)]:
        ck = make_checkpoint(root / f"ck_{name}", fam, dtype=torch.float32, seed=seed)
        write_tiny_tokenizer(ck)
        out[name] = str(root / name)
        convert(ck, out[name], ConvertOptions(quiet=True))
    return out


def _streaming_budget(model) -> int:
    """A max_memory that keeps embed + head resident and streams every block."""
    costs = {u: model._unit_cost(u) for u in model.units}
    fixed = model.fixed_bytes
    return fixed + costs["embed"].stored + costs["head"].stored + 2 * max(costs[u].streamed for u in model.block_units) + 16


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_pass_gives_each_paths_logits_and_keep_continues_it(packs, family):
    model = load(packs[family], dtype="float32")
    prompt = torch.tensor([PROMPT])
    # a tree under the root token 5: 0 -> 1 -> 3 -> 5, 0 -> 2, 1 -> 4 (tokens in topological order)
    parents = [-1, 0, 0, 1, 1, 3]
    tokens = [5, 17, 23, 99, 42, 7]
    cache = model.new_cache(1, 64)
    model.forward(prompt, cache=cache)
    cache.add_tree(parents)
    tree_logits = model.forward(torch.tensor([tokens]), cache=cache)[0]
    assert cache.length == len(PROMPT) + len(tokens)
    for node in range(len(tokens)):
        path, n = [], node
        while n >= 0:
            path.insert(0, n)
            n = parents[n]
        alone = model.forward(torch.cat([prompt, torch.tensor([[tokens[i] for i in path]])], 1))[0, -1]
        torch.testing.assert_close(tree_logits[node], alone, rtol=1e-4, atol=1e-4)
    # keep 0 -> 1 -> 3 -> 5 (columns move left over 2), then decode on: same as the path run alone
    cache.keep([0, 1, 3, 5])
    assert cache.length == len(PROMPT) + 4 and cache.base is None
    nxt = model.forward(torch.tensor([[11]]), cache=cache)[0, -1]
    alone = model.forward(torch.cat([prompt, torch.tensor([[5, 17, 99, 7, 11]])], 1))[0, -1]
    torch.testing.assert_close(nxt, alone, rtol=1e-4, atol=1e-4)
    with pytest.raises(LayerpackError, match="not a root-first path"):
        cache.add_tree([-1, 0])
        model.forward(torch.tensor([[3, 4]]), cache=cache)
        cache.keep([1])


@pytest.mark.parametrize("family", FAMILIES)
def test_slot_tree_pass_gives_each_paths_logits_and_keep_continues_it(packs, family):
    """The same over the serving engine's slot cache (one active slot, after a compaction moved it)."""
    from layerpack_runtime.slots import SlotKVCache
    model = load(packs[family], dtype="float32")
    a = model.args
    prompt = torch.tensor([PROMPT])
    parents, tokens = [-1, 0, 0, 1, 1, 3], [5, 17, 23, 99, 42, 7]
    pre = model.new_cache(1, len(PROMPT))
    model.forward(prompt, cache=pre)
    longer = model.new_cache(1, len(PROMPT) + 4)
    model.forward(torch.tensor([PROMPT + [40, 41, 42, 43]]), cache=longer)
    slots = SlotKVCache(a.num_layers, 2, a.num_kv_heads, len(PROMPT) + 14, a.head_dim, model.dtype)
    slots.add([(layer.k[0], layer.v[0]) for layer in longer.layers])  # a longer one, then it ends
    slots.add([(layer.k[0], layer.v[0]) for layer in pre.layers])
    slots.remove(0)  # the prompt's slot moves to row 0; its columns start at 4
    assert slots.active == 1 and slots.lengths[0] == len(PROMPT) and slots.end == len(PROMPT) + 4
    realigns = slots.realigns  # the long prompt's add shifted the timeline right
    slots.add_tree(parents)
    tree_logits = model.forward(torch.tensor([tokens]), cache=slots.view())[0]
    assert slots.realigns == realigns and slots.end == len(PROMPT) + 4  # the tree's columns are tentative
    for node in range(len(tokens)):
        path, n = [], node
        while n >= 0:
            path.insert(0, n)
            n = parents[n]
        alone = model.forward(torch.cat([prompt, torch.tensor([[tokens[i] for i in path]])], 1))[0, -1]
        torch.testing.assert_close(tree_logits[node], alone, rtol=1e-4, atol=1e-4)
    slots.keep([0, 1, 3, 5])
    assert slots.lengths[0] == len(PROMPT) + 4 and slots.end == len(PROMPT) + 8
    nxt = model.forward(torch.tensor([[11]]), cache=slots.view())[0, -1]
    alone = model.forward(torch.cat([prompt, torch.tensor([[5, 17, 99, 7, 11]])], 1))[0, -1]
    torch.testing.assert_close(nxt, alone, rtol=1e-4, atol=1e-4)
    # a tree that does not fit after the sequence: the slot compacts left first; the root alone is kept
    slots.add_tree([-1, 0, 1, 2, 3, 4])
    model.forward(torch.tensor([[3, 4, 6, 8, 10, 12]]), cache=slots.view())
    assert slots.realigns == realigns + 1
    slots.keep([0])
    nxt = model.forward(torch.tensor([[12]]), cache=slots.view())[0, -1]
    alone = model.forward(torch.cat([prompt, torch.tensor([[5, 17, 99, 7, 11, 3, 12]])], 1))[0, -1]
    torch.testing.assert_close(nxt, alone, rtol=1e-4, atol=1e-4)
    with pytest.raises(LayerpackError, match="not a root-first path"):
        slots.add_tree([-1, 0])
        model.forward(torch.tensor([[3, 4]]), cache=slots.view())
        slots.keep([1])
    slots.add([(layer.k[0, :, :2], layer.v[0, :, :2]) for layer in pre.layers])
    with pytest.raises(LayerpackError, match="exactly one active slot"):
        slots.add_tree([-1])


def test_cache_refuses_a_plain_forward_over_tentative_columns():
    cache = KVCache(0, 1, 1, 16, 4, torch.float32)
    cache.add_tree([-1, 0, 0])
    cache.reserve(torch.empty(1, 3), None)
    cache.commit(3, None)
    with pytest.raises(LayerpackError, match="tentative"):
        cache.reserve(torch.empty(1, 1), None)
    with pytest.raises(LayerpackError, match="not an earlier node"):
        cache.add_tree([5])
    cache.keep([])  # rollback
    assert cache.length == 0 and int(cache.next_pos) == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
def test_greedy_is_the_plain_output_token_for_token(packs, family, streamed):
    model = load(packs[family], dtype="float32", context=128)
    if streamed:
        model = load(packs[family], dtype="float32", max_memory=_streaming_budget(model), context=128)
        assert model.plan.streamed
    want = model.generate_ids(PROMPT, max_new_tokens=40)
    assert len(want) == 40  # no EOS: the whole length is compared
    for opts in (dict(speculate="lookup"), dict(speculate="lookup", draft_tokens=3), dict(draft=model, draft_tokens=12)):
        got = model.generate_ids(PROMPT, max_new_tokens=40, **opts)
        assert got == want, opts
        s = model.last_speculation
        assert s.tokens == 39 and s.passes == len(s.accepted) and s.passes + sum(s.accepted) >= 39
    if family == "llama":  # a draft model of its own (another seed)
        draft = load(packs["llama_draft"], dtype="float32")
        assert model.generate_ids(PROMPT, max_new_tokens=40, draft=draft) == want
        # greedy from a model fed its own output loops: lookup then accepts several tokens per pass
        model.generate_ids(PROMPT, max_new_tokens=40, speculate="lookup")
        assert max(model.last_speculation.accepted) >= 2


# -- sampling: the output distribution is the target's ---------------------------------------------

class MarkovModel:
    """A stand-in model whose next-token logits depend only on the current token (a [V, V] table),
    driven through a real KVCache (no layers): the exact distribution of the next tokens is a
    product of table rows, and thousands of samples take seconds."""

    def __init__(self, table: torch.Tensor):
        self.table = table.float()

    def new_cache(self, batch, max_len, step_tokens=None):
        return KVCache(0, batch, 1, max_len, 1, torch.float32)

    def forward(self, ids, cache=None, attention_mask=None, last_only=False):
        start, _ = cache.reserve(ids, None)
        assert cache.kv_valid(start + ids.shape[1]) is None or cache.kv_valid(start + ids.shape[1]).shape[-1] == start + ids.shape[1]
        cache.commit(ids.shape[1], None)
        out = self.table[ids]
        return out[:, -1:] if last_only else out


def chi_square_p(counts: dict, expected: dict, n: int) -> float:
    """Goodness-of-fit p-value of sample counts against exact probabilities; outcomes expected
    fewer than 5 times are pooled into one bin (the chi-square approximation needs >= 5)."""
    big = [k for k, p in expected.items() if p * n >= 5]
    obs = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    exp = [expected[k] * n for k in big] + [n - sum(expected[k] * n for k in big)]
    if exp[-1] < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def exact_joint(next_probs, prompt_last: int, k: int) -> dict:
    """{(t1..tk): probability} of the next k tokens; next_probs(token) -> distribution [V] after it."""
    out = {(): 1.0}
    last = {(): prompt_last}
    for _ in range(k):
        new, new_last = {}, {}
        for seq, p in out.items():
            dist = next_probs(last[seq])
            for t in torch.nonzero(dist > 0).flatten().tolist():
                new[seq + (t,)] = p * float(dist[t])
                new_last[seq + (t,)] = t
        out, last = new, new_last
    return out


def sample_counts(model, prompt, n, k, params, spec, seed, residual=True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    counts: dict = {}
    for _ in range(n):
        if spec is None:
            from layerpack_runtime.generate import generate_tokens
            toks = generate_tokens(model, [prompt], k, params, 0, gen, GenerationStats())
        else:
            toks = speculative_tokens(model, [prompt], k, params, gen, GenerationStats(), spec, residual=residual)
        seq = tuple(int(t) for t in toks)
        counts[seq] = counts.get(seq, 0) + 1
    return counts


# False-failure probability: an exact sampler fails a test below with probability 1e-6 (the p-value
# threshold) per chi-square; seeds are fixed, so each test's outcome is the same on every run.
P_FAIL = 1e-6


def _markov_pair():
    V = 5
    g = torch.Generator().manual_seed(0)
    target_table = torch.randn(V, V, generator=g) * 1.5
    draft_table = target_table + torch.randn(V, V, generator=g) * 1.5  # a draft that is often wrong
    return MarkovModel(target_table), MarkovModel(draft_table)


def test_speculative_sampling_has_the_target_distribution_markov(monkeypatch):
    """Draft trees with siblings (multi-candidate rejection sampling) and prompt lookup both sample
    the next 3 tokens with the target's distribution (as plain sampling does); forgetting the
    residual after a rejection does not."""
    monkeypatch.setattr(drafts, "SAMPLED_FIRST_CHILD", 0.5)  # 0.5: the draft tree has siblings, not just a chain
    target, draft = _markov_pair()
    k, n = 3, 2000
    params = SamplingParams(temperature=0.9, top_k=4)
    from layerpack_runtime.generate import sampling_probs
    exact = exact_joint(lambda t: sampling_probs(target.table[t][None], params)[0], 2, k)
    spec_draft = Speculation("draft", draft=draft, draft_tokens=6)
    spec_lookup = Speculation("lookup", draft_tokens=6)
    lookup_prompt = [0, 1, 2, 3, 4, 2, 1, 0, 2]
    for spec, prompt in ((spec_draft, [0, 1, 2]), (spec_lookup, lookup_prompt)):
        stats = SpeculationStats()
        list(speculative_tokens(target, [prompt], 40, params, torch.Generator().manual_seed(1), GenerationStats(), spec, stats))
        assert sum(stats.accepted) > 0 and max(stats.positions) > 3, spec  # candidates were proposed and some accepted
    p_plain = chi_square_p(sample_counts(target, [0, 1, 2], n, k, params, None, seed=2), exact, n)
    p_draft = chi_square_p(sample_counts(target, [0, 1, 2], n, k, params, spec_draft, seed=3), exact, n)
    p_lookup = chi_square_p(sample_counts(target, lookup_prompt, n, k, params, spec_lookup, seed=4), exact, n)
    p_broken = chi_square_p(sample_counts(target, [0, 1, 2], n, k, params, spec_draft, seed=3, residual=False), exact, n)
    print(f"p-values: plain {p_plain:.3g}, draft {p_draft:.3g}, lookup {p_lookup:.3g}, broken rule {p_broken:.3g}")
    assert min(p_plain, p_draft, p_lookup) > P_FAIL
    assert p_broken < 1e-12


def test_speculative_sampling_has_the_target_distribution_tiny_model(packs, tmp_path):
    """The same on a real (tiny) llama pack with a draft pack that is too sure of itself (its head
    scaled x4): with and without speculation the next 3 tokens (temperature 0.1, top-k 2) pass
    the chi-square test against the exact distribution; the broken rule fails it."""
    from safetensors.torch import load_file, save_file

    ck = make_checkpoint(tmp_path / "ck", "llama", dtype=torch.float32, seed=0)  # the target's checkpoint (seed 0) ...
    write_tiny_tokenizer(ck)
    for f in os.listdir(ck):
        if f.endswith(".safetensors"):
            t = load_file(os.path.join(ck, f))
            if "lm_head.weight" in t:  # ... with a sharper head
                t["lm_head.weight"] = t["lm_head.weight"] * 4
                save_file(t, os.path.join(ck, f), metadata={"format": "pt"})
    convert(ck, str(tmp_path / "draft"), ConvertOptions(quiet=True))
    target, draft = load(packs["llama"], dtype="float32"), load(tmp_path / "draft", dtype="float32")
    params, prompt, k, n = SamplingParams(temperature=0.1, top_k=2), [1, 5, 9], 3, 1000
    from layerpack_runtime.generate import sampling_probs

    def next_probs(seq):
        return sampling_probs(target.forward(torch.tensor([prompt + list(seq)]))[0, -1:], params)[0]
    exact = {(): 1.0}
    for _ in range(k):
        exact = {s + (t,): p * float(d[t]) for s, p in exact.items() for d in [next_probs(s)] for t in torch.nonzero(d).flatten().tolist()}
    spec = Speculation("draft", draft=draft, draft_tokens=4)
    p_plain = chi_square_p(sample_counts(target, prompt, n, k, params, None, seed=5), exact, n)
    p_spec = chi_square_p(sample_counts(target, prompt, n, k, params, spec, seed=6), exact, n)
    p_broken = chi_square_p(sample_counts(target, prompt, n, k, params, spec, seed=6, residual=False), exact, n)
    print(f"tiny model p-values: plain {p_plain:.3g}, speculative {p_spec:.3g}, broken rule {p_broken:.3g}")
    assert p_plain > P_FAIL and p_spec > P_FAIL
    assert p_broken < 1e-9


# -- the run command ----------------------------------------------------------------------------------

def test_run_speculate_prints_the_plain_text_and_stats(packs):
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    plain = run_cli("run", packs["llama"], prompt, "--max-new-tokens", "24", "--dtype", "fp32", "--threads", "1", check=True)
    for opts in (["--speculate", "lookup"], ["--draft", packs["llama_draft"], "--draft-tokens", "6"]):
        r = run_cli("run", packs["llama"], prompt, "--max-new-tokens", "24", "--dtype", "fp32", "--threads", "1", "--stats", *opts, check=True)
        assert r.stdout == plain.stdout, opts
        assert "speculation: " in r.stderr and "accepted candidates per pass: mean" in r.stderr and "MiB read per generated token" in r.stderr
    assert "draft memory plan: " in r.stderr


def test_run_speculate_refusals(packs, tmp_path):
    r = run_cli("run", packs["llama"], "hello", "--speculate", "lookup", "--stages", "2")
    assert "--speculate is not supported with --stages yet" in one_line_error(r)
    ck = make_checkpoint(tmp_path / "ck", "llama", vocab_size=320)
    write_tiny_tokenizer(ck, vocab_size=320)
    convert(ck, str(tmp_path / "other"), ConvertOptions(quiet=True))
    r = run_cli("run", packs["llama"], "hello", "--draft", tmp_path / "other")
    assert "the draft's vocabulary has 320 tokens, the target's 384" in one_line_error(r)
    r = run_cli("run", packs["llama"], "hello", "--draft-tokens", "4")
    assert "--draft-tokens needs --speculate lookup or --draft" in one_line_error(r)
    r = run_cli("run", packs["llama"], "hello", "--draft", packs["llama_draft"], "--max-memory", "100KB")
    assert "the draft takes" in one_line_error(r)


def test_speculation_is_one_prompt_at_a_time(packs):
    model = load(packs["llama"])
    with pytest.raises(LayerpackError, match="one prompt at a time"):
        model.generate_ids([[1, 2, 3], [4, 5]], max_new_tokens=4, speculate="lookup")
    with pytest.raises(LayerpackError, match="--speculate must be one of"):
        model.generate_ids([1, 2, 3], max_new_tokens=4, speculate="medusa")


# -- the serving engine (engine_speculation.py): a lone greedy request verifies trees ------------------

def _engine_run(engine, reqs: list[dict]) -> list[list[int]]:
    """Submit requests together and step the engine by hand until all finish; their tokens."""
    from layerpack_runtime.engine import Request  # noqa: F401 - the type submit_all takes
    out = [[] for _ in reqs]
    made = [engine.request(**kw, on_event=lambda e, i=i: out[i].append(e.token) if e.token is not None else None)
            for i, kw in enumerate(reqs)]
    engine.submit_all(made)
    while any(r.finish_reason is None for r in made):
        engine.step()
    assert all(r.finish_reason == "length" for r in made), [r.finish_reason for r in made]
    return out


def test_engine_speculation_is_the_plain_output_token_for_token(packs):
    from layerpack_runtime.engine import Engine
    from layerpack_runtime.request_sampling import RequestSampling

    model = load(packs["llama"], dtype="float32")
    other = [3, 8, 8, 21, 5, 9, 13, 7, 2]
    want = model.generate_ids(PROMPT, max_new_tokens=40)
    want_other = model.generate_ids(other, max_new_tokens=12)
    plain = Engine(model, max_batch=2, context=96)
    penalised = dict(prompt=PROMPT, max_tokens=30, sampling=RequestSampling(frequency_penalty=0.7, logit_bias={5: 3.0, 9: -2.0}))
    sampled = dict(prompt=PROMPT, max_tokens=20, params=SamplingParams(temperature=0.8), seed=5)
    want_penalised, want_sampled = _engine_run(plain, [penalised])[0], _engine_run(plain, [sampled])[0]
    assert want_penalised != want[:30]  # the processors change the output, so the comparison below means something
    drafts_ = {"lookup": None, "draft (another seed)": load(packs["llama_draft"], dtype="float32"),
               "draft (the target's own weights)": load(packs["llama"], dtype="float32")}
    for name, draft in drafts_.items():
        spec = Speculation(method="lookup" if draft is None else "draft", draft=draft)
        engine = Engine(model, max_batch=2, context=96, speculation=spec)
        assert _engine_run(engine, [dict(prompt=PROMPT, max_tokens=40)]) == [want], name
        alone = engine.stats.speculative_steps
        assert alone == engine.stats.steps and alone + engine.stats.accepted == 39, name
        if name != "draft (another seed)":
            assert engine.stats.accepted >= 3, name  # several tokens per pass, not just one
        # two requests batch (plain steps); when the short one ends the other speculates alone
        steps0 = engine.stats.speculative_steps
        assert _engine_run(engine, [dict(prompt=PROMPT, max_tokens=40), dict(prompt=other, max_tokens=12)]) == [want, want_other], name
        assert engine.stats.speculative_steps > steps0
        # penalties and logit_bias: the request's own sampler picks along the tree
        assert _engine_run(engine, [penalised]) == [want_penalised], name
        # opted out, or sampled: plain steps only (same tokens as the plain engine, same seed)
        steps0 = engine.stats.speculative_steps
        assert _engine_run(engine, [dict(prompt=PROMPT, max_tokens=40, speculate=False)]) == [want], name
        assert _engine_run(engine, [sampled]) == [want_sampled], name
        assert engine.stats.speculative_steps == steps0, name
    # the slot holds the tree's tentative columns: declared in the engine's workload
    assert engine.max_len == plain.max_len + spec.budget
