#!/usr/bin/env python3
"""Quantized linear kernels against dense bf16 `F.linear`, side by side in one run.

    .venv/bin/python scripts/bench_kernels.py [--shapes smollm2,llama3-8b,llama3-405b] [--threads N] [--record]
        [--baseline OLD_qmatvec.c]

For each weight shape (SmolLM2-135M's, Llama-3-8B's MLP, Llama-3.1-405B's MLP) and each form -
NF4, NF4 with 1% outliers, int8 (all in the pack's layouts, random codes), the old pure-torch NF4
path (dequantize, then F.linear) and the dense bf16 weight - the time of `QuantWeight.linear` for
1 activation row (decode), 4 and 16 rows (small batches: each tile of up to 8 rows decodes the
weights once) and 128 rows (prefill: dequantize once, then one GEMM). Reported: best-of-N time, stored
bytes per second (codes + absmax + outlier tables), and time per parameter against bf16 F.linear
of the same shape and rows in the same run (>1: the quantized form is faster). Forms are timed
interleaved, so a busy machine slows them alike. Random data; the kernels' speed does not
depend on the values. At 1 row the dense bf16 weight is also timed through the runtime's native
bf16 GEMV (kernels.bf16_matvec; used by the runtime with LAYERPACK_BF16_GEMV=1).

On CUDA (--device cuda): 1..8 rows of int8 and NF4 run the Triton GEMV (kernels/triton_gemv.py)
when triton is installed; beside them at 1 row bitsandbytes' fused 4-bit GEMV, and at <= 8 rows the
path int8 took on CUDA before (dequantize, then F.linear). The device's limit: a device-to-device
copy of 1 GiB (best of 10, CUDA events), counted as bytes read + written per second; every row's
GB/s is also given as a fraction of it. GPU times are kernel times from CUDA events: the Triton
GEMV and dense F.linear are captured in a CUDA graph (as a decode step is), so Python's launch
cost is not counted; paths that cannot be captured (bitsandbytes builds its code table on every
call; dequantize + GEMM slices outlier tables on the host) are timed eagerly, back to back, and
marked [eager]. Each form cycles through enough copies of its weight to exceed 4x the L2 cache
(at most 256), so small weights are read from device memory, not L2.

Before/after (--baseline FILE, CPU): another qmatvec.c (e.g. main's: `git show
main:runtime/layerpack_runtime/kernels/qmatvec.c > /tmp/qmatvec-main.c`) is built beside the current
one, and at 1..32 rows the native forms (nf4, nf4 + 1% outliers, int8, the dense native GEMV) are
also timed through it, interleaved in the same rounds, the same Python path (QuantWeight.linear with
the library swapped), rows marked [baseline]; a summary gives current/baseline speed per row.

The CPU's limit: a STREAM-like read bandwidth (kernels.read_bandwidth: XOR of every line of a
512 MiB buffer, best of 5) at 1 and 2 threads, measured before and after the kernels (the best of
the two counts); every row's GB/s is also given as a fraction of it at the thread count in use.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import machine, record  # noqa: E402

from layerpack_runtime import kernels  # noqa: E402
from layerpack_runtime.qweight import QuantWeight  # noqa: E402
from layerpack_runtime.format import DEFAULT_BLOCK_SIZE  # noqa: E402
from layerpack_runtime.quant import quantize_blocks_for_probe  # noqa: E402

MARK_START, MARK_END = "<!-- bench_kernels:start -->", "<!-- bench_kernels:end -->"
SHAPES = {
    "smollm2": [(1536, 576), (576, 1536), (49152, 576)],
    "llama3-8b": [(14336, 4096), (4096, 14336)],
    "llama3-405b": [(53248, 16384), (16384, 53248)],
}
BLOCK = {"nf4": DEFAULT_BLOCK_SIZE["nf4"], "int8": DEFAULT_BLOCK_SIZE["int8"]}  # the converter's defaults


DEVICE = torch.device("cpu")
BASELINE = None  # (--baseline) the other kernel library, timed beside the current one


def load_baseline(source: str):
    """Build and load another qmatvec.c alone (its own cache key: the key includes the sources; the
    decode block is left out, the GEMVs are what is compared)."""
    saved = kernels.SOURCE, kernels.SOURCES
    kernels.SOURCE = os.path.abspath(source)
    kernels.SOURCES = (kernels.SOURCE,)
    try:
        path = kernels._build(os.environ.get("LAYERPACK_KERNEL_FLAGS") or kernels.DEFAULT_FLAGS)
    finally:
        kernels.SOURCE, kernels.SOURCES = saved
    if path == kernels._build(os.environ.get("LAYERPACK_KERNEL_FLAGS") or kernels.DEFAULT_FLAGS):
        raise RuntimeError("it builds the very library in use")  # never compare a build with itself
    return kernels._load(path)


def with_library(lib, fn):
    """fn run with kernels.native() answering `lib`: the same Python path, another kernel."""
    def call():
        saved = kernels._state.get("lib")
        kernels._state["lib"] = lib
        try:
            return fn()
        finally:
            kernels._state["lib"] = saved
    return call


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make(scheme: str, shape, outliers: float) -> QuantWeight:
    n = shape[0] * shape[1]
    codes, absmax = quantize_blocks_for_probe(scheme, n, BLOCK[scheme])
    if scheme == "int8":
        codes = codes.view(shape)
    idx = val = None
    if outliers:
        k = int(n * outliers)
        idx = torch.linspace(0, n - 1, k, dtype=torch.float64).long().unique()
        idx = idx.to(torch.int32 if n < 2**31 else torch.int64)
        val = torch.randn(idx.numel()).to(torch.bfloat16)
    return QuantWeight(scheme, shape, BLOCK[scheme], codes, absmax, idx, val, torch.bfloat16).to(DEVICE)


def make_outliers(q: QuantWeight, fraction: float) -> QuantWeight:
    """q's codes and scales with an outlier table of `fraction` of its entries, spread evenly."""
    n = q.numel
    idx = torch.linspace(0, n - 1, int(n * fraction), dtype=torch.float64).long().unique()
    idx = idx.to(torch.int32 if n < 2**31 else torch.int64)
    val = torch.randn(idx.numel()).to(torch.bfloat16)
    return QuantWeight(q.scheme, q.shape, q.block_size, q.codes, q.absmax, idx.to(DEVICE), val.to(DEVICE), q.dtype)


def best_of(fns: dict, repeats: int) -> dict:
    """Interleaved timing: every round runs every function once; the best round of each counts."""
    best = {k: float("inf") for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r:  # round 0 warms up
                best[k] = min(best[k], time.perf_counter() - t0)
    return best


def bench_shape(shape, rows_list, repeats: int, old_path: bool) -> list[dict]:
    if DEVICE.type == "cuda":
        return bench_shape_cuda(shape, rows_list, repeats)
    out_f, in_f = shape
    n = out_f * in_f
    forms = {"nf4": make("nf4", shape, 0.0), "nf4 + 1% outliers": make("nf4", shape, 0.01), "int8": make("int8", shape, 0.0)}
    dense = torch.randn(shape, dtype=torch.bfloat16, device=DEVICE)
    results = []
    for rows in rows_list:
        x = torch.randn(rows, in_f, dtype=torch.bfloat16, device=DEVICE)
        fns = {name: (lambda q=q: q.linear(x)) for name, q in forms.items()}
        fns["dense bf16 F.linear"] = lambda: F.linear(x, dense)
        if rows == 1 and DEVICE.type == "cpu" and kernels.native() is not None:
            fns["dense bf16, native GEMV"] = lambda: kernels.bf16_matvec(kernels.native(), dense, x)  # LAYERPACK_BF16_GEMV=1
        if BASELINE is not None and rows <= 32:
            for name in ("nf4", "nf4 + 1% outliers", "int8", "dense bf16, native GEMV"):
                if name in fns:
                    fns[f"{name} [baseline]"] = with_library(BASELINE, fns[name]) if name in forms else \
                        (lambda: kernels.bf16_matvec(BASELINE, dense, x))
        if old_path:
            from layerpack_runtime.quant import dequantize_nf4

            q = forms["nf4"]
            fns["nf4, old path (torch dequantize + F.linear)"] = lambda q=q: F.linear(x, dequantize_nf4(q.codes, q.absmax, shape, 64, torch.bfloat16))
        reps = repeats if n * rows < 2e10 else max(2, repeats // 3)
        times = best_of(fns, reps)
        for name, t in times.items():
            base = name.removesuffix(" [baseline]")
            nbytes = forms[base].nbytes if base in forms else (forms["nf4"].nbytes if "old path" in name else n * 2)

            results.append({"shape": shape, "rows": rows, "form": name, "s": t, "gbps": nbytes / t / 1e9,
                            "vs_dense": times["dense bf16 F.linear"] / t})
    del forms, dense
    return results


def cuda_copies(nbytes: int) -> int:
    """How many copies of a weight of nbytes a timed pass cycles through: 4x the L2 cache, 1..256."""
    l2 = getattr(torch.cuda.get_device_properties(DEVICE), "L2_cache_size", 64 << 20) or (64 << 20)
    return max(1, min(256, -(-4 * l2 // max(1, nbytes))))


def time_cuda(fns: dict, repeats: int, graphed: set) -> dict:
    """Seconds per call of each entry of fns (name -> list of zero-argument calls, one per weight
    copy), from CUDA events; interleaved rounds, best round counts. Names in `graphed` are timed as
    replays of a CUDA graph of all their calls (a name whose capture fails is dropped from `graphed`
    and timed eagerly, back to back, like the others)."""
    graphs = {}
    side = torch.cuda.Stream()
    for name, calls in fns.items():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for c in calls:
                c()  # compile, build tables, warm the allocator: never inside a capture
        torch.cuda.current_stream().wait_stream(side)
        if name in graphed:
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for c in calls:
                        c()
                graphs[name] = g
            except Exception as e:  # noqa: BLE001 - reported, then timed eagerly (marked [eager])
                print(f"note: {name}: CUDA graph capture failed ({type(e).__name__}: {e}); timed eagerly", file=sys.stderr)
                graphed.discard(name)
                torch.cuda.synchronize()
    best = {k: float("inf") for k in fns}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for r in range(repeats + 1):
        for name, calls in fns.items():
            torch.cuda.synchronize()
            start.record()
            if name in graphs:
                graphs[name].replay()
            else:
                for c in calls:
                    c()
            end.record()
            end.synchronize()
            if r:  # round 0 warms up
                best[name] = min(best[name], start.elapsed_time(end) / 1e3 / len(calls))
    del graphs
    return best


def bench_shape_cuda(shape, rows_list, repeats: int) -> list[dict]:
    """The CUDA table's rows for one shape: the stored forms through QuantWeight.linear (the Triton
    GEMV at <= GEMV_MAX_ROWS rows when triton is installed, else dequantize + GEMM; bitsandbytes at
    1 row of NF4 without triton), bitsandbytes' GEMV and int8's old dequantize + F.linear beside
    them, and dense bf16 through F.linear. (A dense Triton GEMV was measured here on an H200, 2026-12-04:
    2852-3041 GB/s against F.linear's 3140-3391 inside a CUDA graph, so plain weights keep F.linear.)"""
    from layerpack_runtime.kernels import triton_gemv
    from layerpack_runtime.qweight import GEMV_MAX_ROWS

    out_f, in_f = shape
    n = out_f * in_f
    specs = {"nf4": ("nf4", 0.0), "nf4 + 1% outliers": ("nf4", 0.01), "int8": ("int8", 0.0), "int8 + 1% outliers": ("int8", 0.01)}
    forms = {}
    for name, (scheme, outliers) in specs.items():
        # the outlier forms reuse the plain form's random codes (drawing 405B-sized ones takes seconds)
        q = make(scheme, shape, 0.0) if not outliers else make_outliers(forms[scheme][0], outliers)
        forms[name] = [q] + [QuantWeight(q.scheme, q.shape, q.block_size, q.codes.clone(), q.absmax.clone(),
                                         q.outlier_idx, q.outlier_val, q.dtype) for _ in range(cuda_copies(q.nbytes) - 1)]
    dense = [torch.randn(shape, dtype=torch.bfloat16, device=DEVICE) for _ in range(cuda_copies(n * 2))]
    triton_ok = triton_gemv.usable_on(DEVICE)
    results = []
    for rows in rows_list:
        x = torch.randn(rows, in_f, dtype=torch.bfloat16, device=DEVICE)
        gemv = rows <= GEMV_MAX_ROWS and triton_ok
        label = "Triton GEMV" if gemv else "dequantize + GEMM"
        fns, nbytes, graphed, triton_rows = {}, {}, set(), {}
        for name, qs in forms.items():
            key = f"{name} ({label})"
            # the Triton rows call it directly (QuantWeight.linear sends one NF4 row to bitsandbytes first)
            fns[key] = [lambda q=q: q._linear_triton(x) for q in qs] if gemv else [lambda q=q: q.linear(x) for q in qs]
            nbytes[key] = qs[0].nbytes
            if gemv:
                graphed.add(key)
                triton_rows[key] = name
        if rows == 1:
            qs = forms["nf4"]
            fns["nf4 (bitsandbytes GEMV)"] = [lambda q=q: q._linear_bnb(x) for q in qs]
            nbytes["nf4 (bitsandbytes GEMV)"] = qs[0].nbytes
            if fns["nf4 (bitsandbytes GEMV)"][0]() is None:  # bitsandbytes is not installed
                del fns["nf4 (bitsandbytes GEMV)"], nbytes["nf4 (bitsandbytes GEMV)"]
        if rows <= GEMV_MAX_ROWS:
            qs = forms["int8"]
            fns["int8 (dequantize + F.linear: the old CUDA path)"] = [lambda q=q: F.linear(x, q.dequantize()) for q in qs]
            nbytes["int8 (dequantize + F.linear: the old CUDA path)"] = qs[0].nbytes
        fns["dense bf16 F.linear"] = [lambda w=w: F.linear(x, w) for w in dense]
        nbytes["dense bf16 F.linear"] = n * 2
        graphed.add("dense bf16 F.linear")
        times = time_cuda(fns, repeats, graphed)
        t_dense = times["dense bf16 F.linear"]
        for key, t in times.items():
            results.append({"shape": shape, "rows": rows, "form": key if key in graphed else f"{key} [eager]",
                            "base": triton_rows.get(key, key),  # the decode summary finds the Triton rows by their form
                            "s": t, "gbps": nbytes[key] / t / 1e9, "vs_dense": t_dense / t})
    del forms, dense
    torch.cuda.empty_cache()
    return results


def device_copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy of nbytes (best of `repeats`)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats + 1):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / best


def stream_bandwidth() -> dict[int, float]:
    """bytes/s read at 1 and 2 threads (empty without the native library)."""
    lib = kernels.native()
    if lib is None or DEVICE.type != "cpu":
        return {}
    return {t: kernels.read_bandwidth(lib, threads=t) for t in (1, 2)}


def render(args, results, load_avg, stream=None) -> str:
    stream = stream or {}
    threads = torch.get_num_threads()
    ref = stream.get(threads) or (max(stream.values()) if stream else None)
    if DEVICE.type == "cuda":
        return render_cuda(args, results, load_avg, stream.get("copy"))
    lines = [
        f"## Quantized linear kernels vs dense bf16 ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Machine: {machine()}{'; GPU ' + torch.cuda.get_device_name() if DEVICE.type == 'cuda' else ''}; device {DEVICE.type}; CPU kernels: {kernels.isa()}; load average at start {load_avg[0]:.2f}, at end {os.getloadavg()[0]:.2f}.",
        f"- Command: `.venv/bin/python scripts/bench_kernels.py --shapes {args.shapes} --device {DEVICE.type} --threads {torch.get_num_threads()}"
        f"{' --rows ' + args.rows if args.rows != '1,4,16,128' else ''}{' --no-old-path' if args.no_old_path else ''}"
        f"{' --baseline ' + args.baseline if args.baseline else ''}{' --record' if args.record else ''}` (best of {args.repeats} interleaved rounds; "
        f"random codes in the pack layouts; blocks: NF4 {BLOCK['nf4']}, int8 {BLOCK['int8']}).",
        "- GB/s = stored bytes (codes + absmax + outlier tables; bf16 for the dense row) per second. "
        "\"per-param speed vs dense\" = dense bf16 time / this time for the same shape and rows (>= 1: no worse than dense).",
        "- Rows 1 = decode; 4 and 16 = small batches (native kernel, weights decoded once per tile of up to 8 rows); 128 = prefill "
        "(dequantize in row chunks of 2M weights into one reused buffer, then GEMM per chunk: memory stays bounded).",
        "",
        (f"- STREAM-like read bandwidth (`kernels.read_bandwidth`, 512 MiB, best of 5, before and after): "
         + ", ".join(f"{t} thread{'s' if t > 1 else ''} {b / 1e9:.1f} GB/s" for t, b in sorted(stream.items()))
         + f"; \"of STREAM\" = a row's GB/s / the figure at {threads} thread{'s' if threads > 1 else ''}. Weights that fit "
         "the 32 MiB L3 can read faster than memory (> 100%).") if stream else "- STREAM-like bandwidth: not measured (no native library).",
        "",
        "| weight (out x in) | rows | form | time ms | GB/s stored | of STREAM | per-param speed vs dense |",
        "|---|--:|---|--:|--:|--:|--:|",
    ]
    for r in results:
        frac = f"{r['gbps'] * 1e9 / ref:.0%}" if ref else "-"
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['rows']} | {r['form']} | {r['s'] * 1e3:.3f} | {r['gbps']:.2f} | {frac} | {r['vs_dense']:.2f}x |")
    lines += baseline_summary(args, results, ref)
    dec = [r for r in results if r["rows"] == 1 and r["form"] in ("nf4", "nf4 + 1% outliers", "int8")]
    if dec:
        worst_gbps = min(dec, key=lambda r: r["gbps"])
        worst_ratio = min(dec, key=lambda r: r["vs_dense"])
        lines += ["", f"Decode (1 row): lowest stored-byte rate {worst_gbps['gbps']:.2f} GB/s ({worst_gbps['form']}, "
                      f"{worst_gbps['shape'][0]}x{worst_gbps['shape'][1]}; target >= 4); lowest per-param speed vs dense bf16 "
                      f"{worst_ratio['vs_dense']:.2f}x ({worst_ratio['form']}, {worst_ratio['shape'][0]}x{worst_ratio['shape'][1]}; target >= 1)."]
    return "\n".join(lines)


def baseline_summary(args, results, ref) -> list[str]:
    """current vs --baseline, per weight shape, rows and form (speed ratio > 1: the current kernel is faster)."""
    old = {(r["shape"], r["rows"], r["form"].removesuffix(" [baseline]")): r for r in results if r["form"].endswith(" [baseline]")}
    if not old:
        return []
    lines = ["", f"Before/after: the current qmatvec.c against `--baseline {args.baseline}` in the same rounds "
                 "(speed = baseline time / current time).", "",
             "| weight (out x in) | rows | form | baseline GB/s (of STREAM) | current GB/s (of STREAM) | speed |", "|---|--:|---|--:|--:|--:|"]
    pct = (lambda g: f" ({g * 1e9 / ref:.0%})") if ref else (lambda g: "")
    for r in results:
        b = old.get((r["shape"], r["rows"], r["form"]))
        if b:
            lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['rows']} | {r['form']} | {b['gbps']:.2f}{pct(b['gbps'])} | "
                         f"{r['gbps']:.2f}{pct(r['gbps'])} | {b['s'] / r['s']:.2f}x |")
    return lines


def render_cuda(args, results, load_avg, copy_bw) -> str:
    from layerpack_runtime.kernels import triton_gemv

    props = torch.cuda.get_device_properties(DEVICE)
    lines = [
        f"## Quantized linear kernels vs dense bf16 on CUDA ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Machine: {machine()}; GPU {props.name} ({props.multi_processor_count} SMs, L2 {getattr(props, 'L2_cache_size', 0) >> 20} MiB); "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}; triton {_version('triton')}, bitsandbytes {_version('bitsandbytes')}; "
        f"Triton GEMV {'in use' if triton_gemv.usable_on(DEVICE) else 'unavailable'}; load average at start {load_avg[0]:.2f}, at end {os.getloadavg()[0]:.2f}.",
        f"- Command: `.venv/bin/python scripts/bench_kernels.py --shapes {args.shapes} --device cuda --rows {args.rows} --repeats {args.repeats}"
        f"{' --record' if args.record else ''}` (best of {args.repeats} interleaved rounds; random codes in the pack layouts).",
        "- Kernel time from CUDA events; graph-captured unless marked [eager] (then Python's launch cost is in it); each form cycles "
        "through copies of its weight worth >= 4x L2 (at most 256), so the bytes come from device memory.",
        "- GB/s = stored bytes (codes + absmax + outlier tables; bf16 for dense) per second. \"of copy\" = that / the device-to-device "
        "copy rate (bytes read + written per second"
        + (f", 1 GiB, best of 10: {copy_bw / 1e9:.0f} GB/s)." if copy_bw else ": not measured)."),
        "",
        "| weight (out x in) | rows | form | time ms | GB/s stored | of copy | per-param speed vs dense |",
        "|---|--:|---|--:|--:|--:|--:|",
    ]
    for r in results:
        frac = f"{r['gbps'] * 1e9 / copy_bw:.0%}" if copy_bw else "-"
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['rows']} | {r['form']} | {r['s'] * 1e3:.4f} | {r['gbps']:.1f} | {frac} | {r['vs_dense']:.2f}x |")
    dec = [r for r in results if r["rows"] == 1 and r["base"] in ("nf4", "int8")]
    if dec and copy_bw:
        worst = min(dec, key=lambda r: r["gbps"])
        lines += ["", f"Decode (1 row, Triton GEMV): lowest stored-byte rate {worst['gbps']:.0f} GB/s = {worst['gbps'] * 1e9 / copy_bw:.0%} of the "
                      f"copy rate ({worst['form']}, {worst['shape'][0]}x{worst['shape'][1]}; target >= 50%)."]
    elif not dec:
        lines += ["", "Decode: no Triton GEMV rows (triton is not installed): the stored forms ran dequantize + GEMM or bitsandbytes."]
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - not installed
        return "not installed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2,llama3-8b,llama3-405b")
    ap.add_argument("--rows", default="1,4,16,128")
    ap.add_argument("--threads", type=int, default=None, help="torch/kernel threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bitsandbytes' fused GEMV at 1 row when installed)")
    ap.add_argument("--no-old-path", action="store_true", help="skip the slow pure-torch NF4 row")
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    ap.add_argument("--baseline", default=None, help="another qmatvec.c timed beside the current one at 1..32 rows (CPU)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    global DEVICE, BASELINE
    DEVICE = torch.device(a.device)
    if a.baseline:
        if DEVICE.type != "cpu" or kernels.native() is None:
            sys.exit("error: --baseline needs the CPU and the native kernels")
        if not os.path.isfile(a.baseline):
            sys.exit(f"error: --baseline {a.baseline}: no such file")
        try:
            BASELINE = load_baseline(a.baseline)
        except Exception as e:  # noqa: BLE001 - a source that does not build or load: one line
            sys.exit(f"error: --baseline {a.baseline}: {e}")
    if kernels.native() is None:
        print("note: native kernels unavailable: the quantized rows measure the pure-torch fallback", file=sys.stderr)
    load_avg = os.getloadavg()
    stream = stream_bandwidth() if DEVICE.type == "cpu" else {"copy": device_copy_bandwidth()}
    rows_list = [int(r) for r in a.rows.split(",")]
    results = []
    for group in a.shapes.split(","):
        for shape in SHAPES[group]:
            print(f"... {shape[0]}x{shape[1]}", file=sys.stderr, flush=True)
            results += bench_shape(shape, rows_list, a.repeats, not a.no_old_path and group != "llama3-405b" and DEVICE.type == "cpu")
    after = stream_bandwidth() if DEVICE.type == "cpu" else {"copy": device_copy_bandwidth()}
    stream = {t: max(b, after.get(t, 0.0)) for t, b in stream.items()}
    report = render(a, results, load_avg, stream)
    print(report)
    if a.record:
        if DEVICE.type == "cuda":
            record(report, "<!-- bench_kernels_cuda:start -->", "<!-- bench_kernels_cuda:end -->")
        else:
            record(report, MARK_START, MARK_END)


if __name__ == "__main__":
    main()
