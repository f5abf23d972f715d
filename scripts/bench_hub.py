#!/usr/bin/env python3
"""Running from the Hub: `load("owner/pack")` (layers download in execution order while the model
runs) against `layerpack pull` followed by a local `load`, over one simulated link, as ratios.

    .venv/bin/python scripts/bench_hub.py [--rate-mbs 50] [--quant nf4] [--record]

The pack (SmolLM2-135M-Instruct from PyPI, converted) is served by the local Hub look-alike
(tests/support/hub_server.py) with its file content paced to --rate-mbs MB/s over all connections together
(a shared link). Each row runs in a fresh process with an empty HF cache (except "cached"), and
times from the first Hub request to the first generated token and to the last of --tokens greedy
tokens. Process start and imports are not counted (the same for every row).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchlib import ROOT, machine, record, smollm2_checkpoint

sys.path.insert(0, str(ROOT / "tests"))
from support.hub_server import HubServer  # noqa: E402

MARK_START, MARK_END = "<!-- bench_hub:start -->", "<!-- bench_hub:end -->"
REPO = "bench/smollm2"
PROMPT = "The capital of France is"

_WORKER = """
import json, sys, time
mode, repo, tokens, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
from layerpack_runtime import load
import layerpack.hub
t0 = time.perf_counter()
if mode == "pull":
    pack = layerpack.hub.pull(repo, out, quiet=True)
    t_pulled = time.perf_counter() - t0
else:
    pack, t_pulled = repo, None
model = load(pack)
t_loaded = time.perf_counter() - t0
first = None
for piece in model.generate(%r, max_new_tokens=tokens, stream=True):
    if first is None:
        first = time.perf_counter() - t0
print(json.dumps({"pulled": t_pulled, "loaded": t_loaded, "first": first, "total": time.perf_counter() - t0}))
""" % PROMPT


def run(mode: str, env: dict, tokens: int, out: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _WORKER, mode, REPO, str(tokens), out], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate-mbs", type=float, default=50.0, help="simulated link, MB/s (10^6 bytes)")
    ap.add_argument("--quant", default="nf4", choices=["none", "int8", "nf4"])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--work", default="/tmp/layerpack-bench-hub")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    load_avg = os.getloadavg()
    pack = os.path.join(a.work, f"smollm2-{a.quant}")
    if not os.path.isfile(os.path.join(pack, "manifest.json")):
        subprocess.run([sys.executable, "-m", "layerpack.cli", "convert", smollm2_checkpoint(), pack, "--quant", a.quant,
                        "--quiet", "--overwrite"], check=True, cwd=ROOT)
    manifest = json.load(open(os.path.join(pack, "manifest.json")))
    size = sum(f["size"] for f in manifest["files"])
    rows = {}
    with HubServer(rate=a.rate_mbs * 1e6) as hub, tempfile.TemporaryDirectory() as tmp:
        hub.add_repo(REPO, pack)
        base = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "runtime")])}
        cached_home = os.path.join(tmp, "cached")
        rows["pull, then load and run"] = run("pull", {**base, **hub.client_env(os.path.join(tmp, "pull"))}, a.tokens,
                                               os.path.join(tmp, "pulled"))
        rows["run from the repo id"] = run("lazy", {**base, **hub.client_env(cached_home)}, a.tokens, "-")
        rows["run from the repo id, cached"] = run("lazy", {**base, **hub.client_env(cached_home)}, a.tokens, "-")
    link_s = size / (a.rate_mbs * 1e6)
    ref = rows["pull, then load and run"]
    lines = [
        f"## Running from the Hub: SmolLM2-135M-Instruct {a.quant}, {a.rate_mbs:g} MB/s link ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Machine: {machine()}; load average at start {load_avg[0]:.2f}.",
        f"- Command: `.venv/bin/python scripts/bench_hub.py --rate-mbs {a.rate_mbs:g} --quant {a.quant} --record` "
        f"(local Hub look-alike, content paced to the link rate over all connections; fresh process and HF cache per row).",
        f"- Pack: {size / 1e6:.1f} MB, {len(manifest['layers'])} layer files; the link alone needs {link_s:.2f} s for it. "
        f"{a.tokens} greedy tokens after {PROMPT!r}.",
        "",
        "| mode | pack ready / loaded (s) | first token (s) | last token (s) | first token vs pull-then-run |",
        "|---|--:|--:|--:|--:|",
    ]
    for name, r in rows.items():
        ready = f"{r['pulled']:.2f} / {r['loaded']:.2f}" if r["pulled"] is not None else f"- / {r['loaded']:.2f}"
        lines.append(f"| {name} | {ready} | {r['first']:.2f} | {r['total']:.2f} | {ref['first'] / r['first']:.2f}x |")
    report = "\n".join(lines)
    print(report)
    if a.record:
        record(report, MARK_START, MARK_END)


if __name__ == "__main__":
    main()
