"""The manifest's layer list against the family's declared contract (models/<family>.py): units in
execution order, each with a file of its own; each tensor's name, unit, shape and scheme as the contract
says; parameter counts; and the bytes the tensors need bounded by the file that must hold them."""
from __future__ import annotations

from typing import Any

import torch

from ..errors import FormatError
from ..format import (
    COMPRESS_ZSTD, DTYPE_NAMES, MAX_TENSOR_RANK, MAX_ZSTD_RATIO, SCHEME_INT8, SCHEME_NF4, SCHEME_NONE, UNIT_BLOCK,
    UNIT_EMBED, UNIT_HEAD, ZSTD_SMALL_BYTES, unit_name,
)
from ..models import contract, family_of_pack
from .fields import checked_block_size, checked_int, checked_number, checked_type, field_error, numel, one_of, shown


def _stored_min_bytes(t: dict, dtype_bytes: int) -> int:
    n = numel(t["shape"])
    return {SCHEME_NONE: n * dtype_bytes, SCHEME_INT8: n, SCHEME_NF4: (n + 1) // 2}[t["scheme"]]


def check_layers(layers: list, a: dict, q: dict, sizes: dict[str, int]) -> None:
    fam = family_of_pack(a.get("family"))  # the family's declared contract (models/<family>.py)
    dtype_bytes = torch.empty(0, dtype=DTYPE_NAMES[q["dtype"]]).element_size()
    used: dict[str, str] = {}
    moe_blocks = set(a["moe"]["layers"]) if a.get("moe") else set()
    for i, l in enumerate(layers):
        p = f"layers[{i}]"
        checked_type(l, dict, p)
        kind, index = (UNIT_EMBED, None) if i == 0 else (UNIT_HEAD, None) if i == len(layers) - 1 else (UNIT_BLOCK, i - 1)
        want = unit_name(kind, index)
        if l.get("name") != want or l.get("kind") != kind or l.get("index") != index:
            raise field_error(p, f"must be unit {want!r} (kind {kind!r}, index {index}) in execution order, not name "
                        f"{shown(l.get('name'))} kind {shown(l.get('kind'))} index {shown(l.get('index'))}")
        f = l.get("file")
        if not one_of(f, sizes):
            raise FormatError(f"layer {want!r} refers to {shown(f)}, which the manifest's file list lacks")
        if f in used:
            raise field_error(f"{p}.file", f"{f!r} is already the file of layer {used[f]!r} (each layer has a file of its own)")
        used[f] = want
        checked_int(l.get("params"), f"{p}.params")
        tensors = checked_type(l.get("tensors"), list, f"{p}.tensors")
        names, implied, params = set(), 0, 0
        for j, t in enumerate(tensors):
            tp = f"{p}.tensors[{j}]"
            _check_tensor(t, tp, q, a, fam, kind, index in moe_blocks if index is not None else False)
            if t["name"] in names:
                raise field_error(f"{tp}.name", f"{t['name']!r} appears twice in layer {want!r}")
            names.add(t["name"])
            implied += _stored_min_bytes(t, dtype_bytes)
            params += numel(t["shape"])
        if kind == UNIT_HEAD and ("head.weight" in names) == bool(a.get("tie_word_embeddings")):
            # a tied model's head is the embedding: a head.weight beside it would be silently ignored
            raise field_error(f"{p}.tensors", f"head.weight {'present' if 'head.weight' in names else 'absent'} but "
                        f"architecture.tie_word_embeddings is {a.get('tie_word_embeddings')}")
        if l["params"] != params:
            raise field_error(f"{p}.params", f"{l['params']} != {params}, the sum of its tensors' elements")
        # Bounded by the bytes present: the file (whose size is checked on disk) must hold the tensors.
        budget = sizes[f] * (MAX_ZSTD_RATIO if q.get("compression") == COMPRESS_ZSTD else 1) + ZSTD_SMALL_BYTES * len(tensors)
        if implied > budget:
            raise field_error(p, f"its tensors need at least {implied} bytes, more than {f} ({sizes[f]} bytes) can hold")


def _check_tensor(t: Any, p: str, q: dict, a: dict, fam, kind: str, moe_block: bool) -> None:
    checked_type(t, dict, p)
    name = checked_type(t.get("name"), str, f"{p}.name")
    shape = checked_type(t.get("shape"), list, f"{p}.shape")
    if not 1 <= len(shape) <= MAX_TENSOR_RANK:
        raise field_error(f"{p}.shape", f"rank {len(shape)} is not in 1..{MAX_TENSOR_RANK}")
    for k, dim in enumerate(shape):
        checked_int(dim, f"{p}.shape[{k}]", lo=1)
    why = contract.check_tensor_name(fam, name, kind, a, moe_block)
    if why:
        raise field_error(f"{p}.name", why)
    want = contract.shape_of(fam, name, a)
    if tuple(shape) != want:
        raise field_error(f"{p}.shape", f"{name} has shape {shape}, the architecture implies {list(want)}")
    scheme = t.get("scheme")
    declared = fam.tensor(name)[1].quantizable
    if scheme not in (SCHEME_NONE, q["scheme"]) or (scheme != SCHEME_NONE and declared is False):
        raise field_error(f"{p}.scheme", f"{shown(scheme)} for {name} in a {q['scheme']} pack")
    if scheme != SCHEME_NONE and not contract.is_quantizable(fam, name, a):
        raise field_error(f"{p}.scheme", "an untied embedding is never quantized (FORMAT.md: the embedding rule)" if name == "embed.weight"
                    else f"{name} is quantized only when architecture.{declared} is true")
    n = numel(shape)
    if scheme == SCHEME_NONE:
        if t.get("block_size") is not None or t.get("outliers", 0) != 0:
            raise field_error(p, f"unquantized {name} must have block_size null and no outliers")
    else:
        checked_block_size(t.get("block_size"), f"{p}.block_size")
        if t["block_size"] != q["block_size"]:  # the converter uses one block size per pack
            raise field_error(f"{p}.block_size", f"{t['block_size']} != quantization.block_size {q['block_size']}")
        checked_int(t.get("outliers", 0), f"{p}.outliers", hi=n - 1)
    checked_number(t.get("rel_rms_error", 0.0), f"{p}.rel_rms_error", lo=0)

