#!/usr/bin/env python3
"""Llama-3.1-405B-shaped packs on this machine, and a projection for the full 126-layer model.

    python scripts/bench_405b.py --packs nf4=PACK,int8=PACK,bf16=PACK [--budgets 8GB,min] [--tokens 4]
                                 [--convert-log FILE ...] [--context 4096] [--record]

Packs come from `scripts/make_synthetic.py` (N decoder layers with 405B's real shapes) converted
with `layerpack convert` (BENCHMARKS.md gives the commands). For every pack and budget, a fresh
child process loads the pack with `--max-memory` = the budget (`min`: the smallest the planner
accepts), with the page cache off for streamed units (page_cache=False: every streamed byte comes
from the disk, every step) and generates a few greedy tokens from a 1-token prompt, timing every
unit (layerpack_runtime.unitstats). Measured per run: seconds per step, bytes read per step,
compute per step, peak RSS above the import baseline (ru_maxrss minus the RSS after imports).
Checks: peak <= budget x 1.1; s/step <= 1.25 x max(bytes/step / disk bandwidth, compute/step).
The disk's sequential read bandwidth is measured first on a pack file (evicted from the page cache
with POSIX_FADV_DONTNEED before reading).

Projection (126 layers): the runtime's own planner (budget.plan) decides residency for budgets of
8, 24, 64 and 256 GB from the measured unit costs; seconds/token = max(streamed bytes / disk
bandwidth x measured read efficiency, measured compute) x the measured overlap factor (how much a
cold run exceeded that max). Each line names its bound.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import machine, record  # noqa: E402

GB = 10**9
GiB = 1 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- bench_405b:start -->", "<!-- bench_405b:end -->"
FULL_LAYERS = 126
PROJ_BUDGETS = (8, 24, 64, 256)     # GB of memory
PROJ_DISKS = (1.0, 3.5, 7.0)        # GB/s sequential read (SATA-class to PCIe 5 NVMe)
PCIE = {"PCIe 4 x16": 32.0, "PCIe 5 x16": 64.0}  # GB/s nominal
PCIE_EFFICIENCY = 0.87              # measured: pinned host->device 55.4 GB/s of PCIe 5 x16's nominal 64 on an H200 (bench_gpu.py, 2026-12-04)
GPU_BUDGET = 8                      # GB of GPU memory for the GPU lines
# Reported by users of the tools people switch from (links in the recorded section):
OTHERS = [
    ("AirLLM, Qwen2.5-Coder-32B 4-bit, RTX 3050 6 GB, model on HDD", "just above 2 min/token",
     "https://github.com/lyogavin/airllm/issues/186"),
    ("AirLLM, same, model on a RAM disk", "13 s/token", "https://github.com/lyogavin/airllm/issues/186"),
    ("AirLLM, Platypus2-70B, NVMe (qcow2)", "~30 s/token", "https://github.com/lyogavin/airllm/issues/282"),
    ("AirLLM, 7B streamed on an 8 GB RTX 4060 laptop", "0.05 tok/s (20 s/token)", "https://github.com/lyogavin/airllm/issues/325"),
    ("llama.cpp mmap, 30B (20 GB file) on a 16 GB laptop, 1 GB/s NVMe", "20 s/token", "https://github.com/ggml-org/llama.cpp/pull/711"),
    ("llama.cpp mmap, 7B on an 8 GB Mac once memory runs short", "0.6 s -> 3 min/token", "https://github.com/ggml-org/llama.cpp/issues/702"),
]


# ----------------------------------------------------------------------------------------- child
def child(a) -> None:
    """One measured run (in its own process, so that ru_maxrss is this run's)."""
    import resource

    import torch  # noqa: F401  (imported before the baseline is taken, like the CLI)
    from layerpack_runtime import load
    from layerpack_runtime.errors import LayerpackError

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    base = rss()
    out: dict = {"baseline": base}
    budget = a.budget
    if budget == "min":
        try:
            load(a.pack, max_memory=1, context=a.run_context)
        except LayerpackError as e:
            m = re.search(r"minimum of ([0-9.]+) GiB", str(e))
            if not m:
                raise
            budget = int((float(m.group(1)) + 0.05) * GiB)
    from layerpack_runtime.budget import parse_size

    out["budget"] = budget = parse_size(budget)
    t0 = time.perf_counter()
    try:
        model = load(a.pack, max_memory=budget, context=a.run_context, page_cache=False, device=a.device)
    except LayerpackError as e:
        out["error"] = str(e)
        print(json.dumps(out))
        return
    out["load_s"] = time.perf_counter() - t0
    model.unit_times.enabled = True
    model.generate_ids([1], max_new_tokens=a.tokens)
    s = model.last_stats
    model.unit_times.settle()  # CUDA: compute times are events until read
    out.update(
        steps=s.steps, prefill_s=s.prefill_s, decode_s=s.decode_s, threads=s.threads,
        rows=model.unit_times.rows, placement=model.placement(), plan=model.plan.describe(),
        costs={n: model._unit_cost(n).__dict__ for n in ("embed", "block.000", "head")},
        kv_per_token=model.kv_bytes(1), activation=model.activation_bytes(1), runtime=model.runtime_bytes(),
        minimum=model.minimum_memory(), peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------- parent
def disk_bandwidth(path: str) -> float:
    """Sequential read GB/s of `path`, evicted from the page cache first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(16 << 20)
        n, t0 = 0, time.perf_counter()
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            while (k := f.readinto(buf)) and n < 3 * GB:
                n += k
        dt = time.perf_counter() - t0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return n / dt / GB


def run_child(pack: str, budget: str, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--pack", pack, "--budget", budget,
           "--tokens", str(a.tokens), "--run-context", str(a.run_context), "--device", a.device]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode or not lines:
        return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def summarize(r: dict, disk: float) -> dict:
    rows = r["rows"]
    steps = max(1, r["steps"])
    total = [sum(v[i] for v in rows.values()) for i in range(4)]
    blocks = [v for u, v in rows.items() if u.startswith("block.")]
    streamed_blocks = [rows[u] for u, p in r["placement"].items() if u.startswith("block.") and p == "streamed"]
    s_step = (r["prefill_s"] + r["decode_s"]) / steps
    io = total[0] / steps / (disk * GB)
    compute = total[3] / steps
    read_rate = (sum(v[0] for v in streamed_blocks) / sum(v[1] for v in streamed_blocks) / GB) if streamed_blocks and sum(v[1] for v in streamed_blocks) else None
    return dict(s_step=s_step, bytes_step=total[0] / steps, io=io, compute=compute, bound=max(io, compute),
                ratio=s_step / max(io, compute) if max(io, compute) else float("nan"),
                block_compute=sum(v[3] for v in blocks) / len(blocks) / steps if blocks else 0.0,
                head_compute=rows.get("head", [0, 0, 0, 0])[3] / steps,
                block_read=sum(v[1] for v in blocks) / len(blocks) / steps if blocks else 0.0,
                read_rate=read_rate, over=(r["peak"] - r["baseline"]) / r["budget"])


def projection(costs: dict, per_scheme: dict, disk: float, context: int) -> list[str]:
    """Lines of the full-model projection (see the module docstring)."""
    from layerpack_runtime.budget import UnitCost, plan

    lines = ["| scheme | GB/token streamed | budget | resident blocks | "
             + " | ".join(f"disk {d:g} GB/s" for d in PROJ_DISKS) + " | " + " | ".join(f"GPU {GPU_BUDGET} GB + host, {k}" for k in PCIE) + " |",
             "|---|--:|--:|--:|" + "---|" * (len(PROJ_DISKS) + len(PCIE))]
    for scheme, m in per_scheme.items():
        c = costs[scheme]
        blk, head, emb = (UnitCost(**c["block.000"]), UnitCost(**c["head"]), UnitCost(**c["embed"]))
        units = [UnitCost("embed", emb.stored, emb.dequantized, emb.streamed),
                 *[UnitCost(f"block.{i:03d}", blk.stored, blk.dequantized, blk.streamed) for i in range(FULL_LAYERS)],
                 UnitCost("head", head.stored, head.dequantized, head.streamed)]
        order = ["head", *[f"block.{i:03d}" for i in range(FULL_LAYERS)], "embed"]
        kv = c["kv_per_token"] * FULL_LAYERS // c["layers"] * context
        compute = FULL_LAYERS * m["block_compute"] + m["head_compute"]
        eff = m["read_eff"]
        overlap = max(1.0, m["overlap"])
        for gb in PROJ_BUDGETS:
            try:
                p = plan(units, order, gb * GB, kv, c["activation"], 1, (), 0, False, c["runtime"])
            except Exception as e:  # noqa: BLE001 - below the minimum
                lines.append(f"| {scheme} | | {gb} GB | below the minimum ({str(e)[:60]}...) |" + " |" * (len(PROJ_DISKS) + len(PCIE)))
                continue
            streamed = sum(u.streamed for u in units if u.name in p.streamed)
            res_blocks = sum(1 for n in p.resident if n.startswith("block."))
            cells = []
            for d in PROJ_DISKS:
                io = streamed / (d * GB * eff)
                t = max(io, compute) * overlap
                cells.append(f"{t:,.1f} s ({'disk' if io > compute else 'compute'})")
            for name, bw in PCIE.items():
                # GPU: 8 GB of blocks resident on the GPU; the rest lives in host RAM (budget) and the
                # remainder on a 7 GB/s disk; every non-resident byte crosses PCIe each token.
                gpu_res = min(FULL_LAYERS, max(0, int((GPU_BUDGET * GB - 2 * blk.streamed - kv) // blk.stored)))
                cross = (FULL_LAYERS - gpu_res) * blk.streamed + head.streamed
                host = max(0, gb * GB - c["runtime"] - 2 * blk.streamed)
                from_disk = max(0, cross - host)
                pcie_t = cross / (bw * GB * PCIE_EFFICIENCY)
                disk_t = from_disk / (7.0 * GB * eff)
                t = max(pcie_t, disk_t)
                cells.append(f"{t:,.1f} s ({'PCIe' if pcie_t >= disk_t else 'disk'})")
            lines.append(f"| {scheme} | {streamed / GB:,.0f} | {gb} GB | {res_blocks} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packs", default="", help="scheme=PACK,... (e.g. nf4=/data/l405-nf4,int8=...,bf16=...)")
    ap.add_argument("--budgets", default="8GB,min")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--context", type=int, default=4096, help="context of the projection's KV cache")
    ap.add_argument("--run-context", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--convert-log", action="append", default=[],
                    help="LABEL=FILE: a `/usr/bin/time -v layerpack convert` log to list (peak RSS, wall time)")
    ap.add_argument("--hub", metavar="PACK", help="also push / pull --layers / lazily run PACK through the local Hub look-alike")
    ap.add_argument("--work", default="/tmp", help="scratch space for --hub (the pushed copy and the pulled layers)")
    ap.add_argument("--note", action="append", default=[], help="a line for the report (e.g. the load during --load'ed runs)")
    ap.add_argument("--save", help="also write the runs (JSON) to this file")
    ap.add_argument("--load", action="append", default=[], help="runs saved by --save to include (packs measured earlier)")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pack", help=argparse.SUPPRESS)
    ap.add_argument("--budget", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    packs = dict(kv.split("=", 1) for kv in a.packs.split(",") if kv)
    if not packs and not a.load:
        sys.exit("error: --packs scheme=PACK[,...] (or --load) is required")
    load0 = os.getloadavg()
    runs, costs, per_scheme = [], {}, {}
    disks = []
    for path in a.load:
        with open(path) as f:
            saved = json.load(f)
        for r in saved["runs"]:
            r.setdefault("disk", saved["disk"])  # the disk as measured in the session of that run
        runs += saved["runs"]
        disks.append(saved["disk"])
    if packs:
        block_file = os.path.join(next(iter(packs.values())), "layers", "block.000.safetensors")
        disks.append(disk_bandwidth(block_file))
        print(f"disk: {disks[-1]:.2f} GB/s sequential ({block_file})", file=sys.stderr)
    disk = max(disks)  # the best measurement: a busy shared disk only ever reads slower
    for scheme, pack in packs.items():
        with open(os.path.join(pack, "manifest.json")) as f:
            layers = json.load(f)["architecture"]["num_layers"]
        for budget in a.budgets.split(","):
            r = run_child(pack, budget, a)
            r.update(scheme=scheme, requested=budget, layers=layers, disk=disks[-1])
            runs.append(r)
            if "error" in r:
                print(f"{scheme} {budget}: {r['error']}", file=sys.stderr)
                continue
            print(f"{scheme} {budget}: {(r['prefill_s'] + r['decode_s']) / max(1, r['steps']):.2f} s/step, "
                  f"peak {(r['peak'] - r['baseline']) / GiB:.2f} GiB of {r['budget'] / GiB:.2f}", file=sys.stderr)
    if a.save:
        with open(a.save, "w") as f:
            json.dump({"disk": disks[-1] if packs else disk, "runs": runs}, f)
    for r in runs:
        if "error" not in r:
            r["sum"] = summarize(r, r.get("disk", disk))
            costs[r["scheme"]] = {**r["costs"], "kv_per_token": r["kv_per_token"], "activation": r["activation"],
                                  "runtime": r["runtime"], "layers": r["layers"]}
    for scheme in dict.fromkeys(r["scheme"] for r in runs):
        ok = [r for r in runs if r.get("scheme") == scheme and "sum" in r]
        streamed = [r for r in ok if r["sum"]["read_rate"]]
        if ok:
            per_scheme[scheme] = dict(
                block_compute=min(r["sum"]["block_compute"] for r in ok),
                head_compute=min(r["sum"]["head_compute"] for r in ok),
                read_eff=min(1.0, max(r["sum"]["read_rate"] / r.get("disk", disk) for r in streamed)) if streamed else 1.0,
                overlap=max(r["sum"]["ratio"] for r in streamed) if streamed else 1.0)
    shipped = ship(a.hub, a.work) if a.hub else []
    load1 = os.getloadavg()
    text = report(a, runs, per_scheme, costs, disk, load0, load1, shipped)
    print(text)
    if a.record:
        record(text, START, END)


def _timed(cmd: list[str], env: dict) -> dict:
    """Run a CLI command under /usr/bin/time -v: wall seconds, peak RSS, exit status, last stderr line."""
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([0-9:.]+)", p.stderr)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.group(1).split(":")))) if wall else float("nan")
    err = [l for l in p.stderr.splitlines() if l.startswith("error")]
    return {"rc": p.returncode, "s": secs, "rss": int(rss.group(1)) * 1024 if rss else 0, "error": err[0] if err else ""}


def ship(pack: str, work: str) -> list[str]:
    """push, pull --layers and a lazy run of `pack` through the local Hub look-alike (tests/support/hub_server.py)."""
    import shutil
    import tempfile

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from support.hub_server import HubServer

    token = "hf_bench405bwritetoken"
    size = sum(os.path.getsize(os.path.join(pack, "layers", f)) for f in os.listdir(os.path.join(pack, "layers")))
    rows = []
    cli = [sys.executable, "-m", "layerpack.cli"]
    with HubServer(write_token=token) as hub:
        tmp = tempfile.mkdtemp(dir=work, prefix="hub-")
        try:
            env = {**os.environ, **hub.client_env(os.path.join(tmp, "home"), token)}
            r = _timed([*cli, "push", pack, "bench/l405", "--token", token, "--quiet"], env)
            rows.append(("push (whole pack)", size, r))
            part = os.path.join(tmp, "pulled")
            r = _timed([*cli, "pull", "bench/l405", part, "--layers", "embed,0,head", "--quiet"], env)
            got = sum(os.path.getsize(os.path.join(part, "layers", f)) for f in os.listdir(os.path.join(part, "layers"))) if r["rc"] == 0 else 0
            rows.append(("pull --layers embed,0,head", got, r))
            shutil.rmtree(part, ignore_errors=True)
            r = _timed([*cli, "run", "bench/l405", "Hello", "--max-new-tokens", "2", "--max-memory", "8GB"], env)
            rows.append(("run bench/l405 (lazy, --max-memory 8GB, 2 tokens)", size, r))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out = ["Shipping it (local Hub look-alike on 127.0.0.1, no rate limit; `/usr/bin/time -v` per command):", "",
           "| step | bytes | wall s | MB/s | peak RSS | result |", "|---|--:|--:|--:|--:|---|"]
    for name, nbytes, r in rows:
        out.append(f"| {name} | {nbytes / GB:.2f} GB | {r['s']:.0f} | {nbytes / r['s'] / 1e6:.0f} | {r['rss'] / GiB:.2f} GiB | "
                   f"{'ok' if r['rc'] == 0 else 'exit ' + str(r['rc']) + ' ' + r['error'][:100]} |")
    return out + [""]


def _convert_rows(logs: list[str]) -> list[str]:
    rows = []
    for item in logs:
        label, path = item.split("=", 1)
        txt = open(path).read()
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", txt).group(1)) * 1024
        wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([0-9:.]+)", txt).group(1)
        parts = [float(x) for x in wall.split(":")]
        secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        m = re.search(r"convert (\S+) ", txt)  # the source folder, from the timed command line
        src = m.group(1) if m else ""
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors")) if os.path.isdir(src) else 0
        rate = f"{size / secs / 1e6:.0f}" if size else "-"
        rows.append(f"| {label} | {rss / GiB:.2f} GiB | {secs:.0f} s | {rate} |")
    return rows


def report(a, runs, per_scheme, costs, disk, load0, load1, shipped) -> str:
    out = ["### Llama-3.1-405B-shaped packs (`scripts/bench_405b.py`)", "",
           f"- Machine: {machine()}; " + (f"load average {load0[0]:.1f} before, {load1[0]:.1f} after (shared machine)." if a.packs
                                             else "shared machine (load per run group below)."),
           f"- Command: `python scripts/bench_405b.py {' '.join(sys.argv[1:])}`",
           f"- Disk: sequential read measured on a pack file evicted from the page cache at the start of each session "
           f"({', '.join(f'{d:.2f}' for d in sorted(set(r.get('disk', disk) for r in runs)))} GB/s: the disk is shared too); each run's "
           "bound uses its own session's figure, the projection's read efficiency is a run's read rate over it.",
           "- Runs: a fresh process per row, 1-token prompt, greedy, page cache off for streamed units "
           "(every streamed byte comes from the disk, every step); per step = per forward pass.",
           *[f"- {n}" for n in a.note], ""]
    if a.convert_log:
        out += ["Conversion (`/usr/bin/time -v layerpack convert`):", "",
                "| conversion | peak RSS | wall | MB/s of source |", "|---|--:|--:|--:|", *_convert_rows(a.convert_log), ""]
    out += ["| scheme | layers | budget | plan | s/step | GB read/step | compute s/step | bound = max(io, compute) | s/step ÷ bound | peak RSS above baseline | ÷ budget |",
            "|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in runs:
        if "error" in r:
            out.append(f"| {r['scheme']} | {r['layers']} | {r['requested']} | error: {r['error'][:120]} |" + " |" * 7)
            continue
        s = r["sum"]
        out.append(f"| {r['scheme']} | {r['layers']} | {r['budget'] / GiB:.2f} GiB ({r['requested']}) | {r['plan'].split(';')[0]} | "
                   f"{s['s_step']:.2f} | {s['bytes_step'] / GB:.2f} | {s['compute']:.2f} | {s['bound']:.2f} "
                   f"({'disk' if s['io'] > s['compute'] else 'compute'}) | {s['ratio']:.2f} | {(r['peak'] - r['baseline']) / GiB:.2f} GiB | {s['over']:.2f} |")
    out += ["", "Per unit (measured, per step; the 8 GB run of each scheme where it ran, else the smallest):", "",
            "| scheme | unit | placement | KB read | read s | wait s | compute s |", "|---|---|---|--:|--:|--:|--:|"]
    for scheme in per_scheme:
        rs = [r for r in runs if r.get("scheme") == scheme and "sum" in r]
        r = rs[0]
        steps = max(1, r["steps"])
        for u, v in r["rows"].items():
            out.append(f"| {scheme} | {u} | {r['placement'].get(u, '')} | {v[0] / steps / 1e3:,.0f} | {v[1] / steps:.2f} | {v[2] / steps:.2f} | {v[3] / steps:.2f} |")
    out += ["", *shipped]
    out += [f"Projection for the full model ({FULL_LAYERS} layers, KV for {a.context} tokens), seconds per token:", ""]
    out += projection(costs, per_scheme, disk, a.context)
    out += ["", "Measured efficiencies used: " + "; ".join(
        f"{s}: block compute {m['block_compute']:.2f} s, head {m['head_compute']:.2f} s, streamed read rate "
        f"{m['read_eff'] * disk:.2f} GB/s = {m['read_eff']:.2f} of the disk, overlap factor {m['overlap']:.2f}" for s, m in per_scheme.items()),
        f"GPU lines: {GPU_BUDGET} GB of blocks resident on the GPU, the rest crossing PCIe every token from host RAM "
        f"(the budget) or a 7 GB/s disk; PCIe at {PCIE_EFFICIENCY:.0%} of nominal and GPU compute hidden behind the "
        "transfers are assumptions (no GPU was lent to this task to measure them).", "",
        "Reported by users of other tools (for scale; different models and machines):", ""]
    out += [f"- {what}: {fig} ({url})" for what, fig, url in OTHERS]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
