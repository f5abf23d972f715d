#!/usr/bin/env python3
"""Decode speed by thread count and OpenMP spin policy, on a quiet machine and on a busy one, in one run.

    .venv/bin/python scripts/bench_threads.py [--tokens 32] [--record]

"Busy" is made here, reproducibly: two background processes that spin on the CPU (as other work on a
shared 2-core machine does) for the duration of each measurement, then stop. Each configuration runs
`layerpack run --stats` in a fresh process (the spin policy is read when torch loads), best of
--repeats, rounds interleaved. Rows: 1 thread; 2 threads with GNU OpenMP's default spinning
(GOMP_SPINCOUNT=300000, what torch gets when nothing is set); 2 threads with shorter spins
(GOMP_SPINCOUNT=30000, 1000); 2 threads with OMP_WAIT_POLICY=PASSIVE; 2 threads passive and pinned to cores (OMP_PROC_BIND=close,
OMP_PLACES=cores); a load-aware count (cores minus the other runnable processes, /proc/stat's
procs_running, read just before the row starts; at least 1).

    .venv/bin/python scripts/bench_threads.py --bits

checks whether the same pack gives bit-identical logits at 1 and 2 threads (torch.equal; prefill of
a prompt and 8 single-token decode steps, each thread count in a fresh process, quantized units in
their stored form in both): a thread count that follows the load is only admissible if it does.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import machine, record, smollm2_checkpoint  # noqa: E402

MARK_START, MARK_END = "<!-- bench_threads:start -->", "<!-- bench_threads:end -->"
LOAD_AWARE = "load"  # threads: cores minus the other runnable processes at the row's start
CONFIGS = [  # label, threads, environment
    ("1 thread", 1, {}),
    ("2 threads, OpenMP's default spin (GOMP_SPINCOUNT=300000)", 2, {"GOMP_SPINCOUNT": "300000"}),
    ("2 threads, GOMP_SPINCOUNT=30000", 2, {"GOMP_SPINCOUNT": "30000"}),
    ("2 threads, GOMP_SPINCOUNT=1000", 2, {"GOMP_SPINCOUNT": "1000"}),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("2 threads, PASSIVE + OMP_PROC_BIND=close OMP_PLACES=cores", 2,
     {"OMP_WAIT_POLICY": "PASSIVE", "OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}),
    ("load-aware count (cores - other runnable), default spin", LOAD_AWARE, {"GOMP_SPINCOUNT": "300000"}),
]
OMP_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "LAYERPACK_THREADS")
HOG = "import time\nt = time.time() + {s}\nwhile time.time() < t: pass\n"


def load_aware_threads() -> int:
    """Cores minus the processes runnable right now other than this one (/proc/stat procs_running)."""
    with open("/proc/stat") as f:
        running = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, cores - (running - 1)))


def decode_tps(pack: str, threads, env: dict, tokens: int) -> float:
    if threads == LOAD_AWARE:
        threads = load_aware_threads()
        print(f"... load-aware count: {threads}", file=sys.stderr)
    e = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    e.update(env, OMP_NUM_THREADS=str(threads), LAYERPACK_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-m", "layerpack.cli", "run", pack, "What is the capital of France?", "--chat",
                        "--max-new-tokens", str(tokens), "--stats"], capture_output=True, text=True, env=e, timeout=900)
    m = re.search(r"decode: \d+ tokens in [0-9.]+ s \(([0-9.]+) tokens/s\)", r.stderr + r.stdout)
    if not m:
        raise SystemExit(f"no decode figure in the output: {(r.stderr or r.stdout)[-400:]}")
    return float(m.group(1))


BITS_CHILD = r"""
import sys, torch
from layerpack_runtime import load
import layerpack_runtime.unitrange as ur
if hasattr(ur, "dequantized_form_faster"):  # the same weight form at every thread count (a timed choice otherwise)
    ur.dequantized_form_faster = lambda *a, **k: False
pack, threads, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
m = load(pack, threads=threads, dtype="fp32" if len(sys.argv) > 4 else None)
assert torch.get_num_threads() == threads
ids = m.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
prefill = m.logits(torch.tensor([ids]))
cache = m.new_cache(1, len(ids) + 8)
step = m.forward(torch.tensor([ids]), cache=cache, last_only=True)
decode = []
for _ in range(8):
    nxt = int(step[0, -1].argmax())
    step = m.forward(torch.tensor([[nxt]]), cache=cache)
    decode.append(step[0, -1])
torch.save({"prefill": prefill, "decode": torch.stack(decode)}, out)
"""


def bits_check(packs: dict, work: str) -> list[str]:
    """Rows of a table: is each pack's output the same bits at 1 and 2 threads?"""
    import torch

    rows = ["| pack | compute dtype | prefill logits equal (1 vs 2 threads) | max abs diff | decode logits equal (8 steps) | max abs diff |",
            "|---|---|---|--:|---|--:|"]
    for name, pack in packs.items():
        for fp32 in (False, True):
            got = {}
            for threads in (1, 2):
                out = os.path.join(work, f"bits-{name}-{threads}-{int(fp32)}.pt")
                e = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
                subprocess.run([sys.executable, "-c", BITS_CHILD, pack, str(threads), out, *(["fp32"] if fp32 else [])],
                               check=True, env=e, timeout=900)
                got[threads] = torch.load(out)
            cells = []
            for part in ("prefill", "decode"):
                a, b = got[1][part], got[2][part]
                cells += ["yes" if torch.equal(a, b) else "**no**", f"{(a - b).abs().max().item():.3g}"]
            rows.append(f"| {name} | {'fp32' if fp32 else 'pack dtype (bf16)'} | " + " | ".join(cells) + " |")
            print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default="/tmp/layerpack-bench-threads")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--bits", action="store_true", help="only check bit-identity across 1 and 2 threads")
    a = ap.parse_args()
    packs = {}
    for name, opts in (("bf16", []), ("nf4", ["--quant", "nf4"])):
        packs[name] = os.path.join(a.work, f"smollm2-{name}")
        if not os.path.isfile(os.path.join(packs[name], "manifest.json")):
            subprocess.run([sys.executable, "-m", "layerpack.cli", "convert", smollm2_checkpoint(), packs[name], *opts, "--quiet",
                            "--overwrite"], check=True)
    if a.bits:
        print("\n".join(bits_check(packs, a.work)))
        return
    load_avg = os.getloadavg()
    best: dict[tuple, float] = {}
    for _ in range(a.repeats):
        for busy in (False, True):
            hogs = [subprocess.Popen([sys.executable, "-c", HOG.format(s=600)]) for _ in range(2)] if busy else []
            try:
                for pack in packs:
                    for label, threads, env in CONFIGS:
                        v = decode_tps(packs[pack], threads, env, a.tokens)
                        key = (busy, pack, label)
                        best[key] = max(best.get(key, 0.0), v)
                        print(f"... {'busy' if busy else 'quiet'} {pack} {label}: {v:.1f} tok/s", file=sys.stderr)
            finally:
                for h in hogs:
                    h.kill()
                    h.wait()
    lines = [
        f"## Threads and OpenMP spinning on a quiet and a busy machine ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Machine: {machine()}; load average at start {load_avg[0]:.2f} (the 'quiet' rows share the machine with whatever else ran).",
        f"- Command: `.venv/bin/python scripts/bench_threads.py{' --record' if a.record else ''}`: SmolLM2-135M-Instruct, "
        f"`layerpack run --chat --max-new-tokens {a.tokens} --stats` in a fresh process per row, best of {a.repeats} interleaved rounds; "
        "'busy' = two background processes spinning on the CPU during the measurement.",
        "",
        "| pack | configuration | quiet tok/s | busy tok/s | busy / quiet |",
        "|---|---|--:|--:|--:|",
    ]
    for pack in packs:
        for label, _, _ in CONFIGS:
            q, b = best[(False, pack, label)], best[(True, pack, label)]
            lines.append(f"| {pack} | {label} | {q:.1f} | {b:.1f} | {b / q:.2f}x |")
    report = "\n".join(lines)
    print(report)
    if a.record:
        record(report, MARK_START, MARK_END)


if __name__ == "__main__":
    main()
