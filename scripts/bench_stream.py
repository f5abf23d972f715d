#!/usr/bin/env python3
"""Streaming at the link's speed (issue 24, item 3): page-cache reads and host->device copies.

    .venv/bin/python scripts/bench_stream.py [--size-mb 512] [--repeats 5] [--record]
    .venv/bin/python scripts/bench_stream.py --device cuda --pack BF16_PACK --pack NF4_PACK [--max-memory 3GB]

(a) Page-cache read bandwidth of one unit-sized file: one thread (fileio.read_fully, one positional
    read loop: what the streamer did before) against the parallel chunked reader
    (fileio.read_parallel) at several thread counts, READ_THREADS being the default. The file is
    written, then read once so that it is in the page cache; each row is the best of --repeats
    reads into a buffer faulted in beforehand (pinned on CUDA, as the streamer's slots are), rows
    interleaved. With --pack, the file is the pack's largest streamed unit instead.
(b) CUDA only: pinned host -> device bandwidth, a plain torch copy of --probe-mb (the link's
    practical ceiling), and pageable -> device for reference.
(c) CUDA only: each --pack streamed at a small GPU budget (--max-memory): after a warm-up generation
    (which also puts the pack in the page cache), --tokens greedy tokens; streamed GB/s = bytes
    copied host -> device / wall time of that generation, and as a fraction of (b) (the issue's
    target: >= 70% when the pack is in the page cache), with the copy engine's own GB/s (bytes /
    copy-stream busy time, CUDA events) and the share of copy time hidden under compute.
Prints a markdown table; --record writes it into BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import machine, record  # noqa: E402

MARK_START, MARK_END = "<!-- bench_stream:start -->", "<!-- bench_stream:end -->"


def _buffer(n: int, pinned: bool):
    import torch

    buf = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
    buf.fill_(0)  # fault the pages in: the rows time reading, not the first touch of fresh memory
    return buf


def read_rows(path: str, offset: int, n: int, repeats: int, pinned: bool) -> list[tuple[str, int, float]]:
    """(reader, threads, best GB/s) for one thread and the parallel reader at 2, 4, READ_THREADS, 16 threads."""
    from layerpack_runtime import fileio

    default = fileio.READ_THREADS
    counts = sorted({2, 4, default, 16})
    configs = [("one read loop (fileio.read_fully)", 1)] + [
        ("parallel chunks (fileio.read_parallel)" + (" [default]" if t == default else ""), t) for t in counts]
    view = memoryview(_buffer(n, pinned).numpy())
    fd = os.open(path, os.O_RDONLY)
    best = {c: 0.0 for c in configs}
    try:
        assert fileio.read_fully(fd, view, offset) == n  # into the page cache (and the buffer faulted in)
        for _ in range(repeats):
            for label, threads in configs:
                fileio.READ_THREADS, fileio._pool = threads, None  # a pool of this many threads, made at first use
                t0 = time.perf_counter()
                got = fileio.read_fully(fd, view, offset) if threads == 1 else fileio.read_parallel(fd, view, offset)
                dt = time.perf_counter() - t0
                assert got == n
                best[(label, threads)] = max(best[(label, threads)], n / dt / 1e9)
    finally:
        os.close(fd)
        fileio.READ_THREADS, fileio._pool = default, None
    return [(label, t, best[(label, t)]) for label, t in configs]


def h2d_probe(mb: int, repeats: int) -> tuple[float, float]:
    """(pinned, pageable) host -> device GB/s: best of `repeats` copies of `mb` MiB, timed with CUDA events."""
    import torch

    n = mb << 20
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = []
    for pinned in (True, False):
        host = _buffer(n, pinned)
        best = 0.0
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dev.copy_(host, non_blocking=pinned)
            b.record()
            b.synchronize()
            best = max(best, n / (a.elapsed_time(b) / 1e3) / 1e9)
        out.append(best)
    return out[0], out[1]


def stream_row(pack: str, budget: str, tokens: int) -> dict:
    from layerpack_runtime import load

    m = load(pack, device="cuda", max_memory=budget, context=tokens + 8)
    if m.streamer is None:
        raise SystemExit(f"error: {pack} fits in {budget}: nothing streams; give a smaller --max-memory")
    m.generate_ids([1, 2, 3], max_new_tokens=2)  # warm-up: kernels, and every streamed unit read once (page cache)
    m.streamer.reset_stats()
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    m.generate_ids([1, 2, 3], max_new_tokens=tokens)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    s = m.stream_stats()
    row = dict(pack=os.path.basename(os.path.normpath(pack)), scheme=m.manifest.quantization.scheme, plan=m.plan.describe(),
               depth=m.prefetch_depth, streamed=len(m.streamer.order), bytes=s.h2d_bytes, wall=wall,
               tokens_per_s=tokens / wall, streamed_gbps=s.h2d_bytes / wall / 1e9, copy_gbps=s.h2d_gbps,
               overlap=s.overlap, read_gbps=s.read_gbps, wait_s=s.wait_s)
    m.close()
    return row


def largest_unit(pack: str) -> tuple[str, int, int]:
    from layerpack_runtime.pack import Pack

    p = Pack(pack)
    st = max((p.layer_file(l) for l in p.manifest.layers if l.name.startswith("block.")),
             key=lambda f: f.file_size - f.data_start)
    return str(st.path), st.data_start, st.file_size - st.data_start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--pack", action="append", default=[], help="a pack to stream (CUDA), repeatable; its largest block is (a)'s file")
    ap.add_argument("--max-memory", default="3GB", help="GPU budget for (c), small enough that blocks stream")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--size-mb", type=int, default=512, help="(a)'s file size without --pack")
    ap.add_argument("--probe-mb", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    import torch

    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available here")
    load0 = os.getloadavg()
    lines = [f"Machine: {machine()}" + (f"; GPU: {torch.cuda.get_device_name()}" if cuda else ""),
             f"Command: `{' '.join(['scripts/bench_stream.py', *sys.argv[1:]])}`", ""]
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        if a.pack:
            path, offset, n = largest_unit(a.pack[0])
            what = f"{os.path.basename(path)} of {os.path.basename(os.path.normpath(a.pack[0]))} ({n / 1e6:.0f} MB)"
        else:
            path, offset, n = os.path.join(tmp, "unit"), 0, a.size_mb << 20
            with open(path, "wb") as f:
                for _ in range(a.size_mb):
                    f.write(os.urandom(1 << 20))
            what = f"a {n / 1e6:.0f} MB file"
        rows = read_rows(path, offset, n, a.repeats, pinned=cuda)
    single = rows[0][2]
    lines += [f"(a) page-cache reads of {what} into a {'pinned' if cuda else 'pageable'} buffer, best of {a.repeats}:", "",
              "| reader | threads | GB/s | x one loop |", "|---|--:|--:|--:|"]
    lines += [f"| {label} | {t} | {g:.2f} | {g / single:.2f} |" for label, t, g in rows]
    if cuda:
        pinned, pageable = h2d_probe(a.probe_mb, a.repeats)
        lines += ["", f"(b) host -> device, {a.probe_mb} MiB copies, best of {a.repeats}: pinned **{pinned:.1f} GB/s**, "
                      f"pageable {pageable:.1f} GB/s", ""]
        lines += [f"(c) streamed at --max-memory {a.max_memory}, {a.tokens} greedy tokens after a warm-up (pack in the page cache):", "",
                  "| pack | scheme | streamed units | depth | tokens/s | streamed GB/s | of pinned (b) | copy engine GB/s | copy hidden under compute | read GB/s | compute waited s |",
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for p in a.pack:
            r = stream_row(p, a.max_memory, a.tokens)
            lines.append(f"| {r['pack']} | {r['scheme']} | {r['streamed']} | {r['depth']} | {r['tokens_per_s']:.2f} | "
                         f"{r['streamed_gbps']:.1f} | **{r['streamed_gbps'] / pinned:.0%}** | {r['copy_gbps']:.1f} | "
                         f"{r['overlap']:.0%} | {r['read_gbps']:.1f} | {r['wait_s']:.2f} |")
            lines.append(f"<!-- plan {r['pack']}: {r['plan']} -->")
        if not a.pack:
            lines.append("(no --pack given: nothing streamed)")
    load1 = os.getloadavg()
    lines += ["", f"Load average (1 min) before / after: {load0[0]:.2f} / {load1[0]:.2f}"]
    report = "\n".join(lines)
    print(report)
    if a.record:
        record(f"### Streaming: page-cache reads{' and host->device copies' if cuda else ''} (scripts/bench_stream.py, "
               f"{time.strftime('%Y-%m-%d')})\n\n{report}", MARK_START, MARK_END)


if __name__ == "__main__":
    main()
