#!/usr/bin/env python3
"""Where a batched decode step of the serving engine spends its time: one step over 1 request vs
over --batch requests, in-process (no HTTP), on the streamed SmolLM2 packs bench_serve.py serves.

    .venv/bin/python scripts/bench_engine_step.py [--batch 8] [--rounds 5] [--steps 8] [--record]

The pack is loaded as `layerpack serve --max-batch 16 --context 256` loads it, with the smallest
budget that holds the 16 KV slots plus --extra-memory (most layers stream from disk every step).
Each round submits 1 (then --batch) chat requests, runs the prefill and one step, then times
--steps decode steps: wall time, the process's CPU time (every thread: the compute thread and the
stream reader) and the compute thread's CPU time in the parts that grow with the batch (the native
quantized GEMV, F.linear, attention, RMS norms, the engine's per-request sampling and text). CPU
times are the robust columns on a shared machine: the wall time includes waiting for a core.
(batch step) / (one-request step) bounds the throughput gain of serving --batch clients at once:
at most batch x (one-request step) / (batch step). Rounds are interleaved; medians are shown.
The process is pinned to the last CPU it may use (as bench_serve.py pins the server).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import machine, record, smollm2_checkpoint  # noqa: E402

MARK_START, MARK_END = "<!-- bench_engine_step:start -->", "<!-- bench_engine_step:end -->"
TOPICS = ["the ocean", "a city at night", "mountains", "a library", "the moon", "a garden", "trains", "winter",
          "a market", "the desert", "rivers", "a lighthouse", "forests", "a bakery", "the stars", "islands"]
PARTS = ("gemv", "linear", "attention", "norm", "sampling")


class Timed:
    """Adds the calling thread's CPU time inside `module.name` to totals[key] (patched in place)."""

    def __init__(self, totals: dict, module, name: str, key: str):
        real = getattr(module, name)

        def timed(*a, **k):
            t0 = time.thread_time()
            try:
                return real(*a, **k)
            finally:
                totals[key] = totals.get(key, 0.0) + time.thread_time() - t0

        setattr(module, name, timed)


def measure(pack: str, a) -> tuple[dict[int, dict], str]:
    import torch
    import torch.nn.functional as F

    from layerpack_runtime import kernels, load
    from layerpack_runtime.engine import Engine, engine_workload
    from layerpack_runtime.models import llama

    torch.set_num_threads(1)
    workload = engine_workload(max_batch=16, context=256)
    probe = load(pack, workload=workload, threads=1)
    budget = probe.minimum_memory() + a.extra_memory_mib * 2**20
    probe.close()
    model = load(pack, max_memory=budget, workload=workload, threads=1)
    engine = Engine(model, max_batch=16, context=256)
    prompts = [model.tokenizer.encode_chat([{"role": "user", "content": f"Write a long, detailed story about {t}."}])
               for t in TOPICS]
    totals: dict[str, float] = {}
    Timed(totals, kernels, "matvec", "gemv")
    Timed(totals, F, "linear", "linear")
    Timed(totals, F, "scaled_dot_product_attention", "attention")
    Timed(totals, llama, "rms_norm", "norm")
    Timed(totals, Engine, "_advance", "sampling")

    def one(batch: int) -> dict:
        for i in range(batch):
            engine.submit(prompts[i % len(prompts)], 200)
        engine.step()  # prefill + first decode step
        engine.step()
        totals.clear()
        w0, c0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
        for _ in range(a.steps):
            engine.step()
        out = {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0, "thread": time.thread_time() - t0,
               **{k: totals.get(k, 0.0) for k in PARTS}}
        for r in list(engine._active):
            r.cancel()
        engine.step()
        return {k: v / a.steps * 1000 for k, v in out.items()}

    runs: dict[int, list[dict]] = {1: [], a.batch: []}
    for _ in range(a.rounds):
        for b in runs:
            runs[b].append(one(b))
    model.close()
    med = {b: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for b, rs in runs.items()}
    return med, model.plan.describe()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="decode steps timed per round")
    ap.add_argument("--quants", default="nf4,bf16")
    ap.add_argument("--extra-memory-mib", type=int, default=8)
    ap.add_argument("--work", default="/tmp/layerpack-bench-serve", help="where the packs are (shared with bench_serve.py)")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    os.makedirs(a.work, exist_ok=True)
    load0 = os.getloadavg()
    lines = [f"## Serving engine: one decode step over {a.batch} requests vs 1, in-process ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine(1)}; pinned to one CPU.",
             f"Command: `.venv/bin/python scripts/bench_engine_step.py --batch {a.batch} --rounds {a.rounds} --steps {a.steps} "
             f"--quants {a.quants} --record`. Milliseconds per decode step, medians of {a.rounds} interleaved rounds "
             f"of {a.steps} steps; the packs and budgets of bench_serve.py (smallest for 16 slots of 256 tokens + "
             f"{a.extra_memory_mib} MiB: most layers stream every step). cpu: the whole process (compute thread + "
             f"stream reader); the part columns: the compute thread's CPU time in the native quantized GEMV, "
             f"F.linear, attention, RMS norms, and the engine's per-request sampling/text.", "",
             "| pack | requests | wall | cpu | compute thread | GEMV | F.linear | attention | norms | sampling + text | "
             "batch step / 1-request step (cpu) | throughput bound |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for quant in a.quants.split(","):
        pack = os.path.join(a.work, f"smollm2-{quant}")
        if not os.path.isfile(os.path.join(pack, "manifest.json")):
            opts = [] if quant == "bf16" else ["--quant", quant]
            subprocess.run([sys.executable, "-m", "layerpack.cli", "convert", smollm2_checkpoint(), pack, *opts,
                            "--quiet", "--overwrite"], check=True)
        med, plan = measure(pack, a)
        for b, m in med.items():
            ratio = m["cpu"] / med[1]["cpu"]
            tail = f"{ratio:.2f} | **{b / ratio:.2f}x**" if b > 1 else "1.00 | 1.00x"
            lines.append(f"| {quant} | {b} | {m['wall']:.1f} | {m['cpu']:.1f} | {m['thread']:.1f} | {m['gemv']:.1f} | "
                         f"{m['linear']:.1f} | {m['attention']:.1f} | {m['norm']:.1f} | {m['sampling']:.1f} | {tail} |")
        print(f"{quant}: plan {plan}", flush=True)
    lines += ["", f"Load average {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after."]
    report = "\n".join(lines)
    print(report)
    if a.record:
        record(report, MARK_START, MARK_END)


if __name__ == "__main__":
    main()
