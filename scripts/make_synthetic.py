#!/usr/bin/env python3
"""Write a Hugging Face checkpoint with Llama 3.1's real configuration (405B or 8B) but N decoder
layers, or a ready pack of random codes of the same shapes without converting anything.

    python scripts/make_synthetic.py OUT [--shape llama3-405b|llama3-8b] [--layers 2] [--tokenizer DIR] [--seed 0]
    python scripts/make_synthetic.py --pack OUT --quant nf4|int8|none [--shape ...] [--layers N] [--outliers F]
                                     [--workers N] [--overwrite]

Shapes (--shape; default llama3-405b), each its model's config.json but for num_hidden_layers:
- llama3-405b: hidden 16384, intermediate 53248, 128 heads, 8 KV heads of 128, 126 layers: a
  decoder layer is 6.4 GB of bf16; the embedding and the head are 128256 x 16384 = 2,101,346,304
  elements, 4.2 GB each.
- llama3-8b: hidden 4096, intermediate 14336, 32 heads, 8 KV heads of 128, 32 layers: a decoder
  layer is 436 MB of bf16; the embedding and the head 1.05 GB each.
Both: vocab 128256, untied head, rope `llama3` scaling (factor 8, 8192 original context), rope theta
5e5, rms eps 1e-5. What is not real: the weights (random, see below), the layer count, and the
tokenizer (SmolLM2's by default, 49152 tokens: the embedding has more rows than the tokenizer uses,
which a pack allows), so bos/eos ids are the tokenizer's.

Checkpoint weights, tensor by tensor and chunk by chunk (memory stays ~CHUNK_ELEMS x 6 bytes
whatever the size): N(0, sigma) with sigma = 1/sqrt(fan_in) as in trained Llama layers (so
activations keep their scale through any number of layers); every input column gets a log-normal
scale (a few columns carry much larger weights, as in real checkpoints); and 1 in 10,000 entries is
replaced by a heavy-tail value of 10-40 sigma, so outlier tables have real outliers to keep.
Deterministic: each chunk is seeded from (seed, tensor name, chunk index).

Shards are at most 5 GB (a decoder layer spans two shards: attention + gate/up, then down), with
model.safetensors.index.json; each shard is written with a precomputed header, then streamed.

--pack OUT writes a pack instead (scripts/synthetic_pack.py): random codes and scales of the shapes
above, laid out, named and listed in the manifest exactly as `layerpack convert --quant Q` lays
out a checkpoint of these shapes, at disk speed (no quantization). For speed and memory
measurements, not quality.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch

CHUNK_ELEMS = 1 << 25  # 32M elements: 64 MB of bf16 per write
SHARD_LIMIT = 5 * 10**9
TAIL_FRACTION = 1e-4

LLAMA_405B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
    "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "hidden_act": "silu",
    "hidden_size": 16384, "intermediate_size": 53248, "num_attention_heads": 128, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "initializer_range": 0.02, "pretraining_tp": 1, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "use_cache": True, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],  # the tokenizer's ids replace these
}
# Llama-3.1-8B's config.json: the same but for the sizes.
LLAMA_8B = dict(LLAMA_405B, hidden_size=4096, intermediate_size=14336, num_attention_heads=32)
SHAPES = {"llama3-405b": (LLAMA_405B, 126), "llama3-8b": (LLAMA_8B, 32)}  # name -> (config, the model's layer count)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def layer_shards(cfg: dict, i: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    p = f"model.layers.{i}."
    return [
        [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
         (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
         (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
         (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h))],
        [(p + "mlp.down_proj.weight", (h, inter))],
    ]


def shard_plan(cfg: dict) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    groups = [[("model.embed_tokens.weight", (vocab, h))]]
    for i in range(cfg["num_hidden_layers"]):
        groups += layer_shards(cfg, i)
    groups.append([("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))])
    n = len(groups)
    plan = [(f"model-{k + 1:05d}-of-{n:05d}.safetensors", g) for k, g in enumerate(groups)]
    for name, g in plan:
        size = sum(2 * math.prod(s) for _, s in g)
        assert size <= SHARD_LIMIT, (name, size)
    return plan


def _generator(seed: int, name: str, chunk: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed << 40) ^ (zlib.crc32(name.encode()) << 8) ^ chunk)


def column_scales(seed: int, name: str, cols: int) -> torch.Tensor:
    """Per input column: log-normal(0, 0.5), a few columns several times the typical scale."""
    return torch.exp(0.5 * torch.randn(cols, generator=_generator(seed, name + "#cols", 0)))


def chunks(seed: int, name: str, shape: tuple[int, ...]):
    """The tensor's bf16 values, CHUNK_ELEMS (whole rows) at a time."""
    if len(shape) == 1:  # norm weights: around 1, like trained RMSNorm gains
        g = _generator(seed, name, 0)
        yield (1.0 + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        return
    rows, cols = shape
    sigma = 1.0 / math.sqrt(cols)
    scale = column_scales(seed, name, cols) * sigma
    step = max(1, CHUNK_ELEMS // cols)
    for c, r0 in enumerate(range(0, rows, step)):
        g = _generator(seed, name, c)
        r = min(step, rows - r0)
        w = torch.randn((r, cols), generator=g).mul_(scale)
        n = w.numel()
        k = max(1, int(n * TAIL_FRACTION))
        idx = torch.randint(0, n, (k,), generator=g)
        mag = sigma * (10 + 30 * torch.rand(k, generator=g))
        sign = torch.randint(0, 2, (k,), generator=g).float() * 2 - 1
        w.view(-1)[idx] = mag * sign
        yield w.to(torch.bfloat16)
        del w


def write_shard(path: str, tensors: list[tuple[str, tuple[int, ...]]], seed: int, progress) -> int:
    """A safetensors file, header first (every size is known), then each tensor streamed."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors:
            for w in chunks(seed, name, shape):
                f.write(memoryview(w.view(torch.uint8).numpy()))
                progress(w.numel() * 2)
    os.replace(tmp, path)
    return offset + 8 + len(raw)


def model_config(shape: str, layers: int, tokenizer: str) -> dict:
    """config.json of `shape` with `layers` decoder layers and the tokenizer's special ids (so that
    its EOS ends generation)."""
    cfg = dict(SHAPES[shape][0], num_hidden_layers=layers)
    tok_cfg_path = os.path.join(tokenizer, "config.json")
    if tokenizer and os.path.isfile(tok_cfg_path):
        with open(tok_cfg_path) as f:
            tok_cfg = json.load(f)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if tok_cfg.get(key) is not None:
                cfg[key] = tok_cfg[key]
    return cfg


def hf_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint: (HF name, shape), in shard order."""
    return [t for _, group in shard_plan(cfg) for t in group]


def write_checkpoint(out: str, cfg: dict, *, tokenizer: str, seed: int = 0, marker_extra: dict | None = None,
                     workers: int = 1, quiet: bool = False) -> None:
    """The checkpoint of config `cfg` in folder `out` (nothing to do when a complete one of the same
    layers, seed and size is there), `workers` shards at once (the same bytes whatever the number)."""
    plan = shard_plan(cfg)
    total = sum(2 * math.prod(s) for _, g in plan for _, s in g)
    marker = os.path.join(out, ".complete")
    want = {"layers": cfg["num_hidden_layers"], "seed": seed, "version": 1, "bytes": total, **(marker_extra or {})}
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == want:
                print(f"{out}: already complete ({total / 1e9:.1f} GB)", file=sys.stderr)
                return
    os.makedirs(out, exist_ok=True)
    need = total - sum(os.path.getsize(os.path.join(out, n)) for n, _ in plan if os.path.isfile(os.path.join(out, n)))
    free = shutil.disk_usage(out).free
    if need > free:
        sys.exit(f"error: {out}: needs {need / 1e9:.1f} GB more, {free / 1e9:.1f} GB free")
    done, t0 = [0], time.perf_counter()

    def progress(n: int) -> None:
        done[0] += n
        if not quiet and sys.stderr.isatty():
            rate = done[0] / max(1e-9, time.perf_counter() - t0)
            print(f"\r  {done[0] / 1e9:6.1f} / {total / 1e9:.1f} GB  {rate / 1e6:5.0f} MB/s", end="", file=sys.stderr)

    weight_map = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:  # shards at once: torch's generators release the GIL
        futures = [pool.submit(write_shard, os.path.join(out, fname), tensors, seed, progress) for fname, tensors in plan]
        for (fname, tensors), fut in zip(plan, futures):
            fut.result()
            weight_map.update({n: fname for n, _ in tensors})
            if not quiet:
                print(f"\n  wrote {fname} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    copy_tokenizer(tokenizer, out)
    with open(marker, "w") as f:
        json.dump(want, f)
    print(f"{out}: {cfg['num_hidden_layers']} layer(s), {total / 1e9:.1f} GB in {len(plan)} shards, "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)


def copy_tokenizer(tokenizer: str, out: str) -> None:
    for name in TOKENIZER_FILES if tokenizer else ():
        if os.path.isfile(os.path.join(tokenizer, name)) and name != "generation_config.json":
            shutil.copy(os.path.join(tokenizer, name), os.path.join(out, name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="checkpoint folder to write (or use --pack)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-405b")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (405B has 126, 8B 32)")
    ap.add_argument("--tokenizer", default=os.path.expanduser("~/.cache/layerpack/models/smollm2"),
                    help="folder with a tokenizer.json (scripts/fetch_models.py smollm2 puts SmolLM2's here); "
                         "'' for none (the pack then takes token ids only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--pack", metavar="OUT", help="write a ready pack of random codes here instead of a checkpoint")
    ap.add_argument("--quant", choices=("nf4", "int8", "none"), help="--pack: the pack's scheme (none: bf16)")
    ap.add_argument("--outliers", type=float, default=0.0,
                    help="--pack: fraction of each quantized weight's entries stored exactly (default 0)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="files (shards, layer files) written at once")
    ap.add_argument("--overwrite", action="store_true", help="--pack: replace what OUT holds")
    a = ap.parse_args()
    if (a.out is None) == (a.pack is None):
        sys.exit("error: give either a checkpoint folder OUT or --pack OUT")
    if (a.pack is None) != (a.quant is None):
        sys.exit("error: --pack and --quant go together (--quant nf4|int8|none)")
    if a.pack is None and (a.outliers or a.overwrite):
        sys.exit("error: --outliers and --overwrite apply to --pack only")
    full = SHAPES[a.shape][1]
    if not 1 <= a.layers <= full:
        sys.exit(f"error: --layers must be in 1..{full} for {a.shape}")
    if a.workers < 1:
        sys.exit("error: --workers must be >= 1")
    if a.tokenizer and not os.path.isfile(os.path.join(a.tokenizer, "tokenizer.json")):
        sys.exit(f"error: {a.tokenizer} has no tokenizer.json (run scripts/fetch_models.py smollm2, or pass --tokenizer)")
    cfg = model_config(a.shape, a.layers, a.tokenizer)
    if a.pack is None:  # the 405B marker keeps its old fields: checkpoints made before --shape stay complete
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // a.workers))  # shards run in parallel, not their ops
        write_checkpoint(a.out, cfg, tokenizer=a.tokenizer, seed=a.seed, workers=a.workers, quiet=a.quiet,
                         marker_extra=None if a.shape == "llama3-405b" else {"shape": a.shape})
        return
    from synthetic_pack import PackSpec, write_pack
    from layerpack_runtime.errors import LayerpackError

    spec = PackSpec(name=f"synthetic-{a.shape}-{a.layers}L-seed{a.seed}", config=cfg, tensors=hf_tensors(cfg),
                    quant=a.quant, outliers=a.outliers, seed=a.seed)
    try:
        write_pack(a.pack, spec, sidecars=lambda folder: copy_tokenizer(a.tokenizer, folder), workers=a.workers,
                   overwrite=a.overwrite, quiet=a.quiet)
    except LayerpackError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
