#!/usr/bin/env python3
"""Cost of verify's value checks (value_scan: no NaN/inf in unquantized tensors, no int8 code -128),
made on the bytes as they are hashed, on SmolLM2-135M-Instruct packs (bf16 and int8; page cache
warm; one thread): Pack.verify() with the checks, and with them replaced by nothing, alternating,
best of --repeats each.

    .venv/bin/python scripts/bench_verify.py
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import machine, smollm2_checkpoint  # noqa: E402


class _NoScan:
    def __init__(self, layer, st):
        self.problem = None

    def feed(self, offset, chunk):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default="/tmp/layerpack-bench-verify")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from layerpack_runtime import pack as pack_mod
    from layerpack_runtime.pack import Pack

    rows = []
    for quant in ("none", "int8"):
        out = os.path.join(args.work, f"smollm2-{quant}")
        if not os.path.exists(os.path.join(out, "manifest.json")):
            r = subprocess.run([sys.executable, "-m", "layerpack.cli", "convert", smollm2_checkpoint(), out, "--quant", quant,
                                "--quiet", "--overwrite"], capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr)
        p = Pack(out)
        size = sum(f.size for f in p.manifest.files)
        real = pack_mod.ValueScan
        best = {"hash only": float("inf"), "hash + value checks": float("inf")}
        for _ in range(args.repeats):
            for label, scan in (("hash only", _NoScan), ("hash + value checks", real)):
                pack_mod.ValueScan = scan
                t = time.perf_counter()
                problems = Pack(out).verify()
                best[label] = min(best[label], time.perf_counter() - t)
                assert problems == [], problems
        pack_mod.ValueScan = real
        rows.append((quant, size / 2**20, best["hash only"], best["hash + value checks"]))
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print("| pack | MiB | verify, hash only | verify, hash + value checks | ratio |")
    print("|------|-----|-------------------|-----------------------------|-------|")
    for quant, mib, a, b in rows:
        print(f"| SmolLM2-135M {quant} | {mib:.1f} | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {b / a:.2f} |")


if __name__ == "__main__":
    main()
