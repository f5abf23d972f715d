#!/usr/bin/env python3
"""MoE benchmark: streaming a mixture-of-experts pack expert by expert against streaming whole layers.

    .venv/bin/python scripts/bench_moe.py [--record]

Model: a random Mixtral-style checkpoint written by transformers (default hidden 1024, expert
intermediate 2048, 8 experts, top-2, 6 blocks), converted with --quant none --dtype fp32 (~1.2 GiB
of layers). fp32 because on this CPU a bf16 matmul is ~45x slower than fp32 (torch's bf16 GEMV on
AVX512 without bf16 instructions): a bf16 pack is compute-bound and hides the reads this
benchmark is about (`--dtype bf16` runs it anyway). Both configurations get the same --max-memory (a fraction of the pack, too small to
keep the experts resident); the baseline is the same pack with expert-selective reads disabled
(`expert_reads=False`, i.e. `layerpack run --no-expert-reads`: every streamed block's whole layer
file is read each step, as for dense models). Each configuration runs in a fresh process (this
script with --worker), greedy decoding of --tokens tokens after a fixed random prompt, warm-up
first; warm = page cache kept, best of --repeats; cold = page cache dropped before the run (as root:
`echo 1 > /proc/sys/vm/drop_caches`) and streamed bytes dropped after each read
(page_cache=False), one run.

Bytes per decoded token: expected for selective reads without a cache = per block, the dense part
+ top_k experts (exactly k experts per block per token at batch 1), vs whole layers = dense part +
all experts. Measured with the LRU cache off (capacity 0) and on (what the budget leaves).
Random weights route almost uniformly; trained models' routing is skewed, so real cache hit rates
are higher than here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import machine, record  # noqa: E402

MARK_START, MARK_END = "<!-- bench_moe:start -->", "<!-- bench_moe:end -->"


def sh(*args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


def make_checkpoint(path: str, a) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.hidden // 128, num_key_value_heads=max(1, a.hidden // 512), num_local_experts=a.experts,
        num_experts_per_tok=a.top_k, max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200MB")


# -- worker (one configuration, fresh process) -------------------------------------------------------

def worker(cfg: dict) -> dict:
    import torch

    from layerpack_runtime import load
    from layerpack_runtime.generate import GenerationStats, SamplingParams, generate_tokens

    model = load(cfg["pack"], max_memory=cfg["max_memory"], page_cache=cfg["page_cache"], expert_reads=cfg["expert_reads"])
    if cfg.get("no_cache"):
        model.experts.set_capacity(0)
    prompt = [cfg["prompt"]]

    def once(n):
        st = GenerationStats()
        es = model.experts.stats
        toks, after_prefill = [], None
        for t in generate_tokens(model, prompt, n, SamplingParams(), 0, None, st):
            toks.append(t.tolist()[0])
            if after_prefill is None:  # decode-only figures: what the prefill read is subtracted
                after_prefill = (st.bytes_read, es.reads, es.hits, es.bytes_read)
        b0, r0, h0, e0 = after_prefill
        return st, toks, (st.bytes_read - b0, es.reads - r0, es.hits - h0, es.bytes_read - e0)

    if cfg["cold"]:
        runs = [once(cfg["tokens"])]  # the parent dropped the page cache just before this process started
    else:
        once(4)  # warm-up: allocator, kernels, page cache
        runs = [once(cfg["tokens"]) for _ in range(cfg["repeats"])]
    st, toks, (dbytes, reads, hits, ebytes) = max(runs, key=lambda r: r[0].decode_tokens_per_s)
    decode_steps = max(st.steps - 1, 1)
    return {
        "decode_tokens_per_s": st.decode_tokens_per_s,
        "all_tokens_per_s": [r[0].decode_tokens_per_s for r in runs],
        "bytes_per_step": dbytes / decode_steps,          # decode steps only
        "io_wait_per_step": st.io_wait_s / st.steps,
        "expert_reads": reads, "expert_hits": hits, "expert_bytes": ebytes, "steps": st.steps,
        "cache_capacity": model.experts.capacity,
        "expected": expected_per_token(model),
        "streamed_blocks": sum(1 for u in model.plan.streamed if u in model.block_units),
        "plan": model.plan.describe(),
        "generated": toks,
        "threads": torch.get_num_threads(),
    }


def expected_per_token(model) -> int:
    """Bytes a decode step must read under this plan: each streamed block's dense part + top_k experts
    (selective; exactly k experts per block per token at batch 1, before any cache hit) or its whole
    payload; other streamed units whole (the embedding, read row by row, is negligible and left out)."""
    total = 0
    for u in model.plan.streamed:
        st = model._files[u]
        if u == "embed":
            continue
        if model.experts.selective_for(u):
            lay = model.experts.layouts[u]
            total += lay.dense_end - st.data_start + model.args.top_k * lay.stored_bytes(0)
        else:
            total += st.file_size - st.data_start
    return total


def run_worker(cfg: dict) -> dict:
    if cfg["cold"]:
        drop_caches()
    r = sh(sys.executable, __file__, "--worker", json.dumps(cfg))
    if r.returncode != 0:
        raise SystemExit(f"worker failed: {cfg['name']}: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False  # not root: the workers' page_cache=False still drops every streamed read after use


def minimum(pack: str, expert_reads: bool) -> int:
    """The planner's minimum budget for this pack (what budget.plan refuses below)."""
    from layerpack_runtime import load

    m = load(pack, expert_reads=expert_reads)
    fixed = m.plan.kv_bytes + m.plan.activation_bytes
    return fixed + 2 * max(m._unit_cost(u).streamed for u in m.units)


# -- main ----------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="pack dtype")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-fraction", type=float, default=0.4)
    ap.add_argument("--work", default="/tmp/layerpack-bench-moe")
    ap.add_argument("--record", action="store_true", help="write the results into BENCHMARKS.md")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return

    tag = f"h{a.hidden}-i{a.intermediate}-e{a.experts}-k{a.top_k}-l{a.layers}"
    ptag = f"{tag}-{a.dtype}"
    ckpt, pack = os.path.join(a.work, f"ckpt-{tag}"), os.path.join(a.work, f"pack-{ptag}")
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        make_checkpoint(ckpt, a)
    if not os.path.isfile(os.path.join(pack, "manifest.json")):
        r = sh(sys.executable, "-m", "layerpack.cli", "convert", ckpt, pack, "--dtype", a.dtype, "--quiet", "--overwrite")
        if r.returncode:
            raise SystemExit(r.stderr)

    from layerpack_runtime import load

    probe = load(pack)
    store = probe.experts
    blocks = probe.block_units
    dense = sum(store.layouts[u].dense_end - store.layouts[u].file.data_start for u in blocks)
    expert = store.expert_bytes()
    whole = sum(probe._files[u].file_size - probe._files[u].data_start for u in blocks)
    pack_bytes = probe.manifest.totals["layer_bytes"]
    # the budget must let both configurations run (whole-layer streaming needs 2 buffers of a whole block)
    floor = max(minimum(pack, True), minimum(pack, False))
    # ...and keep the (small) embedding and head resident in both, so the blocks are what differs
    others = sum(probe._unit_cost(u).stored for u in probe.units if u not in blocks)
    budget = max(int(a.budget_fraction * pack_bytes), int(1.05 * floor) + others)
    if budget >= pack_bytes:
        raise SystemExit(f"budget {budget} would hold the whole pack ({pack_bytes} bytes): use more blocks")
    del probe

    import random

    rng = random.Random(0)
    prompt = [rng.randrange(3, a.vocab) for _ in range(a.prompt_len)]
    base = {"pack": pack, "prompt": prompt, "tokens": a.tokens, "repeats": a.repeats, "max_memory": budget}
    load_avg = os.getloadavg()
    can_drop = drop_caches()
    r = {}
    r["sel_warm"] = run_worker({**base, "name": "selective warm", "expert_reads": True, "page_cache": True, "cold": False})
    r["sel_warm_nocache"] = run_worker({**base, "name": "selective warm, no cache", "expert_reads": True, "page_cache": True,
                                        "cold": False, "no_cache": True})
    r["dense_warm"] = run_worker({**base, "name": "whole layers warm", "expert_reads": False, "page_cache": True, "cold": False})
    r["sel_cold"] = run_worker({**base, "name": "selective cold", "expert_reads": True, "page_cache": False, "cold": True, "repeats": 1})
    r["dense_cold"] = run_worker({**base, "name": "whole layers cold", "expert_reads": False, "page_cache": False, "cold": True, "repeats": 1})
    load_end = os.getloadavg()
    report = render(a, r, dict(dense=dense, expert=expert, whole=whole, budget=budget, pack_bytes=pack_bytes,
                               blocks=len(blocks), can_drop=can_drop, load_avg=load_avg, load_end=load_end, tag=tag))
    print(report)
    if a.record:
        record(report, MARK_START, MARK_END)


def render(a, r, m) -> str:
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    ratio = lambda x, y: f"{x / y:.2f}x" if x and y else "n/a"  # noqa: E731
    sw, sn, dw, sc, dc = r["sel_warm"], r["sel_warm_nocache"], r["dense_warm"], r["sel_cold"], r["dense_cold"]
    same = sw["generated"] == dw["generated"] == sc["generated"] == dc["generated"] == sn["generated"]

    def hit(x):
        asked = x["expert_reads"] + x["expert_hits"]
        return f"{100 * x['expert_hits'] / asked:.0f}%" if asked else "n/a"

    exp_sel, exp_whole = sw["expected"], dw["expected"]
    rows = [
        ("expected, selective, no cache: per streamed block dense part + top_k experts", exp_sel, None, ""),
        ("selective reads, LRU cache off (warm)", sn["bytes_per_step"], sn["decode_tokens_per_s"], "hit rate 0% (capacity 0)"),
        ("selective reads + LRU cache (warm)", sw["bytes_per_step"], sw["decode_tokens_per_s"],
         f"cache {mib(sw['cache_capacity'])}, hit rate {hit(sw)}"),
        ("whole layers (expert_reads=False, warm)", dw["bytes_per_step"], dw["decode_tokens_per_s"], f"expected {mib(exp_whole)}"),
        ("selective reads + LRU cache (cold)", sc["bytes_per_step"], sc["decode_tokens_per_s"], f"hit rate {hit(sc)}"),
        ("whole layers (cold)", dc["bytes_per_step"], dc["decode_tokens_per_s"], ""),
    ]
    lines = [
        f"## MoE streaming: selective expert reads vs whole layers ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Machine: {machine()}; load average {m['load_avg'][0]:.2f} at start, {m['load_end'][0]:.2f} at end "
        f"(other agents were running: absolute numbers are noisy; ratios come from the same run).",
        f"- Command: `.venv/bin/python scripts/bench_moe.py --record` (each row a fresh process; warm rows best of {a.repeats} after a warm-up; "
        f"cold rows one run after `echo 1 > /proc/sys/vm/drop_caches` ({'done' if m['can_drop'] else 'not permitted: fadvise only'}) "
        f"with page_cache=False).",
        f"- Model: random Mixtral-style, hidden {a.hidden}, expert intermediate {a.intermediate}, {a.experts} experts, top-{a.top_k}, "
        f"{a.layers} blocks, vocab {a.vocab}, {a.dtype} pack of {mib(m['pack_bytes'])} ({m['tag']}-{a.dtype}); one expert {mib(m['expert'])}, "
        f"dense part of all blocks {mib(m['dense'])}; prompt {a.prompt_len} random tokens, {a.tokens} greedy new tokens, batch 1.",
        f"- Budget (both): {mib(m['budget'])} = {m['budget'] / m['pack_bytes']:.0%} of the pack. Plans: selective: {sw['plan']}; whole layers: {dw['plan']}.",
        f"- All configurations generated the same tokens: {same}.",
        "",
        "| configuration | read per decoded token | decode tokens/s | note |",
        "|---|--:|--:|---|",
        *[f"| {n} | {mib(b)} | {'' if t is None else f'{t:.2f}'} | {note} |" for n, b, t, note in rows],
        "",
        f"Ratios (same run): bytes per token, whole layers / selective + cache: **{ratio(dw['bytes_per_step'], sw['bytes_per_step'])}** "
        f"(selective without cache: measured {mib(sn['bytes_per_step'])} vs expected {mib(exp_sel)}, "
        f"{ratio(sn['bytes_per_step'], exp_sel)}); decode tokens/s, selective / whole layers: "
        f"warm **{ratio(sw['decode_tokens_per_s'], dw['decode_tokens_per_s'])}**, cold **{ratio(sc['decode_tokens_per_s'], dc['decode_tokens_per_s'])}**.",
        "Bytes per decoded token: the reads of the decode steps (after the first token) divided by their number; the prefill, which "
        "selects up to all experts of each block, is excluded. Expert hit rates are over the decode steps too.",
    ]
    if sw["expert_hits"] * 20 < sw["expert_reads"] + sw["expert_hits"]:  # under 5%
        lines.append("LRU hit rate 0% here: random routing spreads each step's 10 streamed selections over 40 streamed experts, and an "
                     "LRU cache smaller than that cycle evicts every expert before its next use (the classic cyclic-access case); "
                     "tests/runtime/test_moe.py shows hits when the cache is large enough. Trained routers repeat experts far more."
                     .replace("0%", hit(sw)).replace("10 streamed selections", f"{sw['streamed_blocks'] * a.top_k} streamed selections")
                     .replace("40 streamed experts", f"{sw['streamed_blocks'] * a.experts} streamed experts"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
