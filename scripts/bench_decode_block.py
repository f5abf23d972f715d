#!/usr/bin/env python3
"""The native one-call decode block (kernels/decode_block.c) against the per-op path it replaces:
decode time per token side by side, each configuration in a fresh process, interleaved rounds.

    .venv/bin/python scripts/bench_decode_block.py [--models smollm2,gemma3] [--quants none,int8,nf4]
                                                   [--threads 1] [--rounds 3] [--tokens 64] [--record]

Per pack (converted once into --work from the cached real checkpoints): a prompt, then --tokens
greedy decode steps, resident, timed after the first; native (the default) vs
LAYERPACK_DECODE_BLOCK=0. Reported: median ms per token (wall) and the process's CPU ms per token
(the robust column on a shared machine), the per-op / native ratio, and the load average.
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
from benchlib import machine, record  # noqa: E402

MARKS = "<!-- bench_decode_block:start -->", "<!-- bench_decode_block:end -->"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"


def worker(cfg: dict) -> dict:
    import torch

    from layerpack_runtime import load

    model = load(cfg["pack"], threads=cfg["threads"])
    ids = torch.tensor([model.encode_prompt(PROMPT)])
    with torch.inference_mode():
        cache = model.new_cache(1, ids.shape[1] + cfg["tokens"] + 1)
        tok = model.forward(ids, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(cfg["tokens"] - 1):
            tok = model.forward(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = cfg["tokens"] - 1
    return {"wall_ms": wall / n * 1e3, "cpu_ms": cpu / n * 1e3}


def spawn(cfg: dict, native: bool) -> dict:
    env = dict(os.environ, LAYERPACK_DECODE_BLOCK="1" if native else "0")
    res = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"error: worker failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def ensure_pack(model: str, quant: str, work: Path) -> str:
    pack = work / f"{model}-{quant}"
    if not (pack / "manifest.json").exists():
        src = subprocess.run([sys.executable, str(ROOT / "scripts/fetch_models.py"), model, "--quiet"],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        print(f"converting {model} ({quant})...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "layerpack.cli", "convert", src, str(pack), "--quant", quant, "--quiet"], check=True)
    return str(pack)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--quants", default="none,int8,nf4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--work", default=str(ROOT / "out" / "decode_block"))
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    configs = [(m, q, ensure_pack(m, q, work)) for m in a.models.split(",") for q in a.quants.split(",")]
    results: dict = {}
    loads = []
    for r in range(a.rounds):
        loads.append(os.getloadavg()[0])
        for m, q, pack in configs:
            order = (True, False) if r % 2 == 0 else (False, True)
            for native in order:
                out = spawn({"pack": pack, "threads": a.threads, "tokens": a.tokens}, native)
                results.setdefault((m, q, native), []).append(out)
                print(f"round {r + 1}: {m} {q:4s} {'native' if native else 'per-op':6s} {out['wall_ms']:7.2f} ms/token "
                      f"(cpu {out['cpu_ms']:.2f})  load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    med = lambda k, f: statistics.median(x[f] for x in results[k])  # noqa: E731
    lines = [
        f"### Native decode block vs per-op path, {a.threads} thread(s) ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"- Machine: {machine(a.threads)}",
        f"- Command: `.venv/bin/python scripts/bench_decode_block.py --models {a.models} --quants {a.quants} "
        f"--threads {a.threads} --rounds {a.rounds} --tokens {a.tokens}`; each configuration a fresh process, "
        "interleaved, medians; resident packs; ms per decode token after the first.",
        f"- Load average (1 min) at the start of each round: {', '.join(f'{x:.2f}' for x in loads)}.",
        "",
        "| model | quant | per-op ms/token (cpu) | native ms/token (cpu) | per-op / native (wall) | per-op / native (cpu) |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for m, q, _ in configs:
        p_w, p_c = med((m, q, False), "wall_ms"), med((m, q, False), "cpu_ms")
        n_w, n_c = med((m, q, True), "wall_ms"), med((m, q, True), "cpu_ms")
        lines.append(f"| {m} | {q} | {p_w:.2f} ({p_c:.2f}) | {n_w:.2f} ({n_c:.2f}) | {p_w / n_w:.2f}x | {p_c / n_c:.2f}x |")
    report = "\n".join(lines)
    print(report)
    if a.record:
        record(report, *MARKS)


if __name__ == "__main__":
    main()
