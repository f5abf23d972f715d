#!/usr/bin/env python3
"""Where a layerpack process spends its time before (and after) the tokens: fresh processes, each
timing its own phases, medians over rounds. Not part of the test suite.

    .venv/bin/python scripts/bench_startup.py PACK [--rounds 7] [--tokens 128] [--threads 1]
        [--runtime DIR ...] [--gguf FILE]

Each round starts one fresh process per --runtime (a `runtime/` folder holding layerpack_runtime;
default: this checkout's; give two, e.g. an export of main's and this one, to compare before and
after side by side, interleaved) and, with --gguf, one llama.cpp process (.bench-venv) doing the
same work. A process reports (time.perf_counter deltas): interpreter start (the parent's spawn to
the child's first line), `import torch`, `import layerpack_runtime` + `load`, `load(pack)`, the
tokenizer (encode the prompt), prefill, --tokens - 1 decode steps, and exit (its last line to the
parent seeing it end). "total" is the parent's spawn to exit: the whole-process time of
bench_llamacpp.py.
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
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"
PHASES = ["start", "import torch", "import runtime", "load", "tokenizer", "prefill", "decode", "exit", "total"]

_LAYERPACK = r"""
import time, sys, json
t = [time.perf_counter()]
import torch
t.append(time.perf_counter())
from layerpack_runtime import load
t.append(time.perf_counter())
cfg = json.loads(sys.argv[1])
model = load(cfg["pack"], threads=cfg["threads"])
t.append(time.perf_counter())
ids = torch.tensor([model.encode_prompt(cfg["prompt"])])
t.append(time.perf_counter())
with torch.inference_mode():
    cache = model.new_cache(1, ids.shape[1] + cfg["tokens"] + 1)
    tok = model.forward(ids, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    t.append(time.perf_counter())
    for _ in range(cfg["tokens"] - 1):
        tok = model.forward(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
t.append(time.perf_counter())
import layerpack_runtime
print(json.dumps({"t": t, "file": layerpack_runtime.__file__}), flush=True)
"""

# the same work in llama.cpp: the tokenizer is the GGUF's own (llama.cpp tokenizes the prompt itself)
_LLAMACPP = r"""
import time, sys, json
t = [time.perf_counter()]
t.append(time.perf_counter())
import llama_cpp
t.append(time.perf_counter())
cfg = json.loads(sys.argv[1])
llm = llama_cpp.Llama(cfg["gguf"], n_ctx=256, n_threads=cfg["threads"], n_threads_batch=cfg["threads"], verbose=False)
t.append(time.perf_counter())
ids = llm.tokenize(cfg["prompt"].encode())
t.append(time.perf_counter())
gen = llm.generate(ids, temp=0.0, top_k=1, reset=True)
next(gen)
t.append(time.perf_counter())
for _ in range(cfg["tokens"] - 1):
    next(gen)
t.append(time.perf_counter())
print(json.dumps({"t": t, "file": llama_cpp.__file__}), flush=True)
"""


def one(py: str, code: str, cfg: dict, env: dict) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen([py, "-c", code, json.dumps(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    t_line = time.perf_counter()
    err = proc.communicate()[1]
    t_end = time.perf_counter()
    if proc.returncode != 0 or not line:
        sys.exit(f"error: worker failed:\n{err[-3000:]}")
    out = json.loads(line)
    t = out["t"]
    # the child's clock and ours are the same monotonic clock (CLOCK_MONOTONIC) on Linux
    phases = [t[0] - t0] + [b - a for a, b in zip(t, t[1:])] + [t_end - t_line, t_end - t0]
    return {"phases": dict(zip(PHASES, phases)), "file": out["file"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pack")
    ap.add_argument("--runtime", action="append", help="a folder holding layerpack_runtime (repeatable; default: this checkout's runtime/)")
    ap.add_argument("--gguf", help="also time llama.cpp (.bench-venv) on this GGUF")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.rounds < 1 or a.tokens < 2:
        sys.exit("error: --rounds must be >= 1 and --tokens >= 2")
    runtimes = [str(Path(r).resolve()) for r in (a.runtime or [ROOT / "runtime"])]
    cfg = {"pack": a.pack, "threads": a.threads, "tokens": a.tokens, "prompt": PROMPT, "gguf": a.gguf}
    sides = [(f"layerpack {r}", str(ROOT / ".venv" / "bin" / "python"), _LAYERPACK,
              {**os.environ, "PYTHONPATH": r}) for r in runtimes]
    if a.gguf:
        sides.append(("llama.cpp", str(ROOT / ".bench-venv" / "bin" / "python"), _LLAMACPP, dict(os.environ)))
    rows: dict = {name: [] for name, *_ in sides}
    loads = []
    for r in range(a.rounds):
        loads.append(os.getloadavg()[0])
        for name, py, code, env in (sides if r % 2 == 0 else sides[::-1]):
            res = one(py, code, cfg, env)
            if name.startswith("layerpack") and not res["file"].startswith(name.split(" ", 1)[1]):
                sys.exit(f"error: {name}: imported {res['file']} instead")
            rows[name].append(res["phases"])
            print(f"round {r + 1}: {name}: total {res['phases']['total']:.2f} s", file=sys.stderr, flush=True)
    print(f"Pack `{a.pack}`, {a.tokens} tokens, {a.threads} thread(s), {a.rounds} rounds (fresh processes, interleaved); "
          f"medians in seconds; load average (1 min) at each round's start {', '.join(f'{x:.2f}' for x in loads)}.\n")
    print("| process | " + " | ".join(PHASES) + " |")
    print("|---|" + "--:|" * len(PHASES))
    for name, res in rows.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(x[p] for x in res):.3f}" for p in PHASES) + " |")


if __name__ == "__main__":
    main()
