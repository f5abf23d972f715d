#!/usr/bin/env python3
"""What a pack costs in quality: perplexity, KL divergence and top-1 agreement against the bf16
source, bits/param, pack size and decode speed, for every scheme on SmolLM2-135M-Instruct, plus
transformers + bitsandbytes (nf4 / int8) on the same checkpoint where bitsandbytes runs.

    python scripts/bench_quality.py [--model smollm2|gemma3] [--src CHECKPOINT] [--max-tokens 2048] [--record]
                                    [--json docs/quality.json]

Every layerpack row is converted into /tmp (deleted afterwards) and measured by
layerpack_runtime.evaluate (the code of `layerpack eval`) on the default text (pydoc_data.topics
slice), sliding window 512 / stride 256, fp32 compute; the reference is the unquantized bf16 pack
(its log-probabilities computed once and reused). The bitsandbytes rows run
through transformers, on the same token ids and
windows, against transformers' own unquantized model (fp32 compute) - runtime/transformers parity is
tested separately. They run in a subprocess of the benchmark venv (transformers' bitsandbytes
path needs accelerate), importing this checkout's runtime for the same evaluation code. --record writes the table into BENCHMARKS.md between this script's markers;
--json writes the rows for scripts/plot_quality.py.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import machine, record  # noqa: E402  (shared bench helpers)

from layerpack.convert import ConvertOptions, convert  # noqa: E402
from layerpack_runtime import load  # noqa: E402
from layerpack_runtime.format import SCHEME_NONE  # noqa: E402
from layerpack_runtime.evaluate import DEFAULT_STRIDE, DEFAULT_WINDOW, default_text, evaluate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- bench_quality:start -->", "<!-- bench_quality:end -->"
# transformers' bitsandbytes path needs accelerate: the benchmark venv (scripts/setup_bench_venv.sh,
# plus `pip install bitsandbytes`) has both; the main venv has bitsandbytes only (a test dependency).
BENCH_PY = "/work/main/.bench-venv/bin/python"
DTYPE = "fp32"
PROMPT = "The history of the printing press"
# (label, convert options)
# The setting the README and quickstart recommend for nf4, judged against the target 2.
RECOMMENDED = "nf4 + head outliers 2%"
CONFIGS = (
    ("source bf16", dict(quant="none")),
    ("int8", dict(quant="int8")),
    ("int8 + outliers 0.5%", dict(quant="int8", outliers=0.005)),
    ("nf4", dict(quant="nf4")),
    ("nf4 + outliers 0.1%", dict(quant="nf4", outliers=0.001)),
    ("nf4 + outliers 0.5%", dict(quant="nf4", outliers=0.005)),
    ("nf4 + outliers 1%", dict(quant="nf4", outliers=0.01)),
    # the head (here the tied embedding, 21% of SmolLM2's parameters) is the most sensitive weight:
    # outliers spent there (--head-outliers) instead of spread over every tensor
    ("nf4 + head outliers 2%", dict(quant="nf4", head_outliers=0.02)),
    ("nf4 + outliers 0.1%, head 2%", dict(quant="nf4", outliers=0.001, head_outliers=0.02)),
    # Experiment, not a converter option: what bitsandbytes does (it leaves embeddings and the tied
    # lm_head unquantized), to separate the head's share of the loss from the blocks'.
    ("nf4, tied embedding/head kept bf16 (experiment)", dict(quant="nf4", keep_embedding=True)),
)


@contextlib.contextmanager
def embedding_unquantized(on: bool):
    """Make convert() leave embed.weight (the tied head) in the pack dtype (the manifest's
    quantized_embedding flag follows, from the same scheme_for); the pack is only measured here and deleted."""
    if not on:
        yield
        return
    import layerpack.conversion.job as conv  # where the converter looks scheme_for up (tensor_plan)

    orig = conv.scheme_for
    conv.scheme_for = lambda canonical, quant, arch: SCHEME_NONE if canonical == "embed.weight" else orig(canonical, quant, arch)
    try:
        yield
    finally:
        conv.scheme_for = orig


class CachedModel:
    """A model whose forward results are kept (by input): the reference is run once per window and
    reused for every row it is compared with."""

    def __init__(self, model):
        self.model, self.args, self.device, self._memo = model, model.args, model.device, {}

    def forward(self, ids):
        key = tuple(ids.reshape(-1).tolist())
        if key not in self._memo:
            self._memo[key] = self.model.forward(ids)
        return self._memo[key]


# Per model: its name in reports, what its checkpoint is, its BENCHMARKS.md markers and plot.
MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct", "the bf16 checkpoint of scripts/fetch_models.py, which is a dequantized Q4_1 GGUF, "
                "see the quantization-error section", (START, END), "docs/quality.png"),
    "gemma3": ("Gemma 3 270M (base)", "the bf16 checkpoint of scripts/fetch_models.py, a dequantized Q4_K_M GGUF; "
               "tied embedding = 168M of its 268M parameters (vocabulary 262k)",
               ("<!-- bench_quality_gemma3:start -->", "<!-- bench_quality_gemma3:end -->"), "docs/quality_gemma3.png"),
}


def fetch_src(model: str = "smollm2") -> str:
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "fetch_models.py"), model, "--quiet"],
                          check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]


DECODE_REPEATS = 3


def decode_speed(model, tokens: int) -> tuple[float, float]:
    """(best greedy decode tokens/s of DECODE_REPEATS runs after a short prompt - the first step, the
    prefill, excluded; best-of because the 2 cores are shared - and the 1-minute load average)."""
    model.generate(PROMPT, max_new_tokens=4)  # warm-up
    best = 0.0
    for _ in range(DECODE_REPEATS):
        model.generate_ids(PROMPT, max_new_tokens=tokens)
        best = max(best, model.last_stats.decode_tokens_per_s)
    return best, os.getloadavg()[0]


def pack_row(label: str, src: str, opts: dict, tmp: str, ids: list[int], reference, decode_tokens: int,
             outlier_rule: str | None = None) -> dict:
    out = os.path.join(tmp, re.sub(r"[^A-Za-z0-9.]+", "_", label))
    opts = dict(opts)
    keep = opts.pop("keep_embedding", False)
    kw = dict(opts, quiet=True, **({"outlier_rule": outlier_rule} if outlier_rule else {}))
    with embedding_unquantized(keep):
        m = convert(src, out, ConvertOptions(**kw))
    model = load(out, dtype=DTYPE, context=DEFAULT_WINDOW)
    t0 = time.perf_counter()
    res = evaluate(model, ids, DEFAULT_WINDOW, DEFAULT_STRIDE, reference=reference)
    eval_s = time.perf_counter() - t0
    tps, load_avg = decode_speed(model, decode_tokens) if decode_tokens else (None, None)
    size = sum(f.size for f in m.files)
    tensors = [t for l in m.layers for t in l.tensors if t.scheme != "none"]
    row = dict(label=label, kind="layerpack", bits_per_param=m.totals["bits_per_param"], size_bytes=size,
               perplexity=res.perplexity, kl=res.kl, top1=res.top1_agreement, ref_perplexity=res.reference_perplexity,
               decode_tps=tps, load=load_avg, tokens=res.tokens, eval_s=eval_s,
               mean_rel_rms=sum(t.rel_rms_error for t in tensors) / len(tensors) if tensors else 0.0)
    del model
    shutil.rmtree(out, ignore_errors=True)
    print(f"  {label}: ppl {res.perplexity:.4f}, KL {res.kl:.5f}, top-1 {res.top1_agreement:.4f}, {row['bits_per_param']:.3f} bits/param, "
          f"decode {tps or 0:.1f} tok/s, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    return row


BNB_SCRIPT = r'''
import json, sys, time, torch, transformers
sys.path.insert(0, sys.argv[3]); sys.path.insert(0, sys.argv[3] + "/runtime")
from layerpack_runtime.evaluate import evaluate, DEFAULT_WINDOW, DEFAULT_STRIDE
src, job = sys.argv[1], json.load(open(sys.argv[2]))
ids, decode_tokens = job["ids"], job["decode_tokens"]

class HF:
    def __init__(self, m): self.m, self.device = m, "cpu"
    def forward(self, x):
        with torch.no_grad():
            return self.m(x).logits.float()

class Memo(HF):
    def __init__(self, m): super().__init__(m); self.memo = {}
    def forward(self, x):
        k = tuple(x.reshape(-1).tolist())
        if k not in self.memo: self.memo[k] = super().forward(x)
        return self.memo[k]

tok = transformers.AutoTokenizer.from_pretrained(src)
ref_model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
params = sum(p.numel() for p in ref_model.parameters())
ref = Memo(ref_model)
rows = []
for label, cfg in (("transformers + bitsandbytes nf4", dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)),
                   ("transformers + bitsandbytes int8", dict(load_in_8bit=True))):
    try:
        m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                quantization_config=transformers.BitsAndBytesConfig(**cfg)).eval()
        t0 = time.perf_counter()
        r = evaluate(HF(m), ids, DEFAULT_WINDOW, DEFAULT_STRIDE, reference=ref)
        eval_s = time.perf_counter() - t0
        x = tok("The history of the printing press", return_tensors="pt")
        m.generate(**x, max_new_tokens=4, do_sample=False)
        tps = 0.0
        for _ in range(2):  # best of 2 (fewer than the packs' 3: bitsandbytes decodes slowly on CPU)
            t0 = time.perf_counter(); m.generate(**x, max_new_tokens=1, do_sample=False); t1 = time.perf_counter() - t0
            t0 = time.perf_counter(); m.generate(**x, max_new_tokens=decode_tokens + 1, do_sample=False, min_new_tokens=decode_tokens + 1)
            tps = max(tps, decode_tokens / max(time.perf_counter() - t0 - t1, 1e-9))
        import os
        load = os.getloadavg()[0]
        foot = m.get_memory_footprint()
        rows.append(dict(label=label, kind="transformers", bits_per_param=8 * foot / params, size_bytes=foot,
                         perplexity=r.perplexity, kl=r.kl, top1=r.top1_agreement, ref_perplexity=r.reference_perplexity,
                         decode_tps=tps, load=load, tokens=r.tokens, eval_s=eval_s, error=None))
    except Exception as e:
        rows.append(dict(label=label, kind="transformers", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    print(rows[-1], file=sys.stderr, flush=True)
print(json.dumps(dict(rows=rows, transformers=transformers.__version__,
                      bitsandbytes=__import__("bitsandbytes").__version__)))
'''


def bnb_rows(src: str, ids: list[int], decode_tokens: int, tmp: str) -> tuple[list[dict], str]:
    """The transformers + bitsandbytes rows, computed in a subprocess of the benchmark venv."""
    if not os.path.exists(BENCH_PY):
        return [], f"{BENCH_PY} missing (scripts/setup_bench_venv.sh)"
    job = os.path.join(tmp, "bnb_job.json")
    with open(job, "w") as f:
        json.dump({"ids": ids, "decode_tokens": decode_tokens}, f)
    script = os.path.join(tmp, "bnb_rows.py")
    with open(script, "w") as f:
        f.write(BNB_SCRIPT)
    r = subprocess.run([BENCH_PY, script, src, job, ROOT], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if r.returncode != 0:
        return [], f"subprocess failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return d["rows"], f"transformers {d['transformers']}, bitsandbytes {d['bitsandbytes']}"


def table(rows: list[dict], base: dict) -> list[str]:
    out = ["| configuration | bits/param | pack size | perplexity | vs bf16 | KL vs bf16 (nats/token) | top-1 agreement | decode tokens/s | load avg |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['label']} | — | — | — | — | — | — | did not run: {r['error']} | |")
            continue
        kl = "0 (reference)" if r is base else f"{r['kl']:.5f}"
        top1 = "100% (reference)" if r is base else f"{100 * r['top1']:.2f}%"
        size = f"{r['size_bytes'] / 2**20:.1f} MiB" + (" (memory footprint)" if r["kind"] == "transformers" else "")
        out.append(f"| {r['label']} | {r['bits_per_param']:.3f} | {size} | {r['perplexity']:.4f} | "
                   f"{100 * (r['perplexity'] / r['ref_perplexity'] - 1):+.2f}% | {kl} | {top1} | {r['decode_tps']:.1f} | {r['load']:.1f} |")
    return out


def targets(rows: list[dict], recommended: str) -> list[str]:
    by = {r["label"]: r for r in rows if not r.get("error")}
    bf, i8, nf = by["source bf16"], by["int8"], by["nf4"]
    d = by[recommended]
    i8_gap = 100 * (i8["perplexity"] / bf["perplexity"] - 1)
    gap, closed = nf["perplexity"] - bf["perplexity"], nf["perplexity"] - d["perplexity"]
    extra = d["bits_per_param"] - nf["bits_per_param"]
    share = 100 * closed / gap if gap > 0 else float("nan")
    notes = []
    exp = by.get("nf4, tied embedding/head kept bf16 (experiment)")
    bnb = by.get("transformers + bitsandbytes nf4")
    if exp:
        kl_share = 100 * (nf["kl"] - exp["kl"]) / nf["kl"]
        gap_share = 100 * (nf["perplexity"] - exp["perplexity"]) / gap if gap > 0 else float("nan")
        notes.append(f"- The tied embedding is also the output head: keeping it bf16 (experiment row, {exp['bits_per_param']:.2f} "
                     f"bits/param) removes {kl_share:.0f}% of nf4's KL ({nf['kl']:.3f} → {exp['kl']:.3f}) and {gap_share:.0f}% of "
                     f"its perplexity gap ({nf['perplexity']:.2f} → {exp['perplexity']:.2f})"
                     + (f"; that is what bitsandbytes does, and its nf4 row lands at the same place (KL {bnb['kl']:.3f}, "
                        f"perplexity {bnb['perplexity']:.2f}): the two nf4 implementations agree, only the choice of what "
                        "to quantize differs." if bnb else "."))
    return notes + [
        f"- Target 1, int8 perplexity within 0.5% of bf16: {i8_gap:+.3f}% → **{'met' if abs(i8_gap) <= 0.5 else 'not met'}**.",
        f"- Target 2, {recommended} (the recommended setting) closes ≥ 30% of plain nf4's perplexity gap "
        f"at ≤ 0.25 extra bits/param: closes {share:.1f}% of the gap ({nf['perplexity']:.4f} → {d['perplexity']:.4f}, bf16 "
        f"{bf['perplexity']:.4f}) for {extra:+.3f} bits/param → **{'met' if share >= 30 and extra <= 0.25 else 'not met'}**.",
        *_best_within(by, nf, gap, 0.25),
    ]


def _best_within(by: dict, nf: dict, gap: float, extra_bits: float) -> list[str]:
    """The nf4 + outliers row closing most of the perplexity gap within `extra_bits` (the best choice differs per model)."""
    cands = [r for label, r in by.items() if label.startswith("nf4 +") and r["bits_per_param"] - nf["bits_per_param"] <= extra_bits]
    if not cands or gap <= 0:
        return []
    best = min(cands, key=lambda r: r["perplexity"])
    return [f"- Best outlier setting within +{extra_bits} bits/param on this model: {best['label']}, closing "
            f"{100 * (nf['perplexity'] - best['perplexity']) / gap:.1f}% of the gap for "
            f"{best['bits_per_param'] - nf['bits_per_param']:+.3f} bits/param."]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS), help="model from scripts/fetch_models.py")
    ap.add_argument("--src", help="HF checkpoint folder [default: --model via scripts/fetch_models.py]")
    ap.add_argument("--max-tokens", type=int, default=2048, help="tokens of the default text evaluated")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--no-bnb", action="store_true", help="skip the transformers + bitsandbytes rows")
    ap.add_argument("--json", default=None, help="write the rows here (for scripts/plot_quality.py)")
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md between this script's markers")
    args = ap.parse_args()
    src = args.src or fetch_src(args.model)
    model_name, model_note, markers, plot = MODELS[args.model]
    text, text_id = default_text()
    load0 = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="bench_quality_", dir="/tmp")
    try:
        bf16_dir = os.path.join(tmp, "reference")
        convert(src, bf16_dir, ConvertOptions(quant="none", quiet=True))
        ref_model = load(bf16_dir, dtype=DTYPE, context=DEFAULT_WINDOW)
        ids = ref_model.tokenizer.encode(text)[: args.max_tokens]
        reference = CachedModel(ref_model)
        rows = [pack_row(label, src, opts, tmp, ids, reference, args.decode_tokens) for label, opts in CONFIGS]
        bnb, bnb_versions = ([], "skipped (--no-bnb)") if args.no_bnb else bnb_rows(src, ids, args.decode_tokens, tmp)
        rows += bnb
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    cmd = "python scripts/bench_quality.py " + " ".join(sys.argv[1:])
    section = "\n".join([
        "## Quality: perplexity, KL and top-1 agreement per scheme" + ("" if args.model == "smollm2" else f" ({model_name})"),
        "",
        f"`{cmd.strip()}` on {os.path.basename(src.rstrip('/'))} ({model_name}; {model_note}), "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}.",
        "",
        f"Text: {text_id}, first {len(ids)} tokens; sliding window {DEFAULT_WINDOW}, stride {DEFAULT_STRIDE} "
        f"({rows[0]['tokens']} tokens scored); fp32 compute for every row (the weights are what differs). KL = mean "
        "KL(bf16 ‖ row) of the next-token distributions at the scored positions; top-1 = share of positions where both "
        f"pick the same token. Outliers use the `{ConvertOptions().outlier_rule}` rule (the converter's default, chosen by the sweep below). "
        f"Decode: greedy, {args.decode_tokens} tokens after a short prompt, fp32, everything resident, best of "
        f"{DECODE_REPEATS} runs (bitsandbytes: 2), with the 1-minute load average right after; "
        f"**noisy**: other agents share the 2 cores (load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end). "
        f"bitsandbytes rows: {bnb_versions}, via transformers on CPU against transformers' own fp32 model; their size is "
        "`get_memory_footprint()` (bitsandbytes keeps the embedding in fp32 here), not a file.",
        "",
        *table(rows, rows[0]),
        "",
        *targets(rows, RECOMMENDED),
        "",
        f"![perplexity and KL vs bits/param]({plot})",
    ])
    print(section)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "text": text_id, "tokens": rows[0]["tokens"], "model": model_name}, f, indent=1)
    if args.record:
        record(section, *markers)
        print(f"recorded in {os.path.join(ROOT, 'BENCHMARKS.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
