#!/usr/bin/env python3
"""End to end on one GPU, side by side in one process: layerpack vs transformers vs transformers +
bitsandbytes NF4, resident and streamed, each with its fraction of the measured bandwidth.

    python scripts/bench_gpu.py --work /tmp/e2e [--layers 8] [--new 64] [--stream-new 12] [--json OUT.json]

A Llama-3.1-8B-shaped checkpoint (real layer shapes, `--layers` of its 32 layers, random bf16
weights, seeded) is made on the GPU with transformers and saved; `layerpack convert` makes bf16,
NF4 and int8 packs of it in parallel processes while the transformers rows run. One 32-token
prompt, `--new` greedy tokens. Decode tok/s by each tool's own definition: (new - 1) tokens over
the time after the first. Cold: the first generation of that model in this process (layerpack:
graph capture included); warm: the second.

Bandwidths measured first: device copy (bytes read + written / time, like the 4.3 TB/s figure of
an H200) and pinned host->device. Resident rows: weight bytes read per token (blocks + head as
held; the embedding is a gather) x tok/s, as a fraction of the device figure. Streamed rows: bytes
moved host->device per second of generation, as a fraction of the pinned figure.
Checks printed at the end (issue 24): bf16 >= 50% of device bandwidth and >= 5x transformers bf16;
NF4 and int8 faster than bf16; graph greedy tokens == eager fixed-shape tokens; streamed >= 70% of
pinned host->device.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9


def device_copy_gbs() -> float:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 10
    del x, y
    torch.cuda.empty_cache()
    return 2 * 2 * 1024**3 / dt / GB


def pinned_h2d_gbs() -> float:
    h = torch.empty(1024**3, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(1024**3, dtype=torch.uint8, device="cuda")
    d.copy_(h, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        d.copy_(h, non_blocking=True)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 5
    del h, d
    torch.cuda.empty_cache()
    return 1024**3 / dt / GB


def make_checkpoint(path: str, layers: int, device: str, smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2) if smoke else \
        dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
    cfg = LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=131072, rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192},
                      rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1 if smoke else 128000, eos_token_id=2 if smoke else 128001)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.eval()
    if not os.path.exists(os.path.join(path, "config.json")):
        model.save_pretrained(path, max_shard_size="2GB")
    return model


def hf_decode(model, ids: torch.Tensor, new: int) -> tuple[float, list[int]]:
    """transformers' generate: decode tok/s = (new - 1) / (time(new) - time(1)), greedy."""
    def gen(n):
        sync()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t, out
    t1, _ = gen(1)
    tn, out = gen(new)
    return (new - 1) / max(tn - t1, 1e-9), out[0, ids.shape[1]:].tolist()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def lp_generate(model, ids: list[int], new: int):
    from layerpack_runtime.generate import GenerationStats, SamplingParams, generate_tokens

    stats = GenerationStats()
    toks = [int(t[0]) for t in generate_tokens(model, [ids], new, SamplingParams(), stats=stats)]
    return stats, toks


def held_bytes(model) -> int:
    """Weight bytes a decode step reads: blocks and head as held (stored or dequantized form)."""
    total = 0
    for name in model.units:
        if name == "embed" and not model.args.tie_word_embeddings:
            continue
        c = model._unit_cost(name)
        total += c.dequantized if model.plan.resident.get(name) else c.stored
    return total


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/e2e")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--stream-new", type=int, default=12)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on this machine's device (CPU included): checks the script itself")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = 512 if a.smoke else 128256
    sys.path[:0] = [os.path.join(ROOT, "runtime"), ROOT]
    from layerpack_runtime import load

    os.makedirs(a.work, exist_ok=True)
    src = os.path.join(a.work, "src")
    rows, checks, notes = [], [], []
    dev_bw, h2d_bw = (device_copy_gbs(), pinned_h2d_gbs()) if dev == "cuda" else (float("nan"), float("nan"))
    print(f"device copy {dev_bw:.0f} GB/s, pinned host->device {h2d_bw:.1f} GB/s", flush=True)

    t = time.perf_counter()
    hf = make_checkpoint(src, a.layers, dev, a.smoke)
    print(f"checkpoint: {time.perf_counter() - t:.1f} s", flush=True)
    convs = {}
    for q in ("none", "nf4", "int8"):
        out = os.path.join(a.work, f"pack-{q}")
        if not os.path.exists(os.path.join(out, "manifest.json")):
            env = dict(os.environ, OMP_NUM_THREADS="5")
            convs[q] = subprocess.Popen([sys.executable, "-m", "layerpack.cli", "convert", src, out, "--quant", q, "--quiet"],
                                        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab - 256, (32,), generator=g).tolist()
    ids = torch.tensor([prompt], device=dev)
    weights_bf16 = sum(p.numel() * 2 for n, p in hf.named_parameters() if "embed_tokens" not in n)

    # transformers bf16 (cold = the first generate of the process, then warm)
    cold, hf_toks = hf_decode(hf, ids, a.new)
    warm, _ = hf_decode(hf, ids, a.new)
    rows.append(("transformers bf16", cold, warm, weights_bf16, dev_bw, "resident"))
    hf_bf16 = warm
    del hf
    empty_cache()
    try:
        if dev != "cuda":
            raise RuntimeError("bitsandbytes 4-bit needs CUDA")
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        bnb = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, device_map=dev, dtype=torch.bfloat16)
        cold, _ = hf_decode(bnb, ids, a.new)
        warm, _ = hf_decode(bnb, ids, a.new)
        nf4_bytes = sum(p.numel() * p.element_size() for n, p in bnb.named_parameters() if "embed_tokens" not in n)
        rows.append(("transformers + bitsandbytes NF4", cold, warm, nf4_bytes, dev_bw, "resident"))
        del bnb
        empty_cache()
    except Exception as e:  # noqa: BLE001 - a missing bitsandbytes is a row, not a crash
        notes.append(f"transformers + bitsandbytes NF4: not run ({type(e).__name__}: {str(e)[:120]})")

    for q, p in convs.items():
        out, _ = p.communicate()
        if p.returncode:
            notes.append(f"convert {q} failed: {out[-300:]}")
    results = {}
    fast = "graph" if dev == "cuda" else "static"
    for q, label in (("none", "bf16"), ("nf4", "NF4"), ("int8", "int8")):
        pack = os.path.join(a.work, f"pack-{q}")
        if not os.path.exists(os.path.join(pack, "manifest.json")):
            continue
        for mode in (fast, "dynamic"):
            m = load(pack, device=dev, decode=mode, context=len(prompt) + a.new)
            s1, toks = lp_generate(m, prompt, a.new)
            s2, toks2 = lp_generate(m, prompt, a.new)
            results[(q, mode)] = toks
            rows.append((f"layerpack {label} pack, resident, decode {mode}", s1.decode_tokens_per_s, s2.decode_tokens_per_s,
                         held_bytes(m), dev_bw, "resident"))
            if mode == fast:
                notes.append(f"{label}: {m.decode_description()}; weight form {m.weight_form}")
                if q == "none":
                    lp_bf16 = s2.decode_tokens_per_s
                eager = load(pack, device=dev, decode="static", context=len(prompt) + a.new)
                _, toks_e = lp_generate(eager, prompt, a.new)
                checks.append((f"{label}: graph greedy tokens == eager fixed-shape tokens", toks == toks_e))
                del eager
            del m
            empty_cache()
        if q == "none":
            same = sum(x == y for x, y in zip(results[(q, fast)], hf_toks))
            notes.append(f"bf16 greedy tokens equal to transformers': {same}/{a.new} (random weights: near-ties differ)")
    # streamed: budgets that hold a fraction of the blocks (GPU memory budget)
    for q, label, budget in (("none", "bf16", "40MB" if a.smoke else "4.5GB"), ("nf4", "NF4", "36MB" if a.smoke else "1GB")):
        pack = os.path.join(a.work, f"pack-{q}")
        if not os.path.exists(os.path.join(pack, "manifest.json")):
            continue
        try:
            m = load(pack, device=dev, max_memory=budget, prefetch_depth=2, context=len(prompt) + a.stream_new)
        except Exception as e:  # noqa: BLE001
            notes.append(f"{label} streamed at {budget}: {e}")
            continue
        lp_generate(m, prompt, 2)  # warm the page cache and the kernels
        s, _ = lp_generate(m, prompt, a.stream_new)
        rate = s.bytes_read / max(s.prefill_s + s.decode_s, 1e-9) / GB
        per_tok = s.bytes_read / max(s.steps, 1) / GB
        rows.append((f"layerpack {label} pack, {budget} GPU budget (streamed)", None, s.decode_tokens_per_s,
                     per_tok * GB, h2d_bw, "streamed"))
        notes.append(f"{label} streamed at {budget}: {per_tok:.2f} GB moved per token, {rate:.1f} GB/s "
                     f"= {rate / h2d_bw:.0%} of pinned host->device; {s.io_wait_s:.2f} s waiting for reads")
        checks.append((f"{label} streamed >= 70% of pinned host->device ({rate:.1f} of {h2d_bw:.1f} GB/s)", rate >= 0.7 * h2d_bw))
        del m
        empty_cache()

    print(f"\n{torch.cuda.get_device_name() if dev == 'cuda' else 'CPU (smoke)'}, torch {torch.__version__}; {a.layers} of Llama-3.1-8B's 32 layers; "
          f"32-token prompt, {a.new} greedy tokens ({a.stream_new} streamed)\n")
    print("| run | decode tok/s cold | decode tok/s warm | GB read per token | GB/s | fraction of |")
    print("|---|--:|--:|--:|--:|---|")
    for name, cold, warm, nbytes, bw, kind in rows:
        gbs = nbytes / GB * warm
        ref = f"device {bw:.0f} GB/s" if kind == "resident" else f"pinned H2D {bw:.1f} GB/s"
        print(f"| {name} | {'' if cold is None else f'{cold:.1f}'} | {warm:.1f} | {nbytes / GB:.2f} | {gbs:.0f} | {gbs / bw:.1%} of {ref} |")
    if "lp_bf16" in locals():
        checks.append((f"bf16 resident >= 5x transformers bf16 ({lp_bf16 / hf_bf16:.1f}x)", lp_bf16 >= 5 * hf_bf16))
        r = next(r for r in rows if r[0] == f"layerpack bf16 pack, resident, decode {fast}")
        checks.append((f"bf16 resident >= 50% of device bandwidth ({r[3] / GB * r[2] / dev_bw:.0%})", r[3] / GB * r[2] >= 0.5 * dev_bw))
        for label in ("NF4", "int8"):
            r = next((r for r in rows if r[0] == f"layerpack {label} pack, resident, decode {fast}"), None)
            if r:
                checks.append((f"{label} resident faster than bf16 ({r[2]:.0f} vs {lp_bf16:.0f} tok/s)", r[2] > lp_bf16))
    print()
    for n in notes:
        print(f"- {n}")
    for n, ok in checks:
        print(f"- {'PASS' if ok else 'MISS'}: {n}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "checks": checks, "notes": notes, "device_gbs": dev_bw, "h2d_gbs": h2d_bw}, f)


if __name__ == "__main__":
    main()
