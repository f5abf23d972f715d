#!/usr/bin/env python3
"""layerpack against llama.cpp (through llama-cpp-python) on the same CPU, same checkpoint, same
prompt: decode tokens/s side by side, interleaved rounds. Not part of the test suite.

    .venv/bin/python scripts/bench_llamacpp.py [--model DIR] [--threads 1] [--rounds 3] [--tokens 128] [--record]
    .venv/bin/python scripts/bench_llamacpp.py --synthetic llama3-8b [--layers 4] ...

Pairs: layerpack bf16 / int8 / nf4 packs against llama.cpp BF16 / Q8_0 / Q4_0 GGUFs of the same
checkpoint (--model, default: SmolLM2-135M-Instruct from ~/.cache/layerpack/models).

--synthetic llama3-8b: a Llama-3.1-8B-shaped checkpoint instead (hidden 4096, FFN 14336, 32 heads /
8 KV heads of 128, vocab 128256, untied head, llama3 rope; --layers of its 32 decoder layers, random
weights), written once by scripts/make_synthetic.py into out/synthetic/llama3-8b-<layers>L and
reused (4 layers: 3.8 GB; its GGUFs and packs add ~14 GB under --work). Its tokenizer is SmolLM2's
(49152 ids, the same ids on both sides): the embedding and head keep Llama 3's 128256 rows (the
bytes a real 8B head reads per token), the pack allows more rows than its tokenizer has, and
llama.cpp's converter lists the 79104 ids past the tokenizer as unused `[PAD<id>]` tokens (its rule
for a config vocab_size larger than the tokenizer). Greedy decoding of random weights may pick any
of the 128256 ids; both sides just feed them back. For speed, not quality.

Setup (cached, so only the first run is slow):
* llama-cpp-python is built from its source distribution with native CPU flags (GGML_NATIVE) into
  a wheel under ~/.cache/layerpack/llamacpp/wheels (many minutes on 2 cores), then installed into
  .bench-venv together with the `gguf` package of the same source tree, torch and transformers
  (llama.cpp's converter imports them). An existing wheel or install is reused.
* GGUFs: llama.cpp's own converter (convert_hf_to_gguf.py from the vendored llama.cpp) writes
  BF16; llama.cpp's quantizer (llama_model_quantize, the library behind llama-quantize) makes
  Q8_0 and Q4_0 from it. Packs: `layerpack convert`. Both kept under --work.

Each round runs every configuration once, each in a fresh process (one at a time; the order of
the two sides alternates between rounds), each: load, prefill the prompt, then --tokens greedy
decode steps (no stop at EOS: both sides do the same number of steps), and nothing else (what
the report needs from the GGUF is read beforehand, in another process). Reported: median decode
tok/s over rounds, the median of the per-round ratios, the load average during the round, bytes
of weights read per decoded token (every weight except embedding rows; a tied head reads the
whole embedding) and the resulting GB/s, prefill time and whole-process time (start to exit).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from benchlib import machine, record  # noqa: E402

# one recorded table per model and thread count: bench_llamacpp_<model folder>_t<threads>
MARKS = "<!-- bench_llamacpp_{}_t{}:start -->", "<!-- bench_llamacpp_{}_t{}:end -->"
LLAMACPP_VERSION = "0.3.36"
CACHE = Path(os.environ.get("LAYERPACK_CACHE") or Path.home() / ".cache" / "layerpack") / "llamacpp"
BENCH_VENV = ROOT / ".bench-venv"
BENCH_PY = BENCH_VENV / "bin" / "python"
# CPU only, native instructions; no llava/tools/tests/examples (not needed, and they double the build)
CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
PAIRS = [("none", "BF16", 32), ("int8", "Q8_0", 7), ("nf4", "Q4_0", 2)]  # (layerpack quant, GGUF type, llama_ftype)
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Once upon a time,"


def run(cmd, **kw):
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if res.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, cmd[:3]))} ... failed:\n{(res.stderr or res.stdout)[-3000:]}")
    return res


# -- setup ------------------------------------------------------------------------------------------

def source_dir() -> Path:
    src = CACHE / f"llama_cpp_python-{LLAMACPP_VERSION}"
    if not src.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMACPP_VERSION}", "-d", CACHE])
        run(["tar", "xzf", CACHE / f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz", "-C", CACHE])
    return src


def ensure_llamacpp() -> Path:
    """.bench-venv with llama_cpp (native build) and gguf; returns the vendored llama.cpp tree."""
    src = source_dir()
    if BENCH_PY.exists() and subprocess.run([BENCH_PY, "-c", "import llama_cpp, gguf, torch, transformers"],
                                            capture_output=True).returncode == 0:
        return src / "vendor" / "llama.cpp"
    wheels = CACHE / "wheels"
    if not list(wheels.glob(f"llama_cpp_python-{LLAMACPP_VERSION}-*.whl")):
        print(f"building llama-cpp-python {LLAMACPP_VERSION} with native flags (many minutes on 2 cores)...", file=sys.stderr)
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, src],
            env={**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
    if not BENCH_PY.exists():
        run([sys.executable, "-m", "venv", BENCH_VENV])
    wheel = sorted(wheels.glob(f"llama_cpp_python-{LLAMACPP_VERSION}-*.whl"))[-1]
    run([BENCH_PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "torch==2.13.0", "transformers==5.23.0",
         "numpy", "safetensors", "sentencepiece", "protobuf", wheel, src / "vendor" / "llama.cpp" / "gguf-py"])
    return src / "vendor" / "llama.cpp"


_QUANTIZE = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(rc)
"""


def synthetic_checkpoint(shape: str, layers: int) -> Path:
    """A random-weight checkpoint of `shape` under out/synthetic (make_synthetic.py skips a complete one)."""
    out = ROOT / "out" / "synthetic" / f"{shape}-{layers}L"
    tokenizer = Path.home() / ".cache" / "layerpack" / "models" / "smollm2"
    if not (out / ".complete").exists():
        print(f"writing the {shape}-shaped checkpoint ({layers} layers, random weights) into {out}...", file=sys.stderr)
    run([ROOT / ".venv" / "bin" / "python", ROOT / "scripts" / "make_synthetic.py", out, "--shape", shape,
         "--layers", layers, "--tokenizer", tokenizer, "--quiet"])
    return out


def ensure_models(model: Path, work: Path, tree: Path) -> dict:
    """GGUF files and packs of `model` under `work` (made once)."""
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    bf16 = work / "model-BF16.gguf"
    if not bf16.exists():
        print("converting to GGUF BF16 with llama.cpp's converter...", file=sys.stderr)
        run([BENCH_PY, tree / "convert_hf_to_gguf.py", model, "--outtype", "bf16", "--outfile", bf16.with_suffix(".tmp")])
        os.replace(bf16.with_suffix(".tmp"), bf16)
    for quant, gtype, ftype in PAIRS:
        g = work / f"model-{gtype}.gguf"
        if not g.exists():
            print(f"quantizing GGUF {gtype} with llama.cpp's quantizer...", file=sys.stderr)
            run([BENCH_PY, "-c", _QUANTIZE, bf16, g.with_suffix(".tmp"), ftype])
            os.replace(g.with_suffix(".tmp"), g)
        p = work / f"pack-{quant}"
        if not (p / "manifest.json").exists():
            print(f"converting the layerpack pack ({quant})...", file=sys.stderr)
            run([ROOT / ".venv" / "bin" / "layerpack", "convert", model, p, "--quant", quant, "--overwrite"])
        out[quant] = (p, g)
    return out


# Weight bytes a llama.cpp decode step reads: every tensor of the GGUF but the embedding's (one row a
# token), unless the head is tied to it (no output.weight). Read once, outside the timed worker: the
# gguf package's reader parses the whole vocabulary (~3 s on SmolLM2's GGUF under load), which runs
# before 2026-12-04 16:30 counted in llama.cpp's process time.
_GGUF_BYTES = r"""
import sys, gguf
sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(sys.argv[1]).tensors}
print(sum(sizes.values()) - (sizes.get("token_embd.weight", 0) if "output.weight" in sizes else 0))
"""


def gguf_bytes_per_token(g: Path) -> int:
    return int(run([BENCH_PY, "-c", _GGUF_BYTES, g]).stdout.split()[-1])


# -- workers (each in its own process) -----------------------------------------------------------------

def worker_layerpack(cfg: dict) -> dict:
    import torch

    from layerpack_runtime import load

    model = load(cfg["pack"], threads=cfg["threads"])
    ids = torch.tensor([cfg["prompt_ids"]])
    # bytes of weights read per decoded token: every resident weight, less the embedding's when the
    # head is separate (the embedding gives one row per token)
    costs = {c.name: c for c in (model._unit_cost(n) for n in model.units)}
    form = lambda n: costs[n].dequantized if model.plan.resident.get(n) else costs[n].stored  # noqa: E731
    per_token = sum(form(n) for n in model.units if n != "embed" or model.args.tie_word_embeddings)
    with torch.inference_mode():
        cache = model.new_cache(1, ids.shape[1] + cfg["tokens"] + 1)
        t0 = time.perf_counter()
        tok = model.forward(ids, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(cfg["tokens"] - 1):
            tok = model.forward(tok, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t0
    from layerpack_runtime import kernels
    from layerpack_runtime.kernels import decode_block

    return {"decode_tps": (cfg["tokens"] - 1) / decode, "prefill_s": prefill, "bytes_per_token": per_token,
            "threads": torch.get_num_threads(), "dequantized": sum(model.plan.resident.values()),
            "bf16_gemv": kernels.dense_gemv(), "decode_block": decode_block.enabled()}


def worker_llamacpp(cfg: dict) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(cfg["gguf"], n_ctx=len(cfg["prompt_ids"]) + cfg["tokens"] + 8, n_threads=cfg["threads"],
                          n_threads_batch=cfg["threads"], n_batch=512, verbose=False)
    gen = llm.generate(cfg["prompt_ids"], temp=0.0, top_k=1, reset=True)
    t0 = time.perf_counter()
    next(gen)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(cfg["tokens"] - 1):
        next(gen)
    decode = time.perf_counter() - t0
    return {"decode_tps": (cfg["tokens"] - 1) / decode, "prefill_s": prefill, "bytes_per_token": cfg["bytes_per_token"],
            "threads": cfg["threads"], "isa": llama_cpp.llama_print_system_info().decode().strip()}


def spawn(side: str, cfg: dict) -> dict:
    py = BENCH_PY if side == "llamacpp" else ROOT / ".venv" / "bin" / "python"
    t0 = time.perf_counter()
    res = run([py, __file__, "--worker", side, json.dumps(cfg)], timeout=1800)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


# -- report -----------------------------------------------------------------------------------------

def render(a, rows, loads, info) -> str:
    gb = lambda r: statistics.median(x["decode_tps"] for x in r) * r[0]["bytes_per_token"] / 1e9  # noqa: E731
    lines = [
        f"### {Path(a.model).name}, {a.threads} thread{'s' if a.threads > 1 else ''} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"- Machine: {machine()} (this script's own process; the workers use --threads); **shared with other agents' work during the run** (load averages below: "
        f"{min(loads):.1f}-{max(loads):.1f} over the rounds, on 2 cores), so absolute figures are low and noisy; the ratios "
        "compare runs made seconds apart.",
        f"- Command: `.venv/bin/python scripts/bench_llamacpp.py {f'--synthetic {a.synthetic} --layers {a.layers}' if a.synthetic else f'--model {a.model}'} --threads {a.threads} --rounds {a.rounds} "
        f"--tokens {a.tokens}{' --record' if a.record else ''}`; llama-cpp-python {LLAMACPP_VERSION} built from source "
        f"with `{CMAKE_ARGS.split()[0]}` ({info.get('isa', '?')[:160]}).",
        f"- Model: `{a.model}`{' (random weights, Llama-3.1-8B layer shapes, vocab 128256, SmolLM2 tokenizer)' if a.synthetic else ''}; prompt {info['prompt_tokens']} tokens, {a.tokens} greedy tokens (decode = steps 2..{a.tokens}); "
        f"{a.rounds} interleaved rounds, each configuration in a fresh process; threads {a.threads} on both sides.",
        "- GB/s = weight bytes read per decoded token (all weights except embedding rows; a tied head reads the whole "
        "embedding) x median tok/s. Ratio = layerpack / llama.cpp: of the medians, and the median of the per-round ratios.",
        "",
        "| layerpack | llama.cpp | threads | llama.cpp tok/s | layerpack tok/s | ratio (medians) | per-round ratios | "
        "MB/token llama.cpp / layerpack | GB/s llama.cpp / layerpack | prefill s llama.cpp / layerpack | process s llama.cpp / layerpack |",
        "|---|---|--:|--:|--:|--:|---|--:|--:|--:|--:|",
    ]
    for quant, gtype, _ in PAIRS:
        lp, lc = rows[(quant, "layerpack")], rows[(quant, "llamacpp")]
        m_lp, m_lc = statistics.median(x["decode_tps"] for x in lp), statistics.median(x["decode_tps"] for x in lc)
        per_round = [x["decode_tps"] / y["decode_tps"] for x, y in zip(lp, lc)]
        med = lambda r, k: statistics.median(x[k] for x in r)  # noqa: E731
        name = {"none": "bf16"}.get(quant, quant)
        lines.append(
            f"| {name} | {gtype} | {a.threads} | {m_lc:.1f} | {m_lp:.1f} | {m_lp / m_lc:.2f} | "
            f"{', '.join(f'{r:.2f}' for r in per_round)} (median {statistics.median(per_round):.2f}) | "
            f"{lc[0]['bytes_per_token'] / 1e6:.1f} / {lp[0]['bytes_per_token'] / 1e6:.1f} | {gb(lc):.1f} / {gb(lp):.1f} | "
            f"{med(lc, 'prefill_s'):.3f} / {med(lp, 'prefill_s'):.3f} | {med(lc, 'process_s'):.1f} / {med(lp, 'process_s'):.1f} |")
    deq = {q: rows[(q, "layerpack")][0]["dequantized"] for q, _, _ in PAIRS if q != "none"}
    lines += ["", f"Load average (1 min) at the start of each round: {', '.join(f'{x:.2f}' for x in loads)}. "
                  + (f"Units the planner dequantized (0 = every quantized unit ran from its codes): "
                     f"{', '.join(f'{q} {n}' for q, n in deq.items())}. " if deq else "")
                  + "Native decode block (one call per block, kernels/decode_block.c; its bf16 weights use the native bf16 GEMV): "
                  f"{'on' if any(r[0].get('decode_block') for r in rows.values()) else 'off (LAYERPACK_DECODE_BLOCK=0: per-op torch path)'}."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path.home() / ".cache" / "layerpack" / "models" / "smollm2"))
    ap.add_argument("--synthetic", choices=("llama3-8b",), help="a random-weight checkpoint of this shape instead of --model (see above)")
    ap.add_argument("--layers", type=int, default=4, help="--synthetic: decoder layers (of 32)")
    ap.add_argument("--work", default=str(ROOT / "out" / "llamacpp"), help="GGUFs and packs (kept; reused)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--pairs", default="none,int8,nf4", help="which layerpack schemes (and their GGUF peers)")
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        cfg = json.loads(a.worker[1])
        print(json.dumps(worker_llamacpp(cfg) if a.worker[0] == "llamacpp" else worker_layerpack(cfg)))
        return
    if a.tokens < 2 or a.rounds < 1 or a.threads < 1:
        sys.exit("error: --tokens must be >= 2, --rounds and --threads >= 1")
    if not 1 <= a.layers <= 32:
        sys.exit("error: --layers must be in 1..32")
    if a.synthetic:
        if not (Path.home() / ".cache" / "layerpack" / "models" / "smollm2" / "tokenizer.json").exists():
            sys.exit("error: --synthetic takes SmolLM2's tokenizer: run scripts/fetch_models.py smollm2 first")
        a.model = str(synthetic_checkpoint(a.synthetic, a.layers))
    model = Path(a.model)
    if not (model / "config.json").exists():
        sys.exit(f"error: {model} is not a Hugging Face checkpoint folder (no config.json)")
    global PAIRS
    PAIRS = [p for p in PAIRS if p[0] in a.pairs.split(",")]
    tree = ensure_llamacpp()
    models = ensure_models(model, Path(a.work) / model.name, tree)
    sys.path.insert(0, str(ROOT / "runtime"))
    from layerpack_runtime import load  # noqa: E402  (the prompt's ids, from the pack's own tokenizer)

    prompt_ids = load(models[PAIRS[0][0]][0]).encode_prompt(PROMPT)
    gguf_bytes = {quant: gguf_bytes_per_token(models[quant][1]) for quant, _, _ in PAIRS}
    rows: dict = {}
    loads = []
    info = {"prompt_tokens": len(prompt_ids)}
    for r in range(a.rounds):
        loads.append(os.getloadavg()[0])
        for quant, gtype, _ in PAIRS:
            pack, g = models[quant]
            base = {"threads": a.threads, "tokens": a.tokens, "prompt_ids": prompt_ids}
            sides = [("layerpack", {**base, "pack": str(pack)}),
                     ("llamacpp", {**base, "gguf": str(g), "bytes_per_token": gguf_bytes[quant]})]
            for side, cfg in (sides if r % 2 == 0 else sides[::-1]):
                out = spawn(side, cfg)
                info.setdefault("isa", out.get("isa", "")) if side == "llamacpp" else None
                rows.setdefault((quant, side), []).append(out)
                print(f"round {r + 1}: {quant:5s} {side:9s} {out['decode_tps']:7.1f} tok/s  load {os.getloadavg()[0]:.2f}",
                      file=sys.stderr, flush=True)
    report = render(a, rows, loads, info)
    print(report)
    if a.record:
        record(report, *(m.format(model.name, a.threads) for m in MARKS))


if __name__ == "__main__":
    main()
