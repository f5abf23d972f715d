#!/usr/bin/env python3
"""Decode speed by thread count and OpenMP spin policy, on a quiet machine and on a busy one, in one run.

    .venv/bin/python scripts/bench_threads.py [--tokens 32] [--record]

"Busy" is made here, reproducibly: two background processes that spin on the CPU (as other work on a
shared 2-core machine does) for the duration of each measurement, then stop. Each configuration runs
`layerpack run --stats` in a fresh process (the spin policy is read when torch loads), best of
--repeats, rounds interleaved. Rows: 1 thread; 2 threads with GNU OpenMP's default spinning
(GOMP_SPINCOUNT=300000, what torch and the runtime get when nothing is set); 2 threads with a short
spin (GOMP_SPINCOUNT=1000); 2 threads with OMP_WAIT_POLICY=PASSIVE.
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
CONFIGS = [  # label, threads, environment
    ("1 thread", 1, {}),
    ("2 threads, OpenMP's default spin (GOMP_SPINCOUNT=300000; the runtime's default)", 2, {"GOMP_SPINCOUNT": "300000"}),
    ("2 threads, GOMP_SPINCOUNT=1000", 2, {"GOMP_SPINCOUNT": "1000"}),
    ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, {"OMP_WAIT_POLICY": "PASSIVE"}),
]
HOG = "import time\nt = time.time() + {s}\nwhile time.time() < t: pass\n"


def decode_tps(pack: str, threads: int, env: dict, tokens: int) -> float:
    e = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LAYERPACK_THREADS")}
    e.update(env, OMP_NUM_THREADS=str(threads), LAYERPACK_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-m", "layerpack.cli", "run", pack, "What is the capital of France?", "--chat",
                        "--max-new-tokens", str(tokens), "--stats"], capture_output=True, text=True, env=e, timeout=900)
    m = re.search(r"decode: \d+ tokens in [0-9.]+ s \(([0-9.]+) tokens/s\)", r.stderr + r.stdout)
    if not m:
        raise SystemExit(f"no decode figure in the output: {(r.stderr or r.stdout)[-400:]}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default="/tmp/layerpack-bench-threads")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    packs = {}
    for name, opts in (("bf16", []), ("nf4", ["--quant", "nf4"])):
        packs[name] = os.path.join(a.work, f"smollm2-{name}")
        if not os.path.isfile(os.path.join(packs[name], "manifest.json")):
            subprocess.run([sys.executable, "-m", "layerpack.cli", "convert", smollm2_checkpoint(), packs[name], *opts, "--quiet",
                            "--overwrite"], check=True)
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
