#!/usr/bin/env python3
"""Plot the rows of scripts/bench_quality.py --json (or bench_calibration.py --json): perplexity and
KL vs bits/param.

    /work/main/.bench-venv/bin/python scripts/plot_quality.py docs/quality.json docs/quality.png

matplotlib is not a project dependency: run this with the benchmark venv (pip install matplotlib there).
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, out: str) -> None:
    d = json.load(open(src))
    rows = [r for r in d["rows"] if not r.get("error")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, ylabel in ((axes[0], "perplexity", "perplexity (lower is better)"),
                            (axes[1], "kl", "mean KL vs bf16, nats/token (log)")):
        for i, r in enumerate(rows):
            if key == "kl" and r["label"] == "source bf16":
                continue  # KL 0: off a log axis
            marker = "s" if r["kind"] == "transformers" else "o"
            # bench_calibration.py rows: calibrated (convert --calibrate) in green
            color = "tab:red" if r["kind"] == "transformers" else "tab:green" if " cal " in r["label"] else "tab:blue"
            ax.scatter(r["bits_per_param"], r[key], marker=marker, color=color)
            label = (r["label"].replace("transformers + bitsandbytes", "bnb").replace("outliers ", "")
                     .replace(", tied embedding/head kept bf16 (experiment)", ", head bf16 (exp.)"))
            # alternate right-up / right-down, with a leader line: close neighbours stay readable
            ax.annotate(label, (r["bits_per_param"], r[key]), fontsize=7, textcoords="offset points",
                        xytext=(18, 10 if i % 2 else -14), arrowprops=dict(arrowstyle="-", lw=0.4, color="gray"))
        if key == "perplexity":
            ax.axhline(rows[0].get("ref_perplexity") if rows[0]["label"] != "source bf16" else rows[0]["perplexity"],
                       color="gray", lw=0.8, ls="--")
        else:
            ax.set_yscale("log")
        ax.set_xlabel("bits/param (transformers rows: memory footprint)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{d.get('model', 'SmolLM2-135M-Instruct')}, {d['tokens']} tokens of {d['text'].split(' (')[0]}, window 512 / stride 256, fp32 compute",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
