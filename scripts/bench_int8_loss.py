#!/usr/bin/env python3
"""Where int8 loses perplexity: one tensor type at a time quantized, the rest kept at the source's
values, on held-out text; and whole-model int8 variants (block size, scale precision, rounding)
next to llama.cpp's Q8_0 rule applied to the same weights.

    python scripts/bench_int8_loss.py [--model smollm2|gemma3] [--tokens 768] [--only LIST] [--record]

How: transformers runs the source checkpoint in float32 (runtime/transformers logits parity is
tested elsewhere, so this is the runtime's arithmetic up to summation order); a row replaces the
selected weights in place by what a pack reconstructs - layerpack.quantizer.quantize_tensor (the
converter's own code) then layerpack_runtime.quant.dequantize_weight in float32, which is what
`layerpack eval` computes with - runs the text, and puts the weights back. The "Q8_0 rule" rows
apply ggml's quantize_row_q8_0_ref (blocks of 32, scale amax/127 stored as fp16, round half away
from zero) to the same tensors llama.cpp's Q8_0 quantizes (every 2-D weight, the tied embedding
included): the peer's weight rounding measured inside the same forward, without its Q8_0
activation rounding. Text: layerpack_runtime.evaluate's default (pydoc topics; the calibration text
of `convert --calibrate` is a different file, so this is held out), windows of 512 / stride 256.

Reported per row: perplexity change against the source, its standard error (paired: the std of the
per-token log-likelihood differences / sqrt(tokens), in %), and KL(source || row) in nats/token.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import machine, record  # noqa: E402

from layerpack.quantizer import quantize_tensor  # noqa: E402
from layerpack_runtime.evaluate import DEFAULT_STRIDE, DEFAULT_WINDOW, default_text, windows  # noqa: E402
from layerpack_runtime.format import DEFAULT_BLOCK_SIZE, SCHEME_INT8  # noqa: E402
from layerpack_runtime.quant import dequantize_weight  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"embed/head": r"embed_tokens", "attn.q": r"q_proj", "attn.k": r"k_proj", "attn.v": r"v_proj",
         "attn.o": r"o_proj", "mlp.gate": r"gate_proj", "mlp.up": r"up_proj", "mlp.down": r"down_proj"}


def kind_of(param: str) -> str | None:
    for kind, pat in KINDS.items():
        if re.search(pat, param) and param.endswith(".weight"):
            return kind
    return None


def layerpack_int8(w: torch.Tensor, block_size: int | None = None, outliers: float = 0.0) -> torch.Tensor:
    """What an int8 pack reconstructs for w (the converter's quantizer, the runtime's dequantization)."""
    from dataclasses import asdict
    stored, entry = quantize_tensor("w", w, SCHEME_INT8, w.dtype, block_size or DEFAULT_BLOCK_SIZE[SCHEME_INT8], outliers)
    return dequantize_weight(stored, "w", asdict(entry), torch.float32)


def q8_0_rule(w: torch.Tensor) -> torch.Tensor:
    """ggml quantize_row_q8_0_ref then dequantize_row_q8_0: blocks of 32 along the rows, d = amax/127
    as fp16, q = roundf(x / d) (half away from zero)."""
    x = w.float().reshape(-1, 32)
    d = x.abs().amax(1, keepdim=True) / 127
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    v = x * inv
    q = torch.trunc(v + 0.5 * torch.sign(v))  # roundf
    return (q * d.half().float()).reshape(w.shape)


class Runner:
    def __init__(self, src: str, tokens: int):
        import transformers
        self.model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(src)
        text, self.text_id = default_text()
        self.ids = torch.tensor(tok(text)["input_ids"][:tokens])
        self.wins = windows(self.ids.numel(), DEFAULT_WINDOW, DEFAULT_STRIDE)
        self.params = {n: p for n, p in self.model.named_parameters() if kind_of(n)}
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.params.pop("lm_head.weight", None)  # the same tensor as the embedding
        self.source = {n: p.detach().clone() for n, p in self.params.items()}  # float32 copies of the bf16 values
        self.ref = self._logprobs()  # per window: float32 log-probabilities at the scored positions

    @torch.inference_mode()
    def _logprobs(self):
        out = []
        for begin, end, first in self.wins:
            logits = self.model(self.ids[begin:end][None]).logits[0]
            out.append(torch.log_softmax(logits[first - 1 - begin: end - 1 - begin].float(), -1))
        return out

    def targets(self):
        return [self.ids[first:end] for _, end, first in self.wins]

    @torch.no_grad()  # not inference_mode: the quantizer fills its tensors on a thread pool
    def row(self, replace) -> dict:
        """replace(name, float32 source weight) -> float32 weight, or None to keep it."""
        changed = 0
        for n, p in self.params.items():
            new = replace(n, self.source[n].to(torch.bfloat16))
            if new is not None:
                p.copy_(new)
                changed += 1
        try:
            lp = self._logprobs()
        finally:
            for n, p in self.params.items():
                p.copy_(self.source[n])
        return compare(self.ref, lp, self.targets()) | {"changed": changed}

    def ref_ppl(self) -> float:
        nll = torch.cat([-rp.gather(1, t[:, None])[:, 0] for rp, t in zip(self.ref, self.targets())]).double()
        return math.exp(nll.mean().item())


LLAMACPP_WORKER = r"""
import json, math, sys
import numpy as np, llama_cpp
job = json.load(open(sys.argv[1]))
ids = job["ids"]
out = {}
for label, path in job["ggufs"].items():
    llm = llama_cpp.Llama(path, n_ctx=job["window"], n_batch=job["window"], n_ubatch=job["window"], logits_all=True,
                          n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False)
    per = []
    for begin, end, first in job["windows"]:
        llm.reset()
        llm.eval(ids[begin:end])
        z = np.asarray(llm.scores[first - 1 - begin: end - 1 - begin], dtype=np.float64)
        z -= z.max(1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(1, keepdims=True))
        per.append(lp.astype(np.float32))
    out[label] = per
    del llm
np.savez(job["out"], **{f"{k}_{i}": a for k, v in out.items() for i, a in enumerate(v)})
print(json.dumps({"isa": llama_cpp.llama_print_system_info().decode().strip()}))
"""


def llamacpp_rows(src: str, r: "Runner", threads: int) -> tuple[list, str]:
    """Perplexity change and KL of llama.cpp's own Q8_0 against its own BF16 GGUF of the same
    checkpoint (converter and quantizer of llama.cpp, via scripts/bench_llamacpp.py's cached setup),
    on the same token ids and windows, computed by llama.cpp (its Q8_0 matmuls also round the
    activations to 8 bits)."""
    import json
    import tempfile
    from pathlib import Path

    import numpy as np

    import bench_llamacpp as bl
    tree = bl.ensure_llamacpp()
    work = Path(tempfile.gettempdir()) / f"bench_int8_loss_{os.path.basename(src.rstrip('/'))}"
    work.mkdir(exist_ok=True)
    bf16, q8 = work / "model-BF16.gguf", work / "model-Q8_0.gguf"
    if not bf16.exists():
        bl.run([bl.BENCH_PY, tree / "convert_hf_to_gguf.py", src, "--outtype", "bf16", "--outfile", bf16.with_suffix(".tmp")])
        os.replace(bf16.with_suffix(".tmp"), bf16)
    if not q8.exists():
        bl.run([bl.BENCH_PY, "-c", bl._QUANTIZE, bf16, q8.with_suffix(".tmp"), 7])
        os.replace(q8.with_suffix(".tmp"), q8)
    job = dict(ids=r.ids.tolist(), windows=r.wins, window=DEFAULT_WINDOW, threads=threads, out=str(work / "lp.npz"),
               ggufs={"BF16": str(bf16), "Q8_0": str(q8)})
    (work / "job.json").write_text(json.dumps(job))
    (work / "worker.py").write_text(LLAMACPP_WORKER)
    res = bl.run([bl.BENCH_PY, work / "worker.py", work / "job.json"], env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    isa = json.loads(res.stdout.strip().splitlines()[-1])["isa"]
    z = np.load(job["out"])
    lp = {k: [torch.from_numpy(z[f"{k}_{i}"]) for i in range(len(r.wins))] for k in job["ggufs"]}
    rows = []
    # llama.cpp BF16 against our float32 source forward (how far the two engines are apart), then
    # llama.cpp Q8_0 against llama.cpp BF16 (the peer's quantization loss, its own engine on both sides)
    for label, ref, q in (("llama.cpp BF16 GGUF vs this forward (engine difference)", r.ref, lp["BF16"]),
                          ("llama.cpp Q8_0 vs llama.cpp BF16 (measured by llama.cpp)", lp["BF16"], lp["Q8_0"])):
        rows.append((label, compare(ref, q, r.targets()) | {"changed": "all 2-D"}))
    return rows, isa


def compare(ref: list, lp: list, targets: list) -> dict:
    dnll, kl = [], 0.0
    for rp, qp, t in zip(ref, lp, targets):
        dnll.append(rp.gather(1, t[:, None])[:, 0] - qp.gather(1, t[:, None])[:, 0])
        kl += (rp.exp() * (rp - qp)).sum(-1).double().sum().item()
    d = torch.cat(dnll).double()
    n = d.numel()
    return dict(delta=100 * math.expm1(d.mean().item()), se=100 * d.std().item() / math.sqrt(n), kl=kl / n, tokens=n)


def per_kind(kind: str, fn):
    return lambda n, w: fn(w) if kind_of(n) == kind else None


ROWS = {
    # label -> replace(name, bf16 weight)
    "int8 block 128 (the default before issue 25)": lambda n, w: layerpack_int8(w, 128),
    "int8 block 64": lambda n, w: layerpack_int8(w, 64),
    "int8 block 32": lambda n, w: layerpack_int8(w, 32),
    "Q8_0 rule (llama.cpp, block 32, fp16 scale)": lambda n, w: q8_0_rule(w),
    "int8 block 128, embedding/head kept": lambda n, w: None if kind_of(n) == "embed/head" else layerpack_int8(w, 128),
    "int8 block 32, embedding/head kept": lambda n, w: None if kind_of(n) == "embed/head" else layerpack_int8(w, 32),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3", choices=("smollm2", "gemma3"))
    ap.add_argument("--src", help="HF checkpoint folder [default: --model via scripts/fetch_models.py]")
    ap.add_argument("--tokens", type=int, default=768, help="tokens of the default text")
    ap.add_argument("--no-kinds", action="store_true", help="skip the one-type-at-a-time rows")
    ap.add_argument("--kinds-q8-0", action="store_true", help="also the one-type-at-a-time rows with the Q8_0 rule")
    ap.add_argument("--llamacpp", action="store_true", help="also llama.cpp's own Q8_0 vs BF16 GGUF (needs .bench-venv, see bench_llamacpp.py)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--only", default=None, help="comma-separated substrings: run only the whole-model rows matching one")
    ap.add_argument("--record", action="store_true", help="write the table into BENCHMARKS.md between this script's markers")
    args = ap.parse_args()
    src = args.src or subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "fetch_models.py"), args.model, "--quiet"],
                                     check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    t0 = time.perf_counter()
    r = Runner(src, args.tokens)
    print(f"reference: ppl {r.ref_ppl():.4f} on {r.wins and sum(e - f for _, e, f in r.wins)} tokens "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    rows = []
    todo = [(label, fn) for label, fn in ROWS.items() if not args.only or any(s in label for s in args.only.split(","))]
    if not args.no_kinds:
        todo += [(f"only {k} int8 block 128", per_kind(k, lambda w: layerpack_int8(w, 128))) for k in KINDS]
        todo += [(f"only {k} int8 block 32", per_kind(k, lambda w: layerpack_int8(w, 32))) for k in KINDS]
        if args.kinds_q8_0:
            todo += [(f"only {k} Q8_0 rule", per_kind(k, q8_0_rule)) for k in KINDS]
    for label, fn in todo:
        t = time.perf_counter()
        res = r.row(fn)
        if not res["changed"]:
            continue
        rows.append((label, res))
        print(f"  {label}: {res['delta']:+.3f}% ± {res['se']:.3f}, KL {res['kl']:.5f} ({time.perf_counter() - t:.0f} s, "
              f"load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    isa = None
    if args.llamacpp:
        t = time.perf_counter()
        more, isa = llamacpp_rows(src, r, args.threads)
        rows += more
        for label, res in more:
            print(f"  {label}: {res['delta']:+.3f}% ± {res['se']:.3f}, KL {res['kl']:.5f} ({time.perf_counter() - t:.0f} s)",
                  file=sys.stderr, flush=True)
    cmd = "python scripts/bench_int8_loss.py " + " ".join(sys.argv[1:])
    lines = [f"`{cmd.strip()}` on {os.path.basename(src.rstrip('/'))}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{machine()}. Text: {r.text_id}, {rows[0][1]['tokens'] if rows else 0} tokens scored; source perplexity "
             f"{r.ref_ppl():.4f}.", "",
             "| weights replaced | tensors | ppl vs source | ± (1 s.e., paired) | KL vs source (nats/token) |", "|---|--:|--:|--:|--:|"]
    lines += [f"| {label} | {res['changed']} | {res['delta']:+.3f}% | {res['se']:.3f}% | {res['kl']:.5f} |" for label, res in rows]
    if isa:
        lines += ["", f"llama.cpp rows: llama-cpp-python {__import__('bench_llamacpp').LLAMACPP_VERSION}, GGUFs made by its own converter (BF16) and quantizer (Q8_0), {args.threads} threads; {isa[:160]}."]
    print("\n".join(lines))
    if args.record:
        record("\n".join(lines), f"<!-- bench_int8_loss_{args.model}:start -->", f"<!-- bench_int8_loss_{args.model}:end -->")


if __name__ == "__main__":
    main()
