"""Fixed-shape decode steps (decode_step.py): the static step - keys/values written at a column held
in a device buffer, attention over the whole cache under a mask - gives the dynamic step's tokens
and logits (to rounding: the masked extra columns add exact zeros, in another summation order), on
CPU, for every family module that has one; on CUDA the same step captured as a graph gives the eager
static step's bits. CUDA-only checks skip with the reason printed."""
from __future__ import annotations

import pytest
import torch

from conftest import make_checkpoint
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime import load
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.generate import left_pad

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode_step")
    out = {}
    for name, family, quant, over in [("llama", "llama", "none", {}), ("qwen3", "qwen3", "none", {}),
                                      ("llama_nf4", "llama", "nf4", {}), ("gemma3", "gemma3", "none", {})]:
        ckpt = make_checkpoint(root / f"{name}-src", family, dtype=torch.float32, **over)
        convert(ckpt, str(root / name), ConvertOptions(quant=quant, dtype="fp32", quiet=True))
        out[name] = str(root / name)
    return out


def greedy(model, prompts: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Greedy tokens [B] and float32 logits [B, vocab] of each step (the first from the prefill)."""
    ids, mask = left_pad(prompts, 0)
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps, step_tokens=ids.numel())
    logits = model.forward(ids, cache=cache, attention_mask=mask, last_only=True)[:, -1]
    toks, outs = [], []
    for _ in range(steps):
        tok = logits.argmax(-1)
        toks.append(tok.cpu())
        outs.append(logits.cpu())
        logits = model.forward(tok[:, None], cache=cache, last_only=True)[:, -1]
    assert (cache.decoder is not None) == model.static_decode  # the fixed-shape step ran exactly when asked for
    return toks, outs


@pytest.mark.parametrize("name", ["llama", "qwen3", "llama_nf4"])
@pytest.mark.parametrize("prompts", [[list(range(3, 20))], [list(range(3, 20)), list(range(7, 12))]], ids=["one", "padded"])
def test_static_step_equals_dynamic(packs, name, prompts):
    dyn = load(packs[name], decode="dynamic", context=64)
    sta = load(packs[name], decode="static", context=64)
    assert sta.static_decode and not dyn.static_decode
    t_dyn, l_dyn = greedy(dyn, prompts, 12)
    t_sta, l_sta = greedy(sta, prompts, 12)
    assert [t.tolist() for t in t_sta] == [t.tolist() for t in t_dyn]
    for a, b in zip(l_sta, l_dyn):
        assert torch.allclose(a, b, rtol=0, atol=2e-5), (a - b).abs().max()
    # the static path really ran: the cache holds its decoder, and its length is aligned
    cache = sta.new_cache(1, 20)
    assert cache.max_len == 32 and sta.plan.kv_bytes >= sta.kv_bytes(32)


def test_modes_and_refusals(packs):
    m = load(packs["llama"], context=32)
    assert not m.static_decode and m.decode_description().startswith("dynamic")  # auto on CPU
    with pytest.raises(LayerpackError, match="CUDA"):
        load(packs["llama"], decode="graph", context=32)
    with pytest.raises(LayerpackError, match="sliding-window|no fixed-shape"):
        load(packs["gemma3"], decode="static", context=32)
    assert not load(packs["gemma3"], context=32).static_decode  # auto: dynamic where static is not available
    with pytest.raises(LayerpackError, match="decode must be one of"):
        load(packs["llama"], decode="fast")


def test_static_step_under_a_budget_streams(packs):
    """Streamed units run the same static step eagerly (a graph replays fixed weights only)."""
    full = load(packs["llama"], decode="static", context=40)
    budget = full.minimum_memory()
    small = load(packs["llama"], decode="static", context=40, max_memory=budget)
    assert "streamed" in small.placement().values()
    assert [t.tolist() for t in greedy(small, [list(range(3, 20))], 8)[0]] == \
           [t.tolist() for t in greedy(full, [list(range(3, 20))], 8)[0]]


@pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine (scripts/gpu_check.sh runs this on a GPU)")
@pytest.mark.parametrize("name", ["llama", "llama_nf4"])
def test_graph_equals_static_on_cuda(packs, name):
    graph = load(packs[name], device="cuda", dtype="bf16", decode="graph", context=64)
    eager = load(packs[name], device="cuda", dtype="bf16", decode="static", context=64)
    dyn = load(packs[name], device="cuda", dtype="fp32", decode="dynamic", context=64)
    g32 = load(packs[name], device="cuda", dtype="fp32", decode="graph", context=64)
    prompts = [list(range(3, 20)), list(range(7, 12))]
    t_g, l_g = greedy(graph, prompts, 16)
    t_e, l_e = greedy(eager, prompts, 16)
    assert all(torch.equal(a, b) for a, b in zip(l_g, l_e)), "a replayed graph must give the eager step's bits"
    assert [t.tolist() for t in t_g] == [t.tolist() for t in t_e]
    t_d, _ = greedy(dyn, prompts, 16)
    t_g32, _ = greedy(g32, prompts, 16)
    assert [t.tolist() for t in t_g32] == [t.tolist() for t in t_d]
    assert graph.decode_description().startswith("CUDA graph")


def test_a_generation_frees_its_cache_without_gc(packs):
    """The cache holds its decoder and the decoder does not hold the cache: no reference cycle, so
    a finished generation's cache (GPU memory, on CUDA) goes at once, not at the next gc."""
    import gc
    import weakref

    m = load(packs["llama"], decode="static", context=32)
    cache = m.new_cache(1, 32)
    m.forward(torch.tensor([[3, 4, 5]]), cache=cache)
    m.forward(torch.tensor([[6]]), cache=cache)
    assert cache.decoder is not None
    ref = weakref.ref(cache)
    gc.disable()
    try:
        del cache
        assert ref() is None
    finally:
        gc.enable()
