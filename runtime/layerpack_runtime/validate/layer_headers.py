"""A layer file's header against its manifest entry, before any payload byte is read: stored names,
dtypes, shapes and byte counts per scheme (`stored_layout`: the format's stored layout, which the
converter writes by), zstd sizes."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ..errors import FormatError
from ..format import (
    COMPRESS_ZSTD, DTYPE_NAMES, MAX_TENSOR_RANK, MAX_ZSTD_RATIO, META_UNIT, META_ZSTD, OUTLIER_IDX_I64_FROM, SCHEME_INT8,
    SCHEME_NONE, ST_DTYPES, SUFFIX_ABSMAX, SUFFIX_CODES, SUFFIX_OUTLIER_IDX, SUFFIX_OUTLIER_VAL, TORCH_TO_ST, ZSTD_SMALL_BYTES,
)
from .fields import numel, one_of, shown


def stored_layout(name: str, shape, scheme: str, block_size: int | None, outliers: int,
                  pack_dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{stored name: (safetensors dtype, shape)} that the format prescribes for one logical tensor:
    the one statement of the stored layout (docs/FORMAT.md), used by this check and by the
    converter, which declares a layer file's header from it before any value is read."""
    n = numel(shape)
    if scheme == SCHEME_NONE:
        return {name: (pack_dtype, tuple(shape))}
    blocks = -(-n // block_size)
    # int8 codes: the converter writes them flat [n]; FORMAT.md first said "same shape as W": both hold n bytes
    spec = {name + SUFFIX_CODES: ("I8", (n,)) if scheme == SCHEME_INT8 else ("U8", ((n + 1) // 2,)),
            name + SUFFIX_ABSMAX: ("F32", (blocks,))}
    if outliers:
        spec[name + SUFFIX_OUTLIER_IDX] = ("I32" if n < OUTLIER_IDX_I64_FROM else "I64", (outliers,))
        spec[name + SUFFIX_OUTLIER_VAL] = (pack_dtype, (outliers,))
    return spec


def stored_spec(t, pack_dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The stored layout (stored_layout) of one manifest tensor entry."""
    return stored_layout(t.name, t.shape, t.scheme, t.block_size, t.outliers, pack_dtype)


def check_layer_file(layer, st, quant) -> None:
    """Every stored tensor of `st` (a parsed, self-consistent SafetensorsFile) is exactly what the
    manifest's tensor entries prescribe: names, dtypes, shapes (and so byte counts), zstd sizes."""
    pack_dtype = TORCH_TO_ST[DTYPE_NAMES[quant.dtype]]
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    int8_shapes = {}  # int8 codes may also have the weight's own shape (FORMAT.md's first wording)
    for t in layer.tensors:
        expected.update(stored_spec(t, pack_dtype))
        if t.scheme == SCHEME_INT8:
            int8_shapes[t.name + SUFFIX_CODES] = tuple(t.shape)
    if set(st.tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(st.tensors)), sorted(set(st.tensors) - set(expected))
        raise FormatError(f"{layer.file}: tensors disagree with the manifest (missing {missing[:3]}, unexpected {extra[:3]})")
    unit = st.metadata.get(META_UNIT)
    if unit is not None and unit != layer.name:
        raise FormatError(f"{layer.file}: header says unit {unit!r}, the manifest says {layer.name!r}")
    zstd = quant.compression == COMPRESS_ZSTD
    if zstd != (META_ZSTD in st.metadata):
        raise FormatError(f"{layer.file}: {'no' if zstd else 'a'} {META_ZSTD} table in a pack with compression {quant.compression!r}")
    for name, (dtype, shape) in expected.items():
        info = st.tensors[name]
        if zstd and info.logical_dtype is None:
            raise FormatError(f"{layer.file}: tensor {name!r} is not compressed in a zstd pack")
        got = tuple(info.out_shape)
        if got == int8_shapes.get(name):
            got = shape
        if (info.out_dtype, got) != (dtype, shape):
            raise FormatError(f"{layer.file}: tensor {name!r} is stored as {info.out_dtype}{list(info.out_shape)}, "
                              f"the manifest entry implies {dtype}{list(shape)}")
        if zstd:
            if info.dtype != "U8":
                raise FormatError(f"{layer.file}: compressed tensor {name!r} must be stored as U8, not {info.dtype}")
            logical = numel(shape) * torch.empty(0, dtype=ST_DTYPES[dtype]).element_size()
            if logical > max(info.nbytes * MAX_ZSTD_RATIO, ZSTD_SMALL_BYTES):
                raise FormatError(f"{layer.file}: tensor {name!r}: {info.nbytes} compressed bytes would decompress to "
                                  f"{logical} (more than {MAX_ZSTD_RATIO}x: refused as a decompression bomb)")


def check_zstd_table(path: str, table: Any, names: Iterable[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The `layerpack.zstd` metadata: {tensor: {"dtype": known ST dtype, "shape": [ints >= 0]}} for tensors of the file."""
    if not isinstance(table, dict):
        raise FormatError(f"{path}: {META_ZSTD} metadata is not a JSON object")
    known = set(names)
    out = {}
    for k, v in table.items():
        if k not in known:
            raise FormatError(f"{path}: {META_ZSTD} metadata names {shown(k)}, which the file does not hold")
        if not (isinstance(v, dict) and one_of(v.get("dtype"), ST_DTYPES) and isinstance(v.get("shape"), list)
                and len(v["shape"]) <= MAX_TENSOR_RANK and all(type(d) is int and d >= 0 for d in v["shape"])):
            raise FormatError(f"{path}: {META_ZSTD} metadata of tensor {k!r} is malformed ({shown(v)})")
        out[k] = (v["dtype"], tuple(v["shape"]))
    return out
