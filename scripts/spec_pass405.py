"""bench_speculative.py --pass-pack PACK: what one target pass costs on a Llama-3.1-405B-shaped pack
at its minimum budget when it verifies 1, 16 or 64 positions, and the 126-layer projection with
speculation built on it (issue 21, item 5).

The pass: after a 16-token context (one streamed pass, not timed), the positions are the nodes of
a tree (node i's parent is node (i - 1) // 2: a binary tree, verified with the tree attention mask
and tree positions speculation uses) run through every unit once, logits at every position (the
verifier needs them all); then the tree's columns are dropped (cache.keep([])) so the next pass
sees the same context. Sizes are interleaved round by round (1, 16, 64, 1, 16, 64, ...), medians
of `repeats`; each pass starts once the read-ahead of its first unit (started by the previous pass)
has finished, so every pass reads the same units whatever came before it. Reads bypass the page
cache by default (page_cache=False: a 405B model does not fit in RAM, so neither does its page
cache: O_DIRECT); --page-cache keeps it, which the report then says. --compare-reads runs every pass
also with the buffered reads O_DIRECT replaced, interleaved pass by pass, and the disk's speed is
probed with O_DIRECT at the start of each round (the reference of the read efficiency: a shared
disk's speed drifts).

Projection (126 layers, 8 GB budget, KV for 4096 tokens): the runtime's planner (budget.plan, as
bench_405b.py) gives the bytes streamed per pass; per pass at T positions
    pass(T) = max(streamed / (disk x read efficiency), 126 x block compute(T) + head compute(T)) x overlap(T)
with block and head compute, read efficiency (streamed read rate / measured disk) and overlap
(measured pass / max(measured io, measured compute), at least 1) from the runs above; seconds per
token = pass(T) / tokens per pass. Tokens per pass is NOT measured here (random weights accept
nothing): it is an assumption taken from published results for a small draft of a large target,
named in the report. A second column per T assumes compute hidden behind the reads (a GPU, or a
CPU fast enough): pass = streamed / disk. --device cuda measures the pass on a GPU (streamed units
move host -> GPU; the budget is then the GPU's), where that assumption can be checked.
"""
from __future__ import annotations

import os
import re
import statistics
import time

CONTEXT = 16
FULL_LAYERS = 126
PROJ_BUDGET_GB = 8
PROJ_DISK = 3.5           # GB/s, the disk
PROJ_CONTEXT = 4096
GB = 10**9
# Tokens per target pass for a small draft of a large target, from published results (assumptions:
# none of these is Llama-3.1-8B drafting for 405B, nor measured by this script).
PUBLISHED = [
    ("SpecExec README sample: Llama-2-7B target, TinyLlama-1.1B draft, OASST, t=0.6, 128-token tree", 6.68,
     "https://github.com/yandex-research/specexec (README, summary table: gen_rate 6.68 / 7.65 / 7.99 at budgets 128 / 256 / 512)"),
    ("Sequoia: Llama2-70B target, Llama2-7B draft, offloaded on an RTX 4090: 0.57 vs 4.54 s/token (7.96x), i.e. >= 8 tokens per pass", 8.0,
     "https://www.together.ai/blog/sequoia (arXiv 2402.12374)"),
    ("SpecExec paper: 10-20 tokens per pass with draft trees of thousands of tokens (70B targets)", 12.0,
     "https://arxiv.org/abs/2406.02532"),
]


def read_queue() -> str:
    from layerpack_runtime import fileio

    return f"{fileio.READ_THREADS} reads of {fileio.READ_CHUNK >> 20} MiB in flight"


def direct_bandwidth(path: str) -> float:
    """Sequential read GB/s of `path` (up to 3 GB of it) with O_DIRECT, as the streamer reads with
    page_cache=False (fileio.read_unbuffered: READ_THREADS chunks of READ_CHUNK in flight); 0 where
    O_DIRECT is refused."""
    import torch

    from layerpack_runtime import fileio

    n = min(os.path.getsize(path), 3 * GB)
    raw = torch.empty(fileio.direct_span(0, n) + fileio.DIRECT_ALIGN, dtype=torch.uint8)
    region = memoryview(raw.numpy())[(-raw.data_ptr()) % fileio.DIRECT_ALIGN:]
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    t0 = time.perf_counter()
    got, direct = fileio.read_unbuffered(path, region, 0, n)
    dt = time.perf_counter() - t0
    return got / dt / GB if direct else 0.0


def tree_parents(n: int) -> list[int]:
    return [-1] + [(i - 1) // 2 for i in range(1, n)]


def minimum_budget(pack: str, workload, device: str, page_cache: bool = True) -> int:
    """The smallest --max-memory the planner accepts for `workload` (read from its refusal, which
    comes before any weight is loaded)."""
    from layerpack_runtime import load
    from layerpack_runtime.budget import parse_size
    from layerpack_runtime.errors import LayerpackError

    try:
        load(pack, max_memory=1, workload=workload, device=device, page_cache=page_cache)
    except LayerpackError as e:
        m = re.search(r"minimum of ([0-9.]+ ?[KMGT]?i?B)", str(e))
        if m:
            return parse_size(m.group(1).replace(" ", ""))
        raise
    raise RuntimeError("a 1-byte budget was accepted")


def measure(pack: str, positions: list[int], repeats: int, page_cache: bool, threads: int | None,
            device: str = "cpu", compare_buffered: bool = False, disk_probe=None) -> dict:
    """compare_buffered (page_cache=False): every pass also run with buffered reads (the path O_DIRECT
    replaced), the two interleaved pass by pass (order flipped every round): runs_buffered.
    disk_probe(): the disk's GB/s now, measured at the start of every round once the streamer's
    read-ahead has finished (a shared disk's speed drifts: the read efficiency is taken per round)."""
    import torch

    from layerpack_runtime import load
    from layerpack_runtime.options import Workload

    top = max(positions)
    workload = Workload(context=CONTEXT + top, prefill_tokens=top)
    budget = minimum_budget(pack, workload, device, page_cache)  # page_cache=False: O_DIRECT's headroom counted
    model = load(pack, max_memory=budget, workload=workload, page_cache=page_cache, threads=threads, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    model.unit_times.enabled = True
    cache = model.new_cache(1, CONTEXT + top, step_tokens=top)
    model.forward(torch.arange(1, CONTEXT + 1)[None], cache=cache, last_only=True)
    runs: dict[int, list[dict]] = {n: [] for n in positions}
    runs_buffered: dict[int, list[dict]] = {n: [] for n in positions}
    direct = model.streamer is not None and model.streamer.direct
    modes = [True, False] if compare_buffered and direct else [direct]
    probes = []
    for r in range(repeats):
        if disk_probe is not None:
            for _, fut, _ in (model.streamer.inflight if model.streamer is not None else []):
                fut.result()
            probes.append(disk_probe())
            print(f"  round {r + 1}: disk {probes[-1]:.2f} GB/s", flush=True)
        for n, mode in [(n, mode) for n in positions for mode in (modes if r % 2 == 0 else modes[::-1])]:
            if model.streamer is not None:
                for _, fut, _ in model.streamer.inflight:  # the read ahead (this pass's first unit) done in the last mode
                    fut.result()
                model.streamer.direct = mode  # the mode of the units this pass reads
            cache.add_tree(tree_parents(n))
            model.unit_times.reset()
            sync()
            t0 = time.perf_counter()
            logits = model.forward(torch.arange(100, 100 + n)[None], cache=cache)
            sync()
            dt = time.perf_counter() - t0
            assert logits.shape[1] == n and bool(torch.isfinite(logits).all())
            cache.keep([])
            (runs if mode == direct else runs_buffered)[n].append({"s": dt, "units": {u: list(v) for u, v in model.unit_times.rows.items()}})
            print(f"  round {r + 1}: {n} positions {dt:.2f} s{'' if len(modes) == 1 else (' O_DIRECT' if mode else ' buffered')}",
                  flush=True)
    costs = {u: model._unit_cost(u).__dict__ for u in ("embed", "block.000", "head")}
    out = dict(device=device, budget=budget, plan=model.plan.describe(), placement=model.placement(), runs=runs, costs=costs,
               runs_buffered={n: v for n, v in runs_buffered.items() if v}, direct=direct, disk_probes=probes,
               kv_per_token=model.kv_bytes(1), activation=model.activation_bytes(top), runtime=model.runtime_bytes(),
               layers=sum(1 for u in model.placement() if u.startswith("block.")))
    model.close()
    return out


def summarize(runs: list[dict], disk: float) -> dict:
    """Medians over the repeats of one size: pass seconds, bytes read, block/head compute, read rate."""
    def med(f):
        return statistics.median(f(r) for r in runs)

    def blocks(r, i):
        vals = [v[i] for u, v in r["units"].items() if u.startswith("block.")]
        return sum(vals) / max(1, len(vals))

    s = med(lambda r: r["s"])
    nbytes = med(lambda r: sum(v[0] for v in r["units"].values()))
    read_s = med(lambda r: sum(v[1] for v in r["units"].values()))
    compute = med(lambda r: sum(v[3] for v in r["units"].values()))
    io = nbytes / (disk * GB)
    return dict(s=s, bytes=nbytes, compute=compute, block_compute=med(lambda r: blocks(r, 3)),
                head_compute=med(lambda r: r["units"].get("head", [0, 0, 0, 0])[3]),
                read_rate=nbytes / read_s / GB if read_s else None, io=io,
                overlap=max(1.0, s / max(io, compute)) if max(io, compute) else 1.0)


def streamed_per_pass(m: dict, positions: int) -> tuple[int, int]:
    """(bytes streamed per pass, resident blocks) of the 126-layer model at PROJ_BUDGET_GB, planned
    by the runtime's planner from the measured unit costs."""
    from layerpack_runtime.budget import UnitCost, plan

    c = m["costs"]
    blk, head, emb = UnitCost(**c["block.000"]), UnitCost(**c["head"]), UnitCost(**c["embed"])
    units = [emb, *[UnitCost(f"block.{i:03d}", blk.stored, blk.dequantized, blk.streamed) for i in range(FULL_LAYERS)], head]
    order = ["head", *[f"block.{i:03d}" for i in range(FULL_LAYERS)], "embed"]
    kv = m["kv_per_token"] * FULL_LAYERS // m["layers"] * PROJ_CONTEXT
    p = plan(units, order, PROJ_BUDGET_GB * GB, kv, m["activation"], 1, (), 0, False, m["runtime"])
    return sum(u.streamed for u in units if u.name in p.streamed), sum(1 for n in p.resident if n.startswith("block."))


def report(pack: str, m: dict, disk: float, pack_bytes: int, mem_available: int, page_cache: bool, cmd: str,
           machine: str, load0, load1, disk_note: str | None = None, buffered_reads: bool = False) -> str:
    from layerpack_runtime.budget import fmt_size

    probes = [p for p in m.get("disk_probes") or [] if p > 0]
    if probes:  # the disk's speed while the passes ran: the read efficiency's reference
        disk = statistics.median(probes)
        disk_note = (f"{disk_note or ''}; O_DIRECT at the start of each round (1.8 GB, the same read as the streamer's): "
                     + ", ".join(f"{p:.2f}" for p in probes) + f" GB/s, median {disk:.2f} GB/s: the reference for the read "
                     "efficiencies below")
    sums = {n: summarize(rs, disk) for n, rs in m["runs"].items()}
    one = sums[min(sums)]
    how = ("O_DIRECT reads into the stream slots" if m.get("direct", not buffered_reads) else
           "buffered reads, each unit dropped from the page cache once read (the path O_DIRECT replaced)")
    served = (f"reads bypassed the page cache (page_cache=False, every streamed byte from the disk each pass): {how}" if not page_cache
              else f"page cache kept: the pack ({pack_bytes / GB:.1f} GB) fits in available RAM ({mem_available / GB:.1f} GB), "
                   "so after the first pass the page cache served the reads")
    lines = ["### Verify-pass cost on the 405B-shaped pack (`scripts/bench_speculative.py --pass-pack`)", "",
             f"- Machine: {machine}; load average {load0[0]:.1f} at start, {load1[0]:.1f} at end (shared: compare within the run).",
             f"- Command: `{cmd}`",
             f"- Pack: `{os.path.basename(os.path.normpath(pack))}`, {m['layers']} decoder layers of Llama-3.1-405B's shapes, NF4, "
             f"{pack_bytes / GB:.1f} GB (random codes: scripts/make_synthetic.py --pack); budget {fmt_size(m['budget'])} "
             f"(the minimum for a {CONTEXT}+{max(sums)}-token workload) on {m.get('device', 'cpu')}; plan: {m['plan']}.",
             f"- Reads: {served}. Disk: {disk_note or f'{disk:.2f} GB/s sequential (measured first, file evicted)'}.",
             f"- Pass: a binary tree of n positions after a {CONTEXT}-token context, logits at every position, then "
             "the tree's columns dropped; sizes interleaved round by round, medians of "
             f"{len(next(iter(m['runs'].values())))}.", "",
             "| positions | pass s (median) | ÷ 1-position pass | GB read | read GB/s | compute s | block compute s | head compute s | all runs s |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for n, s in sums.items():
        lines.append(f"| {n} | {s['s']:.2f} | {s['s'] / one['s']:.2f}x | {s['bytes'] / GB:.2f} | "
                     f"{s['read_rate'] or 0:.2f} | {s['compute']:.2f} | {s['block_compute']:.2f} | {s['head_compute']:.2f} | "
                     + ", ".join(f"{r['s']:.1f}" for r in m["runs"][n]) + " |")
    if m.get("runs_buffered"):
        buf = {n: summarize(rs, disk) for n, rs in m["runs_buffered"].items()}
        lines += ["", "The same passes with buffered reads (the path before O_DIRECT: page-cache copies, each unit dropped "
                  "from the page cache once read, read-ahead hints), interleaved with the O_DIRECT passes above pass by pass "
                  "(the order flipped every round), medians:", "",
                  "| positions | buffered pass s | O_DIRECT pass s | buffered ÷ O_DIRECT | read GB/s buffered | read GB/s O_DIRECT | "
                  "read efficiency buffered | O_DIRECT | buffered runs s |", "|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
        for n, b in buf.items():
            d = sums[n]
            lines.append(f"| {n} | {b['s']:.2f} | {d['s']:.2f} | {b['s'] / d['s']:.2f}x | {b['read_rate'] or 0:.2f} | "
                         f"{d['read_rate'] or 0:.2f} | {(b['read_rate'] or 0) / disk:.2f} | {(d['read_rate'] or 0) / disk:.2f} | "
                         + ", ".join(f"{r['s']:.1f}" for r in m["runs_buffered"][n]) + " |")
    lines += ["", f"Projection for the full model ({FULL_LAYERS} layers, {PROJ_BUDGET_GB} GB budget, KV for {PROJ_CONTEXT} "
              f"tokens, a {PROJ_DISK} GB/s disk), seconds per generated token = pass(T) / tokens per pass:", "",
              "| positions T | GB streamed per pass | pass(T), measured compute | s/token at " +
              " | s/token at ".join(f"{k:g}" for _, k, _ in PUBLISHED) + " tokens/pass | pass(T), compute hidden | s/token at " +
              " | s/token at ".join(f"{k:g}" for _, k, _ in PUBLISHED) + " tokens/pass |",
              "|--:|--:|--:|" + "--:|" * len(PUBLISHED) + "--:|" + "--:|" * len(PUBLISHED)]
    for n, s in sums.items():
        streamed, resident = streamed_per_pass(m, n)
        eff = min(1.0, (one["read_rate"] or disk) / disk)
        io = streamed / (PROJ_DISK * GB * eff)
        compute = FULL_LAYERS * s["block_compute"] + s["head_compute"]
        cpu_pass = max(io, compute) * s["overlap"]
        hidden = streamed / (PROJ_DISK * GB)
        if n == 1:  # plain decoding: one token per pass
            per_token = lambda t: [f"{t:,.1f} (plain, 1 token/pass)"] + [""] * (len(PUBLISHED) - 1)  # noqa: E731
        else:
            per_token = lambda t: [f"{t / k:,.1f}" for _, k, _ in PUBLISHED]  # noqa: E731
        lines.append(f"| {n} | {streamed / GB:,.0f} ({resident} blocks resident) | {cpu_pass:,.1f} s "
                     f"({'disk' if io >= compute else 'compute'}) | " + " | ".join(per_token(cpu_pass))
                     + f" | {hidden:,.1f} s | " + " | ".join(per_token(hidden)) + " |")
    lines += ["", "The 1-position row is plain decoding (1 token per pass). Used from this run: read efficiency "
              f"{min(1.0, (one['read_rate'] or disk) / disk):.2f} of the disk (1-position pass), per-T block/head compute and "
              "overlap factors " + ", ".join(f"T={n}: {s['overlap']:.2f}" for n, s in sums.items()) + ".",
              "Tokens per pass are assumptions from published results, not measurements (random weights accept nothing); "
              "the published rates come from draft trees of 128 to thousands of tokens, so a 16-position tree "
              "(at most depth + 1 tokens per pass) should be read against the lowest of them at best:"]
    lines += [f"- {k:g}: {what} ({src})" for what, k, src in PUBLISHED]
    return "\n".join(lines)
