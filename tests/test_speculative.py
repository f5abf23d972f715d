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
from layerpack_runtime import load
from layerpack_runtime import drafts
from layerpack_runtime.cache import KVCache
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.generate import GenerationStats, SamplingParams
from layerpack_runtime.speculative import Speculation, SpeculationStats, speculative_tokens

FAMILIES = ("llama", "gemma3", "mixtral")
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
    fixed = model._kv_bytes(model.context) + model._activation_bytes(model.step_tokens) + model._runtime_bytes()
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
