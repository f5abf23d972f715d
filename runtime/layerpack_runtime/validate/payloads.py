"""Payloads as they are read (`check_payload`): what a header cannot vouch for, checked on the bytes: absmax
finite and >= 0, outlier tables in range and strictly increasing, outlier values finite, the zero code at
outlier positions. Cheap vectorised reductions over the small tensors only."""
from __future__ import annotations

import math
from typing import Iterable

import torch

from ..errors import FormatError
from ..format import (
    NF4_ZERO_CODE, SCHEME_NF4, SCHEME_NONE, SUFFIX_ABSMAX, SUFFIX_CODES, SUFFIX_OUTLIER_IDX, SUFFIX_OUTLIER_VAL,
)
from .fields import numel

# Tests and the overhead benchmark switch payload checks off to measure them; nothing else should.
PAYLOAD_CHECKS = True
# A unit's tables are concatenated for one reduction only while they are this small: past it the
# concatenation's allocation and copy cost more than the calls it saves (a 405B NF4 block holds 50M
# scales: torch.cat took 0.19 s, the reduction 0.016 s, in the streamer's reader thread, where it
# delays the next read; BENCHMARKS.md, 405B verify pass).
CAT_MAX_ELEMS = 1 << 20


def check_payload(entries: Iterable, stored: dict[str, torch.Tensor], path: str) -> None:
    """Values a header cannot vouch for, checked on the bytes just read (quantized entries whose
    tables are in `stored`): absmax finite and >= 0; outlier indices strictly increasing within
    [0, n); outlier values finite. The unit's scales are checked as one concatenated tensor and its
    outlier values likewise while they are small (per-call overhead, not bytes, dominates small
    tables), one reduction per tensor past CAT_MAX_ELEMS; the culprit is looked for only on failure."""
    if not PAYLOAD_CHECKS:
        return
    quantized = [t for t in entries if t.scheme != SCHEME_NONE and t.name + SUFFIX_ABSMAX in stored]
    if not quantized:
        return
    scales = [stored[t.name + SUFFIX_ABSMAX].reshape(-1) for t in quantized]
    if not _each(_scales_ok, scales):
        bad = next(t for t, a in zip(quantized, scales) if not _scales_ok(a))
        raise FormatError(f"{path}: {bad.name}{SUFFIX_ABSMAX} holds a negative, NaN or infinite scale")
    with_outliers = [t for t in quantized if t.outliers]
    for t in with_outliers:
        idx, val = stored[t.name + SUFFIX_OUTLIER_IDX].numpy().reshape(-1), stored[t.name + SUFFIX_OUTLIER_VAL]
        if idx.size != val.numel():
            raise FormatError(f"{path}: {t.name}: {idx.size} outlier indices but {val.numel()} values")
        if idx.size and (int(idx[0]) < 0 or int(idx[-1]) >= numel(t.shape)):
            raise FormatError(f"{path}: {t.name}{SUFFIX_OUTLIER_IDX} has an index outside [0, {numel(t.shape)})")
        if idx.size > 1 and not (idx[1:] > idx[:-1]).all():  # numpy: less per-call overhead than torch
            raise FormatError(f"{path}: {t.name}{SUFFIX_OUTLIER_IDX} is not strictly increasing (unsorted or duplicated)")
        codes = stored.get(t.name + SUFFIX_CODES)
        if codes is not None and idx.size and not _zero_codes_at(codes, idx, t.scheme):
            # the kernels add outliers to a product whose codes there must be 0 (the converter zeroes
            # them before quantizing); otherwise the fused and the dequantizing paths would disagree
            raise FormatError(f"{path}: {t.name}{SUFFIX_CODES} is not the zero code at its outlier positions")
    if with_outliers:
        vals = [stored[t.name + SUFFIX_OUTLIER_VAL].reshape(-1) for t in with_outliers]
        if not _each(_finite, vals):
            bad = next(t for t, v in zip(with_outliers, vals) if not _finite(v))
            raise FormatError(f"{path}: {bad.name}{SUFFIX_OUTLIER_VAL} holds a NaN or infinite value")


def _each(ok, tables: list[torch.Tensor]) -> bool:
    """ok() of every table: one call on their concatenation while that is small, else one per table."""
    if len(tables) > 1 and sum(t.numel() for t in tables) <= CAT_MAX_ELEMS:
        return ok(torch.cat(tables))
    return all(ok(t) for t in tables)


def _zero_codes_at(codes: torch.Tensor, idx, scheme: str) -> bool:
    flat = codes.reshape(-1).numpy()
    if scheme == SCHEME_NF4:  # two codes per byte, the first in the high nibble; NF4 code 7 is 0.0
        b = flat[idx // 2]
        return bool(((idx % 2 == 0) * (b >> 4) + (idx % 2 == 1) * (b & 15) == NF4_ZERO_CODE).all())
    return bool((flat[idx] == 0).all())


def _scales_ok(a: torch.Tensor) -> bool:
    if not a.numel():
        return True
    lo, hi = torch.aminmax(a)  # NaN propagates into both; +inf shows in hi
    return bool(lo >= 0) and bool(hi < math.inf)


def _finite(v: torch.Tensor) -> bool:
    if not v.numel():
        return True
    lo, hi = torch.aminmax(v)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def payload_tables(layer) -> list[str]:
    """Stored names whose values check_payload inspects (what `verify` reads: scales, outlier
    tables, and the codes of weights that have outliers)."""
    names = []
    for t in layer.tensors:
        if t.scheme != SCHEME_NONE:
            names.append(t.name + SUFFIX_ABSMAX)
            if t.outliers:  # and the codes, whose outlier positions must hold the zero code
                names += [t.name + SUFFIX_OUTLIER_IDX, t.name + SUFFIX_OUTLIER_VAL, t.name + SUFFIX_CODES]
    return names
