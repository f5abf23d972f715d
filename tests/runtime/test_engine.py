"""The continuous-batching engine (runtime/layerpack_runtime/engine.py, slots.py) against the plain
path: greedy (and seeded sampled) output of every request equals LayeredModel.generate on the same
prompt alone, while requests of different lengths join and leave the running batch, through
compactions of the slot timeline, for full-attention and sliding-window families. fp32 compute:
a batch changes the order of floating-point sums, and a tiny random bf16 model has near-ties that
such noise flips (the real-model check in test_serve.py runs in the pack's bf16)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import make_checkpoint, write_tiny_tokenizer
from layerpack.convert import ConvertOptions, convert
from layerpack_runtime import load
from layerpack_runtime.engine import Engine, QueueFull
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.generate import SamplingParams
from layerpack_runtime.slots import SlotKVCache

PROMPTS = [list(range(3, 3 + n)) for n in (5, 17, 9, 30, 2, 12, 21)]


@pytest.fixture(scope="module")
def packs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    out = {}
    for fam in ("llama", "gemma3", "phi3"):  # full attention; sliding windows with/without per-layer types
        ck = make_checkpoint(root / f"ck_{fam}", fam)
        write_tiny_tokenizer(ck)
        convert(ck, str(root / fam), ConvertOptions(quant="none", quiet=True))
        out[fam] = str(root / fam)
    return out


def run_concurrently(engine: Engine, prompts, max_tokens: int, stagger_s: float = 0.005, **kw):
    """Submit every prompt from its own thread (staggered, so requests join a running batch);
    returns [(token ids, Request)]."""
    results = [None] * len(prompts)

    def worker(i):
        time.sleep(stagger_s * i)
        ids, done = [], threading.Event()

        def on_event(e):
            if e.token is not None:
                ids.append(e.token)
            if e.finish_reason:
                done.set()

        r = engine.submit(prompts[i], max_tokens, on_event=on_event, **kw)
        done.wait(60)
        results[i] = (ids, r)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_batched_greedy_equals_single_prompt_generation(packs, family):
    model = load(packs[family], dtype="fp32")
    eos = set(model.eos_ids)
    ref = [model.generate_ids(p, max_new_tokens=20) for p in PROMPTS]
    # 3 slots for 7 requests, stepped by hand so that the schedule is fixed: one joins every third
    # step (mid-decode, its own length), finished ones leave; slack 1 forces compactions.
    engine = Engine(model, max_batch=3, context=51, slack=1)
    tokens = [[] for _ in PROMPTS]
    reqs, step = [], 0
    while len(reqs) < len(PROMPTS) or engine.active or engine.waiting:
        if len(reqs) < len(PROMPTS) and step % 3 == 0:
            i = len(reqs)
            reqs.append(engine.submit(PROMPTS[i], 20, on_event=lambda e, i=i: e.token is not None and tokens[i].append(e.token)))
        engine.step()
        step += 1
    results = list(zip(tokens, reqs))
    for (ids, r), want in zip(results, ref):
        got = [t for t in ids if t not in eos]
        assert got == want
        assert r.finish_reason == ("length" if len(want) == 20 else "stop")
        assert r.completion_tokens == len(ids)
    assert engine.stats.max_active == 3 and engine.cache.realigns > 0 and engine.stats.prefills > 2
    assert engine.stats.steps < sum(len(ids) for ids, _ in results)  # decode steps were shared


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_prompts_sharing_a_prefix_prefill_it_once_and_equal_single_prompt_generation(packs, family):
    # a burst of chat requests: the same template text, then each its own question (of different
    # lengths; one prompt is the shared text plus a single token). Admitted together, the shared
    # prefix is one forward and the rows' own tokens another (shared_prefix.py)
    model = load(packs[family], dtype="fp32")
    eos = set(model.eos_ids)
    head = [(7 * i) % 50 + 3 for i in range(40)]
    prompts = [head + tail for tail in ([60], [61, 62, 63], [64, 65], [66, 67, 68, 69, 70])]
    ref = [model.generate_ids(p, max_new_tokens=12) for p in prompts]
    engine = Engine(model, max_batch=4, context=64)
    tokens = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        engine.submit(p, 12, on_event=lambda e, i=i: e.token is not None and tokens[i].append(e.token))
    engine.step()
    assert engine.stats.prefills == 2 and engine.active == len(prompts)  # the prefix once, then the rows' own tokens
    while engine.active:
        engine.step()
    assert [[t for t in ids if t not in eos] for ids in tokens] == ref
    # without a prefix worth sharing: one left-padded forward
    engine.submit(list(range(3, 20)), 2)
    engine.submit(list(range(4, 30)), 2)
    engine.step()
    assert engine.stats.prefills == 3


def test_seeded_sampling_equals_single_prompt_generation(packs):
    model = load(packs["llama"], dtype="fp32")
    ref = [model.generate_ids(p, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=7 + i) for i, p in enumerate(PROMPTS[:4])]
    engine = Engine(model, max_batch=4, context=64).start()
    try:
        results = [None] * 4
        threads = []
        for i in range(4):
            def worker(i=i):
                text, r = engine.generate(PROMPTS[i], 12, SamplingParams(0.8, 0, 0.9), seed=7 + i)
                results[i] = text
            threads.append(threading.Thread(target=worker))
            threads[-1].start()
        for t in threads:
            t.join()
    finally:
        engine.close()
    assert results == [model.tokenizer.decode(ids) for ids in ref]


def test_cancel_frees_the_slot_and_others_go_on(packs):
    model = load(packs["llama"], dtype="fp32")
    want = model.generate_ids(PROMPTS[1], max_new_tokens=30)
    engine = Engine(model, max_batch=2, context=64).start()
    try:
        events = []
        long = engine.submit(PROMPTS[0], 50, on_event=events.append)
        while len(events) < 3:
            time.sleep(0.001)
        other = [None]
        t = threading.Thread(target=lambda: other.__setitem__(0, engine.generate(PROMPTS[1], 30)))
        t.start()
        long.cancel()
        t.join(60)
        assert long.finish_reason == "cancelled" and long.completion_tokens < 50
        assert events[-1].finish_reason == "cancelled"
        text, r = other[0]
        assert text == model.tokenizer.decode(want)
        deadline = time.time() + 10
        while engine.active and time.time() < deadline:
            time.sleep(0.01)
        assert engine.active == 0 and engine.cache.active == 0
    finally:
        engine.close()


def test_bad_requests_and_a_full_queue_are_refused(packs):
    model = load(packs["llama"])
    engine = Engine(model, max_batch=1, context=32, max_queue=1)  # not started: requests stay queued
    with pytest.raises(LayerpackError, match="exceeds the context of 32"):
        engine.submit(list(range(3, 23)), 13)
    with pytest.raises(LayerpackError, match="max_tokens"):
        engine.submit([3, 4], 0)
    with pytest.raises(LayerpackError, match="vocabulary"):
        engine.submit([3, 10**6], 4)
    with pytest.raises(LayerpackError, match="temperature"):
        engine.submit([3, 4], 4, SamplingParams(temperature=-1))
    engine.submit([3, 4], 4)  # takes the free slot
    engine.submit([3, 4], 4)  # waits in the queue
    with pytest.raises(QueueFull):
        engine.submit([3, 4], 4)


def test_memory_plan_reserves_slots_and_a_prefill(packs):
    model = load(packs["llama"])
    engine = Engine(model, max_batch=4, context=100)
    need = model.kv_bytes(4 * engine.max_len + engine.prefill_tokens)
    assert engine.max_len >= 100 and engine.prefill_tokens >= 100 and model.plan.kv_bytes == need
    assert sum(k.numel() * k.element_size() * 2 for k in engine.cache.k) <= need
    small = load(packs["llama"], max_memory="60MB")  # fits the model, not 64 x 4096 tokens of KV (~120 MB)
    with pytest.raises(LayerpackError, match="max_memory .* below"):
        Engine(small, max_batch=64, context=4096)
    Engine(small, max_batch=4, context=256)


def test_slot_cache_moves_and_realigns_keep_each_sequence():
    c = SlotKVCache(num_layers=1, slots=3, kv_heads=1, max_len=8, head_dim=1, dtype=torch.float32)
    seq = lambda n, base: (torch.arange(base, base + n, dtype=torch.float32).view(1, n, 1),) * 2  # noqa: E731
    assert c.add([seq(3, 10)]) == 0 and c.end == 3
    assert c.add([seq(5, 20)]) == 1 and c.end == 5 and c.realigns == 1  # longer than the timeline: the first moves right
    assert c.k[0][0, 0, 2:5, 0].tolist() == [10, 11, 12] and c.positions[0, 2:5].tolist() == [0, 1, 2]
    assert c.add([seq(2, 30)]) == 2
    assert c.remove(0) == 2  # the last slot moves into the freed one
    assert c.k[0][0, 0, 3:5, 0].tolist() == [30, 31] and c.lengths[:2] == [2, 5]
    c.realign(7)  # shift right: every sequence keeps its keys and positions
    assert c.end == 7 and c.k[0][1, 0, 2:7, 0].tolist() == [20, 21, 22, 23, 24] and c.k[0][0, 0, 5:7, 0].tolist() == [30, 31]
    assert c.positions[0, 5:7].tolist() == [0, 1] and c.positions[1, 2:7].tolist() == [0, 1, 2, 3, 4]
    c.make_room(1)  # fits: nothing moves
    assert c.end == 7
    c.make_room(3)  # full: compact to the left edge (end = the longest sequence)
    assert c.end == 5 and c.k[0][1, 0, 0:5, 0].tolist() == [20, 21, 22, 23, 24] and c.k[0][0, 0, 3:5, 0].tolist() == [30, 31]
    with pytest.raises(LayerpackError):
        c.realign(4)  # shorter than the longest sequence
    with pytest.raises(LayerpackError, match="full"):
        c.make_room(4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (scripts/gpu_check.sh runs this on a GPU)")
def test_engine_on_cuda_equals_single_prompt_generation(packs):
    model = load(packs["llama"], device="cuda", dtype="fp32")
    eos = set(model.eos_ids)
    ref = [model.generate_ids(p, max_new_tokens=16) for p in PROMPTS]
    engine = Engine(model, max_batch=3, context=51, slack=1).start()
    try:
        results = run_concurrently(engine, PROMPTS, 16)
    finally:
        engine.close()
    assert [[t for t in ids if t not in eos] for ids, _ in results] == ref
    assert engine.cache.k[0].device.type == "cuda" and engine.stats.max_active == 3
