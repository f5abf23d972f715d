#!/usr/bin/env python3
"""`layerpack serve` under 1, 4, 8 and 16 concurrent clients, on a streamed SmolLM2 pack.

    .venv/bin/python scripts/bench_serve.py [--tokens 32] [--threads 1] [--reads cache,disk] [--record]

Converts SmolLM2-135M-Instruct to NF4 once, finds the smallest --max-memory that holds the server's
KV slots (--max-batch 16 x --context) and activations, and serves the pack with a little more than
that, so most layers stream every step (the plan is printed): from the page cache (--reads cache: this
small pack fits in RAM, so a step's cost is compute) and, with --reads disk, from the disk itself
(the server runs with --no-page-cache, as for a model larger than RAM: a step waits on its reads). Then, against that one
server, N clients (the real `openai` client, one thread each) send N different chat requests at
once (streaming, greedy, --tokens new tokens each). Per level: total completion tokens/s over the
wall time of the level, time to first token, p50/p95 request latency, and the speed-up over one
client. Levels are run in rounds (1, 4, 8, 16, then again); the table keeps the median round of
each level (--keep best: the best one).

The clients run in a process of their own (one per level), so their JSON parsing and threads do
not share the server's interpreter; with 2 or more CPUs (and no --no-pin) the server is pinned to
the last CPU this script may use and the clients to the others (sched_setaffinity), so the two
do not take turns on one core. Other programs may still run on either.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import machine, record, smollm2_checkpoint  # noqa: E402

MARK_START, MARK_END = "<!-- bench_serve:start -->", "<!-- bench_serve:end -->"
LEVELS = (1, 4, 8, 16)
TOPICS = ["the ocean", "a city at night", "mountains", "a library", "the moon", "a garden", "trains", "winter",
          "a market", "the desert", "rivers", "a lighthouse", "forests", "a bakery", "the stars", "islands"]


def min_budget(pack: str, batch: int, context: int) -> int:
    """The smallest --max-memory the server's plan accepts (everything streamed that can be)."""
    code = ("import sys; from layerpack_runtime import load; from layerpack_runtime.engine import Engine\n"
            f"m = load({pack!r}); Engine(m, max_batch={batch}, context={context}); print(m.minimum_memory())")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])


def one_request(client, i: int, tokens: int, out: list, start: threading.Barrier) -> None:
    start.wait()
    t0 = time.perf_counter()
    ttft, n = None, 0
    stream = client.chat.completions.create(
        model="pack", messages=[{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."}],
        max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            n = chunk.usage.completion_tokens
    out[i] = (ttft if ttft is not None else time.perf_counter() - t0, time.perf_counter() - t0, n)


def pin(cpus: set[int] | None) -> None:
    """Run this process on `cpus` only (Linux; elsewhere, or for None, nothing)."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def cpu_split(no_pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, client CPUs): the last usable CPU for the server, the rest for the clients;
    (None, None) with --no-pin or fewer than 2 CPUs."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if no_pin or len(cpus) < 2:
        return None, None
    return {cpus[-1]}, set(cpus[:-1])


def level_in_client_process(url: str, clients: int, tokens: int, cpus: set[int] | None) -> dict:
    """One level, its clients in a fresh process (pinned to `cpus`): the result of level()."""
    cmd = [sys.executable, __file__, "--client", url, "--clients", str(clients), "--tokens", str(tokens)]
    if cpus:
        cmd += ["--client-cpus", ",".join(map(str, sorted(cpus)))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"client process failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def level(url: str, clients: int, tokens: int) -> dict:
    import openai

    results = [None] * clients
    cs = [openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=1800) for _ in range(clients)]
    start = threading.Barrier(clients + 1)  # every client is ready before the clock starts
    threads = [threading.Thread(target=one_request, args=(cs[i], i, tokens, results, start)) for i in range(clients)]
    for t in threads:
        t.start()
    h0 = health(url)
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    h1 = health(url)
    ttfts, lats = [r[0] for r in results], sorted(r[1] for r in results)
    total = sum(r[2] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]

    return {"clients": clients, "tokens": total, "wall": wall, "tps": total / wall, "ttft": statistics.median(ttfts),
            "p50": pct(lats, 0.5), "p95": pct(lats, 0.95), "steps": h1["steps"] - h0["steps"],
            "prefills": h1["prefills"] - h0["prefills"]}


def health(url: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/health") as r:
        return json.load(r)


def evict(pack: str) -> None:
    """Drop the pack's layer files from the OS page cache (POSIX_FADV_DONTNEED; Linux), so a
    --no-page-cache server reads what it streams from the disk."""
    layers = os.path.join(pack, "layers")
    for name in sorted(os.listdir(layers)):
        fd = os.open(os.path.join(layers, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_speed(pack: str) -> float:
    """GB/s of one cold pass over the pack's layer files, one after another (evicted first, 8 MiB
    reads): what a step of a --no-page-cache server reads, at the disk's own pace."""
    layers = os.path.join(pack, "layers")
    evict(pack)
    t0, n = time.perf_counter(), 0
    for name in sorted(os.listdir(layers)):
        fd = os.open(os.path.join(layers, name), os.O_RDONLY)
        try:
            while chunk := os.read(fd, 8 << 20):
                n += len(chunk)
        finally:
            os.close(fd)
    dt = time.perf_counter() - t0
    evict(pack)
    return n / dt / 1e9


def run_pack(pack: str, quant: str, a, page_cache: bool = True) -> tuple[list[str], float]:
    """Serve one pack and measure every level; returns the report's lines and the 8-client ratio.
    page_cache False: the server runs with --no-page-cache (every streamed layer read from the disk
    each step, as for a model larger than RAM) and the pack is evicted from the page cache first."""
    import openai
    from layerpack_runtime.budget import fmt_size, parse_size

    batch = max(LEVELS)
    budget = min_budget(pack, batch, a.context) + parse_size(a.extra_memory)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [pack, "--port", str(port), "--max-memory", str(budget), "--max-batch", str(batch), "--context", str(a.context),
            "--threads", str(a.threads), "--model-name", "pack", "--quiet"] + ([] if page_cache else ["--no-page-cache"])
    if not page_cache:
        evict(pack)
    log = open(os.path.join(a.work, f"server-{quant}.log"), "w+")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    server_cpus, client_cpus = cpu_split(a.no_pin)
    proc = subprocess.Popen([sys.executable, "-m", "layerpack.cli", "serve", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=(lambda: pin(server_cpus)) if server_cpus else None)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while True:
            try:
                openai.OpenAI(base_url=url, api_key="none", max_retries=0).models.list()
                break
            except openai.APIConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise SystemExit(f"server did not start: {log.read()[-800:]}")
                time.sleep(0.5)
        level_in_client_process(url, 1, 4, client_cpus)  # warm-up
        load_before = os.getloadavg()
        runs: dict[int, list[dict]] = {n: [] for n in LEVELS}
        for r in range(a.rounds):
            for n in LEVELS:
                res = level_in_client_process(url, n, a.tokens, client_cpus)
                print(f"{quant} round {r + 1}: {n:2d} clients: {res['tps']:.2f} tokens/s, TTFT {res['ttft']:.2f} s, "
                      f"p50 {res['p50']:.2f} s, p95 {res['p95']:.2f} s", flush=True)
                runs[n].append(res)
        load_after = os.getloadavg()
        best = {n: kept(rs, a.keep) for n, rs in runs.items()}
    finally:
        proc.terminate()
        proc.wait(60)
    log.seek(0)
    plan = re.search(r"memory plan: (.*)", log.read())
    base = best[1]["tps"]
    where = (f"server pinned to CPU {','.join(map(str, sorted(server_cpus)))}, clients (one process per level) to CPU "
             f"{','.join(map(str, sorted(client_cpus)))}" if server_cpus else "clients in their own process, nothing pinned")
    reads = ("streamed layers read from the page cache (the pack fits in RAM: each step's cost is compute)" if page_cache else
             f"`--no-page-cache`: streamed layers read from the disk every step (a model larger than RAM; a cold "
             f"read of the pack's layer files, one after another, ran at {disk_read_speed(pack):.2f} GB/s)")
    lines = [f"### {quant} pack, {'in the page cache' if page_cache else 'streamed from the disk'}", "",
             f"Server: `layerpack serve PACK --max-memory {fmt_size(budget)} --max-batch {batch} --context {a.context} "
             f"--threads {a.threads}{'' if page_cache else ' --no-page-cache'}` (the smallest budget for {batch} KV slots + "
             f"{a.extra_memory}); {reads}; {where}; load average "
             f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; plan: {plan.group(1) if plan else '?'}.", "",
             "| clients | total tokens/s | vs 1 client | TTFT (median) | latency p50 | latency p95 | tokens | decode steps + prefills (weight passes) | tokens per pass |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in LEVELS:
        r = best[n]
        lines.append(f"| {n} | {r['tps']:.2f} | **{r['tps'] / base:.2f}x** | {r['ttft']:.2f} s | {r['p50']:.2f} s | "
                     f"{r['p95']:.2f} s | {r['tokens']} | {r['steps']} + {r['prefills']} | "
                     f"{r['tokens'] / max(1, r['steps'] + r['prefills']):.2f} |")
    lines.append("")
    lines.append("Every round's total tokens/s: " + "; ".join(
        f"{n} clients " + ", ".join(f"{r['tps']:.2f}" for r in runs[n]) for n in LEVELS) + ".")
    return lines + [""], best[8]["tps"] / base


def kept(results: list[dict], keep: str) -> dict:
    """The round the table shows: the median by tokens/s (the lower middle one of an even count), or the best."""
    ordered = sorted(results, key=lambda r: r["tps"])
    return ordered[-1] if keep == "best" else ordered[(len(ordered) - 1) // 2]


def client_main(a) -> None:
    """--client: run one level against the server at a.client and print its result as JSON."""
    if a.client_cpus:
        pin({int(c) for c in a.client_cpus.split(",")})
    print(json.dumps(level(a.client, a.clients, a.tokens)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quants", default="nf4,bf16", help="packs to serve, converted from SmolLM2 (nf4, int8, bf16)")
    ap.add_argument("--extra-memory", default="8MiB", help="budget above the minimum (the rest streams)")
    ap.add_argument("--work", default="/tmp/layerpack-bench-serve")
    ap.add_argument("--keep", choices=("median", "best"), default="median", help="which round of each level the table shows")
    ap.add_argument("--reads", default="cache,disk",
                    help="cache: the pack in the page cache (compute-bound steps); disk: --no-page-cache (I/O-bound steps)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the server and the clients to separate CPUs")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--client", help=argparse.SUPPRESS)  # internal: run one level's clients against this URL
    ap.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--client-cpus", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.client:
        return client_main(a)
    os.makedirs(a.work, exist_ok=True)
    lines = [f"## `layerpack serve`: concurrent clients on a streamed SmolLM2 pack ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {machine(a.threads)}.",
             f"Command: `.venv/bin/python scripts/bench_serve.py --tokens {a.tokens} --context {a.context} --threads {a.threads} "
             f"--rounds {a.rounds} --quants {a.quants} --reads {a.reads}{' --keep best' if a.keep == 'best' else ''}{' --no-pin' if a.no_pin else ''} --record`. "
             f"Each client: one streaming greedy chat request "
             f"(the real `openai` client, one thread per client, all clients of a level in one process of their own) for "
             f"{a.tokens} new tokens (fewer if the model ends its answer), all clients at once; total tokens/s = all "
             f"completion tokens / wall time of the level; levels interleaved over {a.rounds} rounds, the {a.keep} round "
             f"per level in the table.", ""]
    ratios = {}
    for quant in a.quants.split(","):
        pack = os.path.join(a.work, f"smollm2-{quant}")
        if not os.path.isfile(os.path.join(pack, "manifest.json")):
            opts = [] if quant == "bf16" else ["--quant", quant]
            subprocess.run([sys.executable, "-m", "layerpack.cli", "convert", smollm2_checkpoint(), pack, *opts,
                            "--quiet", "--overwrite"], check=True)
        for reads in a.reads.split(","):
            part, ratios[f"{quant} ({reads})"] = run_pack(pack, quant, a, page_cache=reads == "cache")
            lines += part
    lines.append("Target: >= 5x one client's tokens/s with 8 clients: "
                 + "; ".join(f"{q} {'met' if r >= 5 else 'MISSED'} ({r:.2f}x)" for q, r in ratios.items()) + ".")
    report = "\n".join(lines)
    print(report)
    if a.record:
        record(report, MARK_START, MARK_END)


if __name__ == "__main__":
    main()
