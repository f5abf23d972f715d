#!/usr/bin/env python3
"""Which outlier entries are worth their 48 bits? Compares the selection rules of
layerpack.quantizer (OUTLIER_RULES) on SmolLM2-135M-Instruct by what matters - perplexity, KL and
top-1 agreement against the bf16 source - and by the mean weight error, at several fractions.

    python scripts/sweep_outliers.py [--src CHECKPOINT] [--max-tokens 1024] [--schemes nf4,int8] [--record]

Rules: `magnitude` (the k largest |w| of each tensor), `row` (equal shares per output row),
`block-gain` (greedy on the estimated error saved by shrinking each quantization block's absmax).
Each configuration is converted into /tmp and evaluated like scripts/bench_quality.py (default text,
window 512 / stride 256, fp32, the bf16 reference's log-probabilities computed once). --record
writes the table into BENCHMARKS.md between this script's markers.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quality import DTYPE, CachedModel, fetch_src, pack_row  # noqa: E402
from benchlib import machine, record  # noqa: E402

from layerpack.convert import ConvertOptions, convert  # noqa: E402
from layerpack.quantizer import OUTLIER_RULES  # noqa: E402
from layerpack_runtime import load  # noqa: E402
from layerpack_runtime.evaluate import DEFAULT_STRIDE, DEFAULT_WINDOW, default_text  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- sweep_outliers:start -->", "<!-- sweep_outliers:end -->"
FRACTIONS = (0.001, 0.005, 0.01)
# The fraction bench_quality.py checks the target against: the largest tried whose outlier
# tables stay within 0.25 bits/param (48 bits each: 0.005 * 48 = 0.24).
RECOMMENDED_FRACTION = 0.005


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--schemes", default="nf4,int8")
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    src = args.src or fetch_src()
    text, text_id = default_text()
    load0 = os.getloadavg()
    rows = []
    tmp = tempfile.mkdtemp(prefix="sweep_outliers_", dir="/tmp")
    try:
        convert(src, os.path.join(tmp, "reference"), ConvertOptions(quant="none", quiet=True))
        ref = load(os.path.join(tmp, "reference"), dtype=DTYPE, context=DEFAULT_WINDOW)
        ids = ref.tokenizer.encode(text)[: args.max_tokens]
        reference = CachedModel(ref)
        for scheme in args.schemes.split(","):
            base = pack_row(f"{scheme}", src, dict(quant=scheme), tmp, ids, reference, 0)
            rows.append(dict(base, scheme=scheme, rule="—", fraction=0.0))
            for frac in FRACTIONS:
                for rule in OUTLIER_RULES:
                    r = pack_row(f"{scheme} {rule} {frac:g}", src, dict(quant=scheme, outliers=frac), tmp, ids, reference, 0, rule)
                    rows.append(dict(r, scheme=scheme, rule=rule, fraction=frac))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    out = ["| scheme | rule | fraction | bits/param | mean rel RMS weight error | perplexity | gap to bf16 closed | KL vs bf16 | top-1 agreement |",
           "|---|---|---|---|---|---|---|---|---|"]
    bf = rows[0]["ref_perplexity"]
    best = {}
    for r in rows:
        plain = next(p for p in rows if p["scheme"] == r["scheme"] and p["fraction"] == 0.0)
        gap = plain["perplexity"] - bf
        closed = "—" if r["fraction"] == 0 else f"{100 * (plain['perplexity'] - r['perplexity']) / gap:.1f}%" if gap > 0 else "n/a"
        out.append(f"| {r['scheme']} | {r['rule']} | {r['fraction']:g} | {r['bits_per_param']:.3f} | {r['mean_rel_rms']:.5f} | "
                   f"{r['perplexity']:.4f} | {closed} | {r['kl']:.5f} | {100 * r['top1']:.2f}% |")
        if r["fraction"]:
            best.setdefault((r["scheme"], r["fraction"]), []).append((r["kl"], r["rule"]))
    wins = {}
    for (scheme, frac), v in best.items():
        wins[min(v)[1]] = wins.get(min(v)[1], 0) + 1
    summary = ", ".join(f"`{rule}` {n}" for rule, n in sorted(wins.items(), key=lambda x: -x[1]))
    section = "\n".join([
        "## Outlier selection rules",
        "",
        f"`python scripts/sweep_outliers.py {' '.join(sys.argv[1:])}`".replace(" `", "`") + f" on {os.path.basename(src.rstrip('/'))}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()} (no timings; load average "
        f"{load0[0]:.2f} → {load1[0]:.2f}).",
        "",
        f"Text: {text_id}, first {len(ids)} tokens, window {DEFAULT_WINDOW} / stride {DEFAULT_STRIDE}, fp32 compute; bf16 "
        f"perplexity {bf:.4f}. Rules: `magnitude` = the k largest |w| per tensor; `row` = equal shares per output row (every "
        "row's largest first); `block-gain` = greedy on the estimated error saved, block_size·(m0² − m_j²) for a block's top "
        "j entries. Not tried: activation-aware selection (|w|·‖x‖ from a calibration text), which needs a forward pass of "
        "the source inside the streaming converter.",
        "",
        *out,
        "",
        f"Lowest KL per (scheme, fraction): {summary}. The converter's default (`--outlier-rule`): "
        f"`{ConvertOptions().outlier_rule}`.",
    ])
    print(section)
    if args.record:
        record(section, START, END)
        print("recorded", file=sys.stderr)


if __name__ == "__main__":
    main()
