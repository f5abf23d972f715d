#!/usr/bin/env python3
"""Runtime benchmark: layerpack against transformers, accelerate disk offload and AirLLM, in one run,
as ratios, on SmolLM2-135M-Instruct (64 greedy new tokens after a fixed chat prompt).

    bash scripts/setup_bench_venv.sh                     # once: baselines' venv (accelerate, airllm)
    .venv/bin/python scripts/bench_runtime.py [--record]

Rows: layerpack resident bf16 against transformers resident bf16 at each --threads count (default:
the runtime's default, the physical cores, and 1), --rounds times, alternating which side goes
first (ABBA...), both sides summarized the same way (median and best of all timed generates);
layerpack streaming under a budget of 40% of the pack (warm page cache; and cold: every streamed
unit dropped from the page cache after it is read, so each step reads from disk); batch 16 vs
batch 1 streaming. Baselines come from scripts/bench_baselines.py run in .bench-venv during the
same invocation (streaming rows and the offloading baselines at the first --threads count). Every
configuration runs in its own subprocess (this script with --worker; bench_baselines.py's
workers), after an untimed warm-up, --repeats timed generates.
Cold-cache check: seconds/token against (bytes read per token / sequential read bandwidth of the
same files with their pages dropped), measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_baselines import PROMPT_TEXT  # noqa: E402  (stdlib-only module, shared prompt)
from benchlib import default_threads, machine, record  # noqa: E402

MARK_START, MARK_END = "<!-- bench_runtime:start -->", "<!-- bench_runtime:end -->"
QMARK_START, QMARK_END = "<!-- bench_runtime_quant:start -->", "<!-- bench_runtime_quant:end -->"


def sh(*args, **kw):
    return subprocess.run(args, capture_output=True, text=True, **kw)


# -- workers (one configuration each, in a fresh process) ------------------------------------------

def worker(cfg: dict) -> dict:
    import torch

    from layerpack_runtime import load
    from layerpack_runtime.generate import GenerationStats, SamplingParams, generate_tokens

    max_memory = cfg.get("max_memory")
    if cfg.get("budget_factor"):  # a multiple of this pack's minimum budget (asked of the planner itself)
        max_memory = int(cfg["budget_factor"] * load(cfg["pack"], threads=cfg.get("threads")).minimum_memory())
    model = load(cfg["pack"], max_memory=max_memory, page_cache=cfg.get("page_cache", True),
                 prefetch_depth=cfg.get("prefetch", 1), threads=cfg.get("threads"))
    prompts = [cfg["prompt_ids"]] * cfg["batch"]

    def once(n):
        st = GenerationStats()
        toks = [t.tolist() for t in generate_tokens(model, prompts, n, SamplingParams(), 0, None, st)]
        return st, [row[0] for row in toks]

    once(4)  # warm-up: kernels, allocator, (warm mode) page cache
    runs = [once(cfg["tokens"]) for _ in range(cfg["repeats"])]
    best = max(runs, key=lambda r: r[0].decode_tokens_per_s)[0]
    return {
        "decode_tokens_per_s": best.decode_tokens_per_s,          # total over the batch
        "decode_tokens_per_s_all": [r[0].decode_tokens_per_s for r in runs],
        "prefill_s": best.prefill_s,
        "s_per_step": best.decode_s / max(best.steps - 1, 1),
        "bytes_per_step": best.bytes_read / best.steps,
        "io_wait_per_step": best.io_wait_s / best.steps,
        "generated": runs[0][1],
        "plan": model.plan.describe(),
        "resident": len(model.plan.resident), "streamed": len(model.plan.streamed),
        "threads": torch.get_num_threads(),
        "max_memory": max_memory,
        "dequantized": sum(model.plan.resident.values()),
    }


def extra_for_batch(pack: str, prompt_ids: list[int], tokens: int, batch: int) -> int:
    from layerpack_runtime import load

    m = load(pack)
    L = len(prompt_ids)
    one = m.kv_bytes(L + tokens) + m.activation_bytes(L, 1)
    many = m.kv_bytes(batch * (L + tokens)) + m.activation_bytes(batch * L, batch)
    return many - one


def run_worker(cfg: dict) -> dict:
    r = sh(sys.executable, __file__, "--worker", json.dumps(cfg))
    if r.returncode != 0:
        raise SystemExit(f"worker failed: {cfg.get('name')}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- measurements in the parent ------------------------------------------------------------------------

def drop_pages(paths):
    for p in paths:
        with open(p, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def sequential_read_bandwidth(paths) -> float:
    """Bytes/s reading the files one after another with their pages dropped first (what a cold
    streamed step has to do), with 8 MiB reads."""
    drop_pages(paths)
    buf = bytearray(8 << 20)
    total, t0 = 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    dt = time.perf_counter() - t0
    drop_pages(paths)
    return total / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-fraction", type=float, default=0.4)
    ap.add_argument("--work", default="/tmp/layerpack-bench-runtime")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--threads", default="default,1",
                    help="comma list of CPU thread counts for the resident comparison ('default': the runtime's default); "
                         "the streaming rows and offloading baselines run at the first")
    ap.add_argument("--rounds", type=int, default=2, help="resident comparison: alternating rounds per thread count")
    ap.add_argument("--baselines", default="transformers,accelerate_disk,airllm,airllm_nogc",
                    help="baselines to run (transformers is the resident comparison)")
    ap.add_argument("--record", action="store_true", help="write the results into BENCHMARKS.md")
    ap.add_argument("--quantized", action="store_true",
                    help="instead: bf16 vs NF4 vs int8 packs, resident and streaming at 1.1x each pack's minimum budget")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    if a.quantized:
        quantized_main(a)
        return

    ckpt = sh(sys.executable, str(ROOT / "scripts/fetch_models.py"), "smollm2", "--quiet").stdout.strip().splitlines()[-1]
    pack = os.path.join(a.work, "smollm2-bf16")
    if not os.path.isfile(os.path.join(pack, "manifest.json")):
        r = sh(sys.executable, "-m", "layerpack.cli", "convert", ckpt, pack, "--quiet", "--overwrite")
        if r.returncode:
            raise SystemExit(r.stderr)
    manifest = json.load(open(os.path.join(pack, "manifest.json")))
    layer_files = [os.path.join(pack, l["file"]) for l in manifest["layers"]]
    pack_bytes = manifest["totals"]["layer_bytes"]
    from layerpack_runtime import load

    # --max-memory also covers the runtime's own memory (tokenizer, torch's working memory): the
    # weights' share is the fraction of the pack, as before that term existed
    budget = int(a.budget_fraction * pack_bytes) + load(pack).runtime_bytes()

    from transformers import AutoTokenizer  # the toolkit venv has it; only for the prompt ids

    prompt_ids = AutoTokenizer.from_pretrained(ckpt).apply_chat_template(
        [{"role": "user", "content": PROMPT_TEXT}], add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    threads = list(dict.fromkeys(default_threads() if t.strip() == "default" else int(t) for t in a.threads.split(",")))
    base = {"pack": pack, "prompt_ids": prompt_ids, "tokens": a.tokens, "repeats": a.repeats, "batch": 1, "threads": threads[0]}
    load_avg = os.getloadavg()
    bench_py = ROOT / ".bench-venv/bin/python"
    have_baselines = not a.skip_baselines and bench_py.exists()

    def baselines_run(names: str, n_threads: int) -> dict:
        out = os.path.join(a.work, "baselines.json")
        if os.path.exists(out):
            os.remove(out)
        r = sh(str(bench_py), str(ROOT / "scripts/bench_baselines.py"), "--json", out, "--new-tokens", str(a.tokens),
               "--model-dir", ckpt, "--repeats", str(a.repeats), "--baselines", names, "--threads", str(n_threads))
        found = {}
        if os.path.isfile(out):
            report = json.load(open(out))
            found = report.get("baselines", {})
            if report["prompt"]["token_ids"] != prompt_ids:
                raise SystemExit("baselines used another prompt than layerpack: not comparable")
        if r.returncode != 0:
            print(f"some baselines failed: {r.stderr.strip()[-500:]}", file=sys.stderr)
        return found

    # Resident layerpack vs resident transformers, per thread count, alternating who goes first.
    resident = {n: {"lp": [], "tf": []} for n in threads}
    for rnd in range(a.rounds):
        for n in threads:
            for who in (("lp", "tf") if rnd % 2 == 0 else ("tf", "lp")):
                if who == "lp":
                    resident[n]["lp"].append(run_worker({**base, "name": f"resident-{n}t", "threads": n}))
                elif have_baselines and "transformers" in a.baselines.split(","):
                    tf = baselines_run("transformers", n).get("transformers")
                    if tf is not None:
                        resident[n]["tf"].append(tf)
                print(f"bench_runtime: round {rnd + 1}, {n} threads, {who} done (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)

    results = {"lp_resident": resident[threads[0]]["lp"][0], "resident": resident}
    results["lp_stream"] = run_worker({**base, "name": "stream", "max_memory": budget})
    bandwidth = sequential_read_bandwidth(layer_files)
    results["lp_stream_cold"] = run_worker({**base, "name": "stream-cold", "max_memory": budget, "page_cache": False,
                                            "repeats": 1, "tokens": min(a.tokens, 16)})
    # batch 16 needs 16x the KV cache and prefill activations: the budget grows by exactly that (weights budget unchanged)
    b16_budget = budget + extra_for_batch(pack, prompt_ids, a.tokens, 16)
    results["lp_stream_b16"] = run_worker({**base, "name": "stream-b16", "max_memory": b16_budget, "batch": 16, "repeats": 1})
    results["lp_stream_b16"]["budget"] = b16_budget

    baselines = {}
    if have_baselines:
        others = [b for b in ("accelerate_disk", "airllm", "airllm_nogc") if b in a.baselines.split(",")]
        if others:
            baselines = baselines_run(",".join(others), threads[0])
        if resident[threads[0]]["tf"]:
            baselines["transformers"] = resident[threads[0]]["tf"][0]
    load_end = os.getloadavg()

    report = render(a, results, baselines, bandwidth, budget, pack_bytes, load_avg, load_end, threads)
    print(report)
    if a.record:
        record(report, MARK_START, MARK_END)


# -- quantized packs: do they run at the speed of their bytes? -----------------------------------------

QUANT_PACKS = {"bf16": [], "nf4": ["--quant", "nf4"], "int8": ["--quant", "int8"]}
QUANT_CONFIGS = [  # (pack, budget as a multiple of its minimum; None = no budget)
    ("bf16", None), ("nf4", None), ("int8", None),
    ("bf16", 1.1), ("nf4", 1.1), ("int8", 1.1),
    ("nf4", 1.5), ("nf4", 2.0), ("nf4", 3.0),
]


def quantized_main(a) -> None:
    ckpt = sh(sys.executable, str(ROOT / "scripts/fetch_models.py"), "smollm2", "--quiet").stdout.strip().splitlines()[-1]
    packs = {}
    for name, opts in QUANT_PACKS.items():
        packs[name] = os.path.join(a.work, f"smollm2-{name}")
        if not os.path.isfile(os.path.join(packs[name], "manifest.json")):
            r = sh(sys.executable, "-m", "layerpack.cli", "convert", ckpt, packs[name], *opts, "--quiet", "--overwrite")
            if r.returncode:
                raise SystemExit(r.stderr)
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(ckpt).apply_chat_template(
        [{"role": "user", "content": PROMPT_TEXT}], add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    load_avg = os.getloadavg()
    best: dict[tuple, dict] = {}
    for round_ in range(2):  # two interleaved rounds of every configuration; the better one counts
        for pack, factor in QUANT_CONFIGS:
            r = run_worker({"pack": packs[pack], "prompt_ids": prompt_ids, "tokens": a.tokens, "repeats": max(1, a.repeats - 1),
                            "batch": 1, "budget_factor": factor, "name": f"{pack}@{factor}"})
            key = (pack, factor)
            if key not in best or r["decode_tokens_per_s"] > best[key]["decode_tokens_per_s"]:
                best[key] = r
            print(f"... round {round_ + 1}: {pack} budget {factor or 'none'}: {r['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    report = render_quantized(a, best, load_avg)
    print(report)
    if a.record:
        record(report, QMARK_START, QMARK_END)


def render_quantized(a, best, load_avg) -> str:
    tps = lambda p, f: best[(p, f)]["decode_tokens_per_s"]  # noqa: E731
    threads = {r["threads"] for r in best.values()}
    rows = []
    for (pack, factor), r in best.items():
        budget = "none (everything resident)" if factor is None else f"{factor}x minimum = {r['max_memory'] / 2**20:.1f} MiB"
        rows.append(f"| {pack} | {budget} | {r['resident']} resident ({r['dequantized']} dequantized), {r['streamed']} streamed | "
                    f"{r['decode_tokens_per_s']:.2f} | {r['bytes_per_step'] / 2**20:.1f} | {r['io_wait_per_step'] * 1e3:.1f} |")
    checks = [
        ("NF4 streaming at 1.1x its minimum vs bf16 at 1.1x its minimum", tps("nf4", 1.1) / tps("bf16", 1.1), 1.5),
        ("int8 streaming at 1.1x its minimum vs bf16 at 1.1x its minimum", tps("int8", 1.1) / tps("bf16", 1.1), 1.2),
        ("NF4 resident (stored form) vs bf16 resident", tps("nf4", None) / tps("bf16", None), 0.8),
        ("int8 resident (stored form) vs bf16 resident", tps("int8", None) / tps("bf16", None), 0.8),
    ]
    nf4_curve = [tps("nf4", f) for f in (1.1, 1.5, 2.0, 3.0, None)]
    same = best[("nf4", 1.1)]["generated"] == best[("nf4", None)]["generated"]
    lines = [
        f"## Quantized packs at the speed of their bytes: SmolLM2-135M-Instruct, {a.tokens} greedy new tokens ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Machine: {machine()}; threads {', '.join(map(str, sorted(threads)))}; load average at start {load_avg[0]:.2f}, at end {os.getloadavg()[0]:.2f}.",
        f"- Command: `.venv/bin/python scripts/bench_runtime.py --quantized{' --record' if a.record else ''}` (each configuration in a fresh "
        f"process, warm page cache, warm-up, best of {max(1, a.repeats - 1)} runs in each of 2 interleaved rounds).",
        "- Packs: `convert --quant none|nf4|int8` (the tied embedding/head quantized with the scheme). 'minimum' is the planner's own "
        "minimum budget for the pack (`LayeredModel.minimum_memory()`); at 1.1x nearly every block streams.",
        "",
        "| pack | --max-memory | plan | decode tok/s | MiB read/step | I/O wait ms/step |",
        "|---|---|---|--:|--:|--:|",
        *rows,
        "",
        "| check | measured | target |",
        "|---|--:|--:|",
        *[f"| {name} | **{v:.2f}x** | >= {t}x ({'met' if v >= t else 'not met'}) |" for name, v, t in checks],
        f"| NF4 tok/s as the budget grows (1.1x, 1.5x, 2x, 3x minimum, none) | {' / '.join(f'{v:.1f}' for v in nf4_curve)} | never slower with more memory |",
        "",
        f"NF4 at 1.1x and NF4 resident generated the same tokens: {same}.",
    ]
    return "\n".join(lines)


def _tps(b: dict | None) -> float | None:
    return b.get("tokens_per_s") if b and b.get("status") == "ok" else None


def _all_tps(side: str, runs: list[dict]) -> list[float]:
    """Every timed generate's decode tokens/s of one side (layerpack workers or transformers baselines)."""
    if side == "lp":
        return [x for r in runs for x in r["decode_tokens_per_s_all"]]
    return [x["tokens_per_s"] for r in runs if r.get("status") == "ok" for x in r.get("runs", []) if x.get("tokens_per_s")]


def resident_rows(r, threads) -> list[str]:
    """The resident comparison: per thread count, median and best of all timed generates, each side alike."""
    rows = ["| threads | layerpack resident bf16, tokens/s (median / best) | transformers bf16, tokens/s (median / best) | ratio of medians | ratio of bests |",
            "|--:|--:|--:|--:|--:|"]
    for n in threads:
        lp, tf = _all_tps("lp", r["resident"][n]["lp"]), _all_tps("tf", r["resident"][n]["tf"])
        med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        cell = lambda xs: f"{med(xs):.2f} / {max(xs):.2f} (n={len(xs)})" if xs else "not run"  # noqa: E731
        ratio = lambda x, y: f"**{x / y:.2f}x**" if x and y else "n/a"  # noqa: E731
        rows.append(f"| {n} | {cell(lp)} | {cell(tf)} | {ratio(med(lp), med(tf))} | {ratio(max(lp, default=None), max(tf, default=None))} |")
    return rows


def render(a, r, baselines, bandwidth, budget, pack_bytes, load_avg, load_end, threads) -> str:
    res, st, cold, b16 = r["lp_resident"], r["lp_stream"], r["lp_stream_cold"], r["lp_stream_b16"]
    acc = _tps(baselines.get("accelerate_disk"))
    air = _tps(baselines.get("airllm"))
    ratio = lambda x, y: f"{x / y:.2f}x" if x and y else "n/a"  # noqa: E731
    cold_ideal = cold["bytes_per_step"] / bandwidth
    lp_med = statistics.median(_all_tps("lp", r["resident"][threads[0]]["lp"]))
    tf_all = _all_tps("tf", r["resident"][threads[0]]["tf"])
    tf_med = statistics.median(tf_all) if tf_all else None
    rows = [
        (f"layerpack resident, bf16 ({threads[0]} threads, median)", lp_med, f"vs transformers resident: **{ratio(lp_med, tf_med)}** (target >= 1.3)"),
        (f"layerpack streaming, budget {budget / 2**20:.0f} MiB ({a.budget_fraction:.0%} of pack + the runtime's own memory; {st['resident']} units resident, {st['streamed']} streamed)",
         st["decode_tokens_per_s"], f"vs AirLLM: **{ratio(st['decode_tokens_per_s'], air)}** (target >= 20); vs accelerate disk offload: **{ratio(st['decode_tokens_per_s'], acc)}** (target >= 2)"),
        ("layerpack streaming, cold page cache", cold["decode_tokens_per_s"],
         f"{cold['s_per_step']:.3f} s/step vs ideal {cold_ideal:.3f} s ({cold['bytes_per_step'] / 2**20:.0f} MiB/step at {bandwidth / 2**20:.0f} MiB/s): **{cold['s_per_step'] / cold_ideal:.2f}x** (target <= 1.25)"),
        (f"layerpack streaming, batch 16 (total; budget {b16['budget'] / 2**20:.0f} MiB = the same weights budget + batch-16 KV and activations)", b16["decode_tokens_per_s"], f"vs batch 1 streaming: **{ratio(b16['decode_tokens_per_s'], st['decode_tokens_per_s'])}** (target >= 8)"),
    ]
    for key, label in (("transformers", f"transformers bf16, resident ({threads[0]} threads, median)"), ("accelerate_disk", "accelerate disk offload (~40% in RAM)"),
                       ("airllm", "AirLLM (stock)"), ("airllm_nogc", "AirLLM without its per-layer gc.collect()")):
        b = baselines.get(key)
        if b is None:
            note = "not run (--baselines)" if (ROOT / ".bench-venv/bin/python").exists() and not a.skip_baselines else "not run (bash scripts/setup_bench_venv.sh)"
        elif _tps(b) is None:
            note = f"failed: {b.get('error', '?')}"
        else:
            note = f"{b['new_tokens']} new tokens; same tokens as layerpack: {b.get('generated_ids', [])[:len(res['generated'])] == res['generated'][:len(b.get('generated_ids', []))]}"
        rows.append((label, tf_med if key == "transformers" and b is not None else _tps(b), note))
    same = r["lp_resident"]["generated"] == r["lp_stream"]["generated"]
    lines = [
        f"## Runtime: SmolLM2-135M-Instruct, {a.tokens} greedy new tokens ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Machine: {machine(' and '.join(map(str, threads)) + ' (resident comparison; the rest at ' + str(threads[0]) + ')')}; load average {load_avg[0]:.2f} at start, {load_end[0]:.2f} at end "
        "(other work was running: absolute numbers are noisy, ratios come from the same run).",
        f"- Command: `.venv/bin/python scripts/bench_runtime.py --record --threads {a.threads} --rounds {a.rounds} --repeats {a.repeats}` (every configuration in a fresh process, warm-up, "
        f"{a.repeats} timed generates per process; baselines from `scripts/bench_baselines.py` in `.bench-venv`).",
        f"- Pack: bf16, {pack_bytes / 2**20:.0f} MiB of layers; streaming budget {budget / 2**20:.0f} MiB; layerpack streamed and resident generated the same tokens: {same}.",
        "",
        f"Resident decode, layerpack vs transformers, {a.rounds} alternating rounds per thread count (one process per side and round):",
        "",
        *resident_rows(r, threads),
        "",
        "| configuration | decode tokens/s | comparison |",
        "|---|--:|---|",
        *[f"| {n} | {'' if v is None else f'{v:.2f}'} | {c} |" for n, v, c in rows],
        "",
        f"Streaming detail: {st['bytes_per_step'] / 2**20:.1f} MiB read per step (warm), I/O wait {st['io_wait_per_step'] * 1e3:.1f} ms/step; "
        f"cold: I/O wait {cold['io_wait_per_step'] * 1e3:.1f} ms/step; plan: {st['plan']}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
