#!/usr/bin/env python3
"""Quantized linear kernels against dense bf16 `F.linear`, side by side in one run.

    .venv/bin/python scripts/bench_kernels.py [--shapes smollm2,llama3-8b,llama3-405b] [--threads N] [--record]

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

The machine's limit: a STREAM-like read bandwidth (kernels.read_bandwidth: XOR of every line of a
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
from layerpack_runtime.kernels import triton_dense  # noqa: E402
from layerpack_runtime.qweight import QuantWeight  # noqa: E402
from layerpack_runtime.quant import quantize_blocks_for_probe  # noqa: E402

MARK_START, MARK_END = "<!-- bench_kernels:start -->", "<!-- bench_kernels:end -->"
SHAPES = {
    "smollm2": [(1536, 576), (576, 1536), (49152, 576)],
    "llama3-8b": [(14336, 4096), (4096, 14336)],
    "llama3-405b": [(53248, 16384), (16384, 53248)],
}
BLOCK = {"nf4": 64, "int8": 128}


DEVICE = torch.device("cpu")


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
    out_f, in_f = shape
    n = out_f * in_f
    forms = {"nf4": make("nf4", shape, 0.0), "nf4 + 1% outliers": make("nf4", shape, 0.01), "int8": make("int8", shape, 0.0)}
    dense = torch.randn(shape, dtype=torch.bfloat16, device=DEVICE)
    results = []
    for rows in rows_list:
        x = torch.randn(rows, in_f, dtype=torch.bfloat16, device=DEVICE)
        fns = {name: (lambda q=q: q.linear(x)) for name, q in forms.items()}
        fns["dense bf16 F.linear"] = lambda: F.linear(x, dense)
        if DEVICE.type == "cuda" and triton_dense.usable(x, dense):
            fns["dense bf16, triton GEMV"] = lambda: triton_dense.gemv(x, dense)  # what qweight.linear uses at decode
        if rows == 1 and DEVICE.type == "cpu" and kernels.native() is not None:
            fns["dense bf16, native GEMV"] = lambda: kernels.bf16_matvec(kernels.native(), dense, x)  # LAYERPACK_BF16_GEMV=1
        if old_path:
            from layerpack_runtime.quant import dequantize_nf4

            q = forms["nf4"]
            fns["nf4, old path (torch dequantize + F.linear)"] = lambda q=q: F.linear(x, dequantize_nf4(q.codes, q.absmax, shape, 64, torch.bfloat16))
        reps = repeats if n * rows < 2e10 else max(2, repeats // 3)
        times = best_of(fns, reps)
        for name, t in times.items():
            nbytes = forms[name].nbytes if name in forms else (forms["nf4"].nbytes if "old path" in name else n * 2)

            results.append({"shape": shape, "rows": rows, "form": name, "s": t, "gbps": nbytes / t / 1e9,
                            "vs_dense": times["dense bf16 F.linear"] / t})
    del forms, dense
    return results


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
    lines = [
        f"## Quantized linear kernels vs dense bf16 ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Machine: {machine()}{'; GPU ' + torch.cuda.get_device_name() if DEVICE.type == 'cuda' else ''}; device {DEVICE.type}; CPU kernels: {kernels.isa()}; load average at start {load_avg[0]:.2f}, at end {os.getloadavg()[0]:.2f}.",
        f"- Command: `.venv/bin/python scripts/bench_kernels.py --shapes {args.shapes} --device {DEVICE.type} --threads {torch.get_num_threads()}"
        f"{' --record' if args.record else ''}` (best of {args.repeats} interleaved rounds; random codes in the pack layouts).",
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
    dec = [r for r in results if r["rows"] == 1 and r["form"] in ("nf4", "nf4 + 1% outliers", "int8")]
    if dec:
        worst_gbps = min(dec, key=lambda r: r["gbps"])
        worst_ratio = min(dec, key=lambda r: r["vs_dense"])
        lines += ["", f"Decode (1 row): lowest stored-byte rate {worst_gbps['gbps']:.2f} GB/s ({worst_gbps['form']}, "
                      f"{worst_gbps['shape'][0]}x{worst_gbps['shape'][1]}; target >= 4); lowest per-param speed vs dense bf16 "
                      f"{worst_ratio['vs_dense']:.2f}x ({worst_ratio['form']}, {worst_ratio['shape'][0]}x{worst_ratio['shape'][1]}; target >= 1)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2,llama3-8b,llama3-405b")
    ap.add_argument("--rows", default="1,4,16,128")
    ap.add_argument("--threads", type=int, default=None, help="torch/kernel threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bitsandbytes' fused GEMV at 1 row when installed)")
    ap.add_argument("--no-old-path", action="store_true", help="skip the slow pure-torch NF4 row")
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    global DEVICE
    DEVICE = torch.device(a.device)
    if kernels.native() is None:
        print("note: native kernels unavailable: the quantized rows measure the pure-torch fallback", file=sys.stderr)
    load_avg = os.getloadavg()
    stream = stream_bandwidth()
    rows_list = [int(r) for r in a.rows.split(",")]
    results = []
    for group in a.shapes.split(","):
        for shape in SHAPES[group]:
            print(f"... {shape[0]}x{shape[1]}", file=sys.stderr, flush=True)
            results += bench_shape(shape, rows_list, a.repeats, not a.no_old_path and group != "llama3-405b" and DEVICE.type == "cpu")
    after = stream_bandwidth()
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
