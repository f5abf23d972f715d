"""Packs of any declared size as sparse files, for the large-size tests (tests/large/test_large_sizes.py).

A layer file is a valid safetensors header followed by a hole of the payload's size (os.truncate:
no disk blocks, reads return zeros), with real bytes placed only where a test asks (e.g. past
2^32). The manifest is a real one (same fields as the converter's), with the sizes of these files,
so a 126-block, 230 GB 405B-shaped pack opens, validates and plans on a CI machine in a second.
Payloads are zeros: absmax 0 and codes 0 are valid, so only outlier tables (which must be strictly
increasing) need real bytes when a test reads them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct

from layerpack_runtime.format import (DTYPE_NAMES, FORMAT_NAME, FORMAT_VERSION, META_FORMAT, META_UNIT, SCHEME_NONE, TORCH_TO_ST,
                                      UNIT_BLOCK, UNIT_EMBED, UNIT_HEAD, unit_file, unit_name)
from layerpack_runtime.manifest import TensorEntry
from layerpack_runtime.safetensors_io import itemsize
from layerpack_runtime.models import contract, family_of_pack
from layerpack_runtime.validate import stored_spec

FAKE_SHA = "0" * 64  # files whose hash a test never checks (hashing 230 GB of holes is not the point)
HASH_UP_TO = 64 << 20  # smaller layer files get their real sha256
LLAMA_BLOCK = ("attn_norm.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
               "mlp_norm.weight", "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight")
QUANTIZABLE = {"attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "mlp.gate.weight", "mlp.up.weight",
               "mlp.down.weight", "head.weight"}

# Llama 3.1 405B (its config.json): the dimensions issue 12 names.
LLAMA_405B = dict(vocab_size=128256, hidden_size=16384, intermediate_size=53248, num_layers=126, num_heads=128,
                  num_kv_heads=8, head_dim=128, max_position_embeddings=131072, tie_word_embeddings=False,
                  rope={"type": "llama3", "theta": 500000.0, "scaling": {"factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})


def write_sparse_safetensors(path: str, unit: str, spec: dict[str, tuple[str, tuple[int, ...]]],
                             fill: dict[str, list[tuple[int, bytes]]] | None = None) -> dict:
    """A safetensors file of the tensors `spec` ({name: (ST dtype, shape)}) in the writer's order (by
    element size descending, then name), payload a hole except `fill` ({name: [(byte offset in the
    tensor, bytes)]}). Returns {size, data_start, starts: {name: absolute offset}}."""
    items = sorted(spec.items(), key=lambda kv: (-itemsize(kv[1][0]), kv[0]))
    header: dict = {"__metadata__": {META_FORMAT: f"{FORMAT_NAME}/{FORMAT_VERSION}", META_UNIT: unit}}
    offset, rel = 0, {}
    for name, (dtype, shape) in items:
        nbytes = math.prod(shape) * itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        rel[name] = offset
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data_start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(data_start + offset)
        for name, pieces in (fill or {}).items():
            for at, data in pieces:
                f.seek(data_start + rel[name] + at)
                f.write(data)
    return {"size": data_start + offset, "data_start": data_start, "starts": {n: data_start + o for n, o in rel.items()}}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _unit_tensors(kind: str, arch: dict) -> list[str]:
    if kind == UNIT_EMBED:
        return ["embed.weight"]
    if kind == UNIT_HEAD:
        return ["norm.weight"] + ([] if arch["tie_word_embeddings"] else ["head.weight"])
    return list(LLAMA_BLOCK)


def sparse_pack(out: str, template: str, arch: dict, scheme: str = "nf4", block_size: int | None = 64,
                outlier_fraction: float = 0.0, dtype: str = "bf16", fill: dict | None = None) -> dict:
    """A llama-family pack at `out` with the architecture `template`'s manifest has, updated by `arch`
    (dimensions, num_layers, ...), every layer file sparse. `template`: a converted pack (its config,
    tokenizer and manifest fields are reused). fill: {unit: {stored name: [(offset, bytes)]}}.
    Returns {unit: write_sparse_safetensors(...) result}."""
    with open(os.path.join(template, "manifest.json")) as f:
        m = json.load(f)
    a = {**m["architecture"], **arch, "family": "llama", "layer_types": None}
    fam = family_of_pack("llama")
    block_size = None if scheme == SCHEME_NONE else block_size
    pack_dtype = TORCH_TO_ST[DTYPE_NAMES[dtype]]
    os.makedirs(os.path.join(out, "layers"), exist_ok=True)
    files = [f for f in m["files"] if not f["path"].startswith("layers/")]
    for f in files:
        shutil.copyfile(os.path.join(template, f["path"]), os.path.join(out, f["path"]))
    units = [(UNIT_EMBED, None), *((UNIT_BLOCK, i) for i in range(a["num_layers"])), (UNIT_HEAD, None)]
    layers, written, params_total, layer_bytes = [], {}, 0, 0
    for kind, index in units:
        name = unit_name(kind, index)
        entries, spec = [], {}
        for t in _unit_tensors(kind, a):
            shape = list(contract.shape_of(fam, t, a))
            n = math.prod(shape)
            q = scheme != SCHEME_NONE and t in QUANTIZABLE
            e = TensorEntry(t, shape, scheme if q else SCHEME_NONE, block_size if q else None,
                            int(round(outlier_fraction * n)) if q else 0, 0.0)
            entries.append(e)
            spec.update(stored_spec(e, pack_dtype))
        res = write_sparse_safetensors(os.path.join(out, unit_file(name)), name, spec, (fill or {}).get(name))
        written[name] = res
        params = sum(math.prod(e.shape) for e in entries)
        layers.append({"name": name, "kind": kind, "index": index, "file": unit_file(name), "params": params,
                       "tensors": [{"name": e.name, "shape": e.shape, "scheme": e.scheme, "block_size": e.block_size,
                                    "outliers": e.outliers, "rel_rms_error": 0.0} for e in entries]})
        files.append({"path": unit_file(name), "size": res["size"], "sha256": _sha256(os.path.join(out, unit_file(name)))
                      if res["size"] <= HASH_UP_TO else FAKE_SHA})
        params_total += params
        layer_bytes += res["size"]
    m.update(architecture=a, layers=layers, files=sorted(files, key=lambda f: f["path"]),
             totals={"params": params_total, "layer_bytes": layer_bytes, "bits_per_param": round(8 * layer_bytes / params_total, 4)})
    m["quantization"].update(scheme=scheme, block_size=block_size, dtype=dtype, outlier_fraction=outlier_fraction,
                             compression="none", zstd_level=None, quantized_embedding=False)
    if not outlier_fraction:
        m["quantization"].pop("outlier_rule", None)
    m.pop("quality", None)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(m, f, indent=1, sort_keys=True)
    return written
