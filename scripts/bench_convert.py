#!/usr/bin/env python3
"""Benchmark `layerpack convert`: peak RSS and throughput per scheme on a synthetic checkpoint.

Claim under test: peak RSS <= 2 x (largest layer unit's source bytes) + 1 GiB, independent of the
layer count, and nf4 quantization at >= 200 MB/s of bf16 input on a 2-core machine.

    python scripts/bench_convert.py [--work /tmp/layerpack-bench] [--record]

1. Builds (once; reused while WORK/<ckpt>/.complete matches the parameters) a Llama-style bf16
   checkpoint as real sharded safetensors + model.safetensors.index.json + config.json, one shard
   (a few layers) in memory at a time. A second checkpoint with half the layers is a folder of
   symlinks to a prefix of the same shards (shards hold whole layers), so it costs no disk or time.
2. Converts each (checkpoint, scheme) in a fresh `python -m layerpack.cli convert` subprocess under
   `/usr/bin/time -v` (peak RSS of that process alone), after `sync; echo 3 > drop_caches` when
   allowed, so the source is read from disk. The pack is deleted after each run.
3. Prints a markdown table; --record puts it into BENCHMARKS.md between this script's markers.

The machine is shared: each run waits (up to --quiet-wait s) for an idle CPU, runs at --nice -10
when root, and the report gives CPU seconds and the cores others used, to read the timings by.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import machine, record  # noqa: E402  (shared bench helpers)

GiB = 1 << 30
MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- bench_convert:start -->", "<!-- bench_convert:end -->"
SCHEMES = {  # label -> extra CLI arguments
    "none": ["--quant", "none"],
    "int8": ["--quant", "int8"],
    "nf4": ["--quant", "nf4"],
    "nf4+outliers0.001": ["--quant", "nf4", "--outliers", "0.001"],
    "nf4+zstd": ["--quant", "nf4", "--compress", "zstd"],
}


# ---------------------------------------------------------------------------------- checkpoint
def tensor_shapes(a) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Unit -> [(HF name, shape)], in the order the shards are written."""
    hd = a.hidden // a.heads
    q, kv = a.heads * hd, a.kv_heads * hd
    units = {"embed": [("model.embed_tokens.weight", (a.vocab, a.hidden))]}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        units[f"block{i}"] = [
            (p + "input_layernorm.weight", (a.hidden,)),
            (p + "self_attn.q_proj.weight", (q, a.hidden)),
            (p + "self_attn.k_proj.weight", (kv, a.hidden)),
            (p + "self_attn.v_proj.weight", (kv, a.hidden)),
            (p + "self_attn.o_proj.weight", (a.hidden, q)),
            (p + "post_attention_layernorm.weight", (a.hidden,)),
            (p + "mlp.gate_proj.weight", (a.intermediate, a.hidden)),
            (p + "mlp.up_proj.weight", (a.intermediate, a.hidden)),
            (p + "mlp.down_proj.weight", (a.hidden, a.intermediate)),
        ]
    units["head"] = [("model.norm.weight", (a.hidden,)), ("lm_head.weight", (a.vocab, a.hidden))]
    return units


def unit_bytes(shapes) -> dict[str, int]:
    return {unit: sum(2 * math.prod(s) for _, s in ts) for unit, ts in shapes.items()}  # bf16


def _random_tensor(name: str, shape):
    """Deterministic per name (seed = crc32), so a rebuild is bit-identical. Weights ~ N(0, 0.02)
    with 1e-4 of the entries planted at 25-50 sigma, so --outliers has real outliers to keep."""
    import torch

    if len(shape) == 1:  # norm weights
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    w = torch.randn(shape, generator=g, dtype=torch.bfloat16).mul_(0.02)
    n = w.numel()
    k = max(1, n // 10_000)
    idx = torch.randint(0, n, (k,), generator=g)
    mag = 0.5 + 0.5 * torch.rand(k, generator=g)
    sign = torch.randint(0, 2, (k,), generator=g) * 2 - 1
    w.view(-1)[idx] = (mag * sign).to(torch.bfloat16)
    return w


def config_json(a, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "vocab_size": a.vocab, "hidden_size": a.hidden, "intermediate_size": a.intermediate,
        "num_hidden_layers": layers, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    }


def build_checkpoint(a, path: str) -> dict:
    """Write the full checkpoint (if not already complete) and return its description."""
    shapes = tensor_shapes(a)
    desc = {"params": {k: getattr(a, k) for k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "per_shard")},
            "version": 1}
    marker = os.path.join(path, ".complete")
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if {k: done.get(k) for k in desc} == desc:
            return done
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    from safetensors.torch import save_file

    groups = [("model-embed.safetensors", ["embed"])]
    for s in range(0, a.layers, a.per_shard):
        e = min(s + a.per_shard, a.layers)
        groups.append((f"model-layers-{s:03d}-{e - 1:03d}.safetensors", [f"block{i}" for i in range(s, e)]))
    groups.append(("model-head.safetensors", ["head"]))
    weight_map, shard_units = {}, {}
    t0 = time.perf_counter()
    for fname, units in groups:  # one shard in memory at a time
        tensors = {n: _random_tensor(n, s) for u in units for n, s in shapes[u]}
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        shard_units[fname] = units
        del tensors
        print(f"  wrote {fname} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    total = sum(unit_bytes(shapes).values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_json(a, a.layers), f, indent=1)
    done = {**desc, "shard_units": shard_units, "build_s": round(time.perf_counter() - t0, 1)}
    with open(marker, "w") as f:
        json.dump(done, f)
    return done


def half_checkpoint(a, full: str, path: str, done: dict, layers: int) -> None:
    """A `layers`-layer checkpoint: symlinks to the full one's embed, first `layers` layers and head shards."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    keep = {f"block{i}" for i in range(layers)} | {"embed", "head"}
    weight_map = {}
    with open(os.path.join(full, "model.safetensors.index.json")) as f:
        full_map = json.load(f)["weight_map"]
    for fname, units in done["shard_units"].items():
        if set(units) <= keep:
            os.symlink(os.path.join(full, fname), os.path.join(path, fname))
            weight_map.update({n: s for n, s in full_map.items() if s == fname})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_json(a, layers), f, indent=1)


def source_bytes(path: str) -> int:
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        files = set(json.load(f)["weight_map"].values())
    return sum(os.path.getsize(os.path.join(path, p)) for p in files)


# ---------------------------------------------------------------------------------- measuring
def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _busy_cpu_s() -> float:
    """Machine-wide busy CPU seconds so far (/proc/stat; iowait and idle excluded)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_s: float, threshold: float = 0.3) -> None:
    """Other engineers share this machine: wait (bounded) for a 2 s window in which fewer than
    `threshold` cores are busy, so runs start on a quiet machine when possible."""
    t_end = time.monotonic() + max_s
    while time.monotonic() < t_end:
        b = _busy_cpu_s()
        time.sleep(2)
        if (_busy_cpu_s() - b) / 2 < threshold:
            return


def measure(cmd: list[str]) -> dict:
    """Wall s, peak RSS bytes, CPU s (user+sys) of `cmd` run as its own process, and `others`: the
    average number of cores other processes kept busy meanwhile (contention, for reading timings)."""
    b0 = _busy_cpu_s()
    t0 = time.perf_counter()
    if os.path.exists("/usr/bin/time"):
        p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        field = lambda name: float(re.search(re.escape(name) + r": ([\d.]+)", p.stderr).group(1)) if p.returncode == 0 else 0.0
        rss, cpu = int(field("Maximum resident set size (kbytes)")) * 1024, field("User time (seconds)") + field("System time (seconds)")
    else:  # a fresh intermediate process: its RUSAGE_CHILDREN figures are exactly this one child's
        probe = ("import resource,subprocess,sys;r=subprocess.run(sys.argv[1:]);u=resource.getrusage(resource.RUSAGE_CHILDREN);"
                 "print(u.ru_maxrss,u.ru_utime+u.ru_stime,r.returncode)")
        p = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        kb, cpu, rc = p.stdout.split()[-3:]
        rss, cpu, p.returncode = int(kb) * 1024, float(cpu), int(rc)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {shlex.join(cmd)}\n{p.stderr[-3000:]}")
    others = max(0.0, (_busy_cpu_s() - b0 - cpu) / wall)
    return {"wall_s": wall, "rss": rss, "cpu_s": cpu, "others": others}


def convert_once(src: str, out: str, extra: list[str], cold: bool, quiet_wait: float, nice: int) -> dict:
    wait_quiet(quiet_wait)
    if cold:
        drop_caches()
    # `nice` execs the command, so /usr/bin/time still measures the converter process itself.
    r = measure(["nice", "-n", str(nice), sys.executable, "-m", "layerpack.cli", "convert", src, out, *extra, "--quiet", "--overwrite"])
    with open(os.path.join(out, "manifest.json")) as f:
        totals = json.load(f)["totals"]
    shutil.rmtree(out)
    return {**r, "pack_bytes": totals["layer_bytes"], "bits": totals["bits_per_param"]}


# ---------------------------------------------------------------------------------- reporting
def code_snapshot() -> dict:
    """Commit + sha256 of each repository module a conversion loads. Others edit this repository
    concurrently, so the report names the code it measured and any module that changed meanwhile."""
    git = lambda *args: subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True).stdout.strip()
    probe = "import json,sys,layerpack.cli,layerpack.convert;print(json.dumps([getattr(m,'__file__',None) for m in list(sys.modules.values())]))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    files = sorted({os.path.relpath(f, ROOT) for f in loaded if f and os.path.isabs(f)
                    and f.startswith((os.path.join(ROOT, "layerpack") + os.sep, os.path.join(ROOT, "runtime") + os.sep))})
    digests = {}
    for rel in files:
        with open(os.path.join(ROOT, rel), "rb") as f:
            digests[rel] = hashlib.sha256(f.read()).hexdigest()
    dirty = git("status", "--porcelain", "--", *files)
    return {"commit": git("rev-parse", "--short", "HEAD") or "?", "dirty": bool(dirty), "files": digests}


def describe_code(start: dict, end: dict) -> str:
    combined = hashlib.sha256(json.dumps(start["files"], sort_keys=True).encode()).hexdigest()[:12]
    text = (f"commit {start['commit']}{' with uncommitted edits' if start['dirty'] else ''}; "
            f"sha256 of its {len(start['files'])} loaded layerpack/runtime modules: {combined}")
    changed = sorted(f for f in set(start["files"]) | set(end["files"]) if start["files"].get(f) != end["files"].get(f))
    if changed:
        text += f" (changed by others during the run: {', '.join(changed)})"
    return text


def report(a, rows, full_b, half_b, bound, largest, cold, base, cmdline, load, code) -> str:
    L, H = a.layers, a.layers // 2
    lines = [
        f"## `layerpack convert`: streaming memory and speed ({datetime.date.today().isoformat()})",
        "",
        f"- Machine: {machine()}; shared with other work (load average at start: {load}; *others* = average number of cores "
        "busy with anything but the conversion during it, from /proc/stat: other users' jobs, and kernel threads such as writeback).",
        f"- Command: `{cmdline}`; code: {code}.",
        f"- Source: synthetic Llama (LlamaForCausalLM, bf16, untied) hidden {a.hidden}, intermediate {a.intermediate}, "
        f"{a.heads} heads / {a.kv_heads} kv heads, vocab {a.vocab}: **{L} layers = {full_b / 1e9:.2f} GB** "
        f"and {H} layers = {half_b / 1e9:.2f} GB (a prefix of the same shards), safetensors shards of {a.per_shard} layers.",
        f"- Largest layer unit: {largest[0]} = {largest[1] / MiB:.0f} MiB, so the bound is 2 x {largest[1] / MiB:.0f} MiB + 1 GiB "
        f"= **{bound / MiB:.0f} MiB**. For scale: starting Python and importing torch + layerpack alone takes "
        f"{base['rss'] / MiB:.0f} MiB RSS and {base['wall_s']:.1f} s ({'cold' if cold else 'warm'} cache).",
        "- Page cache: " + ("dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every conversion: the source is read from "
                            "disk (by the converter's tensor reads and its source sha256 pass, whichever comes first)." if cold else
                            f"NOT dropped (--warm or no permission); the source ({full_b / GiB:.1f} GiB) fits in RAM, so it was likely cached."),
        "- One `python -m layerpack.cli convert SRC OUT <scheme> --quiet --overwrite` process per cell; peak RSS = its `/usr/bin/time -v` "
        "maximum resident set size. Wall time and MB/s (source bytes / wall, 1 MB = 10^6 B) cover the whole process: start, imports, "
        "read, quantize, write + fsync, sha256 of the source; *excl. start* subtracts the import-only time above. CPU s = user + sys. "
        f"Conversions run at niceness {a.nice} to limit interference from other jobs.",
        "",
        f"| scheme | peak RSS {L}L (MiB) | peak RSS {H}L (MiB) | ratio {L}L/{H}L | bound (MiB) | {L}L RSS / bound | PASS "
        f"| wall {L}L (s) | MB/s {L}L | MB/s {L}L excl. start | MB/s {H}L | CPU s {L}L | others {L}L / {H}L (cores) | pack (GB) | bits/param |",
        "|---|--:|--:|--:|--:|--:|:-:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for label, r in rows.items():
        f, h = r["full"], r["half"]
        ok = max(f["rss"], h["rss"]) <= bound
        lines.append(
            f"| {label} | {f['rss'] / MiB:.0f} | {h['rss'] / MiB:.0f} | {f['rss'] / h['rss']:.3f} | {bound / MiB:.0f} "
            f"| {f['rss'] / bound:.2f} | {'PASS' if ok else 'FAIL'} | {f['wall_s']:.1f} | {full_b / f['wall_s'] / 1e6:.0f} "
            f"| {full_b / (f['wall_s'] - base['wall_s']) / 1e6:.0f} | {half_b / h['wall_s'] / 1e6:.0f} | {f['cpu_s']:.0f} "
            f"| {f['others']:.2f} / {h['others']:.2f} | {f['pack_bytes'] / 1e9:.2f} | {f['bits']:.2f} |")
    if "nf4" in rows:
        f = rows["nf4"]["full"]
        mbs, net = full_b / f["wall_s"] / 1e6, full_b / (f["wall_s"] - base["wall_s"]) / 1e6
        cap = full_b / (f["cpu_s"] / os.cpu_count()) / 1e6  # what all cores, perfectly busy and unshared, could do
        lines += ["", f"nf4 throughput target >= 200 MB/s of bf16 input: {mbs:.0f} MB/s end to end ({net:.0f} MB/s excl. start) "
                      f"-> **{'PASS' if mbs >= 200 else 'FAIL'}**. Contention-free ceiling from its CPU time "
                      f"({f['cpu_s']:.0f} CPU s / {os.cpu_count()} cores): {cap:.0f} MB/s."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/layerpack-bench", help="cache folder for the checkpoint and scratch packs")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--per-shard", type=int, default=4, help="decoder layers per safetensors shard")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated subset of {','.join(SCHEMES)}")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache before each conversion")
    ap.add_argument("--quiet-wait", type=float, default=15, help="max seconds to wait for an idle CPU before each run")
    ap.add_argument("--nice", type=int, default=-10, help="niceness of the conversions (negative needs root; "
                    "the machine is shared, and a higher priority keeps other jobs from skewing the timings)")
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    a = ap.parse_args()
    half = a.layers // 2
    if half % a.per_shard:
        ap.error("--layers / 2 must be a multiple of --per-shard (the half checkpoint reuses whole shards)")
    labels = a.schemes.split(",")
    if unknown := [s for s in labels if s not in SCHEMES]:
        ap.error(f"unknown scheme(s) {unknown}")
    os.makedirs(a.work, exist_ok=True)
    free = shutil.disk_usage(a.work).free
    shapes = tensor_shapes(a)
    ub = unit_bytes(shapes)
    need = sum(ub.values()) * 2 + GiB  # source + the largest pack (scheme none, same size) + slack
    if free < need and not os.path.isfile(os.path.join(a.work, "ckpt", ".complete")):
        raise SystemExit(f"{a.work}: {free / GiB:.1f} GiB free, need about {need / GiB:.1f} GiB")
    load = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    code = code_snapshot()
    if a.nice < 0 and os.geteuid() != 0:
        a.nice = 0
    full, small, out = (os.path.join(a.work, n) for n in ("ckpt", f"ckpt-{half}L", "pack"))
    print(f"checkpoint: {full}", file=sys.stderr)
    done = build_checkpoint(a, full)
    half_checkpoint(a, full, small, done, half)
    full_b, half_b = source_bytes(full), source_bytes(small)
    largest = max(ub.items(), key=lambda kv: kv[1])
    bound = 2 * largest[1] + GiB
    # What every conversion pays before reading a byte: interpreter start + imports (RSS and seconds).
    wait_quiet(a.quiet_wait)
    cold = not a.warm and drop_caches()
    base = measure([sys.executable, "-c", "import layerpack.cli, layerpack.convert, layerpack.quantizer"])

    rows = {}
    for label in labels:
        rows[label] = {}
        for key, src in (("full", full), ("half", small)):
            r = convert_once(src, out, SCHEMES[label], cold, a.quiet_wait, a.nice)
            rows[label][key] = r
            print(f"  {label:18s} {os.path.basename(src):9s} {r['wall_s']:6.1f}s  peak RSS {r['rss'] / MiB:5.0f} MiB  "
                  f"CPU {r['cpu_s']:5.1f}s  others {r['others']:.2f} cores", file=sys.stderr)
    cmdline = "python scripts/bench_convert.py " + shlex.join(sys.argv[1:])
    text = report(a, rows, full_b, half_b, bound, largest, cold, base, cmdline.strip(), load, describe_code(code, code_snapshot()))
    print(text)
    if a.record:
        record(text, START, END)
        print(f"recorded in {os.path.join(ROOT, 'BENCHMARKS.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
