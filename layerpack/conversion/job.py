"""Everything a conversion decides before a byte is written (Job: source, architecture, unit plan,
quantization settings, calibration tokens), and reading one canonical tensor of the source."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import COMPRESS_ZSTD, DEFAULT_BLOCK_SIZE, DTYPE_NAMES, DTYPE_TO_NAME, SCHEME_NONE
from layerpack_runtime.manifest import Quantization

from ..families import architecture_spec, expected_shape, family_of
from ..quantizer import InMemory, activation_stats, outlier_count, parse_methods, stored_specs, windows
from ..source import Source, TensorIndex, base_name, read_json_object, resolve
from .options import ConvertOptions
from .unit_plan import UnitPlan, plan_units, scheme_for

WEIGHT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}   # safetensors dtypes a weight may have


@dataclass
class Job:
    source: Source
    arch: dict
    index: TensorIndex
    units: list[UnitPlan]
    quant: Quantization
    calibration_ids: torch.Tensor | None = None   # --calibrate: the calibration token ids
    stats: dict | None = None                     # --calibrate: {key: activation_stats.ColumnStats}


def plan_job(src: str, opts: ConvertOptions) -> Job:
    """Everything decided before a byte is written: source, family, architecture, the mapping of every
    source tensor to a unit, shapes checked against config.json, and the quantization settings."""
    source = resolve(src, opts.revision, opts.allow_pickle, opts.quiet)
    config = read_json_object(os.path.join(source.root, "config.json"))
    gen_path = os.path.join(source.root, "generation_config.json")
    family = family_of(config)
    arch = architecture_spec(config, read_json_object(gen_path) if os.path.isfile(gen_path) else None)
    index = TensorIndex(source)
    units = plan_units(family, arch, index.names())
    for u in units:
        for canonical, hf in u.tensors.items():
            st_dtype, got = index.info(hf)[:2]
            if st_dtype.upper() not in WEIGHT_DTYPES and not st_dtype.startswith(("torch.float", "torch.bfloat")):
                raise LayerpackError(f"{index.file_of(hf)}: tensor {base_name(hf)} has dtype {st_dtype}; weights must be floating point")
            want = expected_shape(canonical, arch)
            if want is not None and canonical in u.rows:  # a row range of a fused tensor: check the whole
                want = [u.rows[canonical][2], *want[1:]]
            if want is not None and want != got:
                raise LayerpackError(f"source tensor {hf} has shape {got}, config.json implies {want}")
    src_dtype = index.dtype_of(units[0].tensors["embed.weight"])
    if opts.dtype is None and src_dtype not in DTYPE_TO_NAME:
        raise LayerpackError(f"source weights are {src_dtype}; pass --dtype bf16/fp16/fp32 (fp8 checkpoints are not supported)")
    quant = Quantization(
        scheme=opts.quant, dtype=opts.dtype or DTYPE_TO_NAME[src_dtype],
        block_size=opts.block_size or DEFAULT_BLOCK_SIZE.get(opts.quant), outlier_fraction=opts.outliers,
        compression=opts.compress, zstd_level=opts.zstd_level if opts.compress == COMPRESS_ZSTD else None,
        quantized_embedding=scheme_for("embed.weight", opts.quant, arch) != SCHEME_NONE,
        outlier_rule=opts.outlier_rule if opts.outliers or opts.head_outliers else None,
        head_outlier_fraction=opts.head_outliers if opts.head_outliers is not None and opts.head_outliers != opts.outliers else None,
    )
    job = Job(source, arch, index, units, quant)
    if opts.calibrate:  # the text is tokenized now: its provenance is part of the job (fingerprint, manifest)
        text, text_id = activation_stats.read_text(opts.calibration_text)
        job.calibration_ids = activation_stats.token_ids(source.root, arch, text, opts.calibration_tokens)
        quant.calibration = {"text": text_id, "text_sha256": activation_stats.text_sha256(text),
                             "tokens": int(job.calibration_ids.numel()), "sequence_length": activation_stats.SEQ_LEN,
                             "methods": list(parse_methods(opts.calibrate_methods))}
    return job


def open_tensor(index: TensorIndex, u: UnitPlan, canonical: str):
    """The source tensor of one canonical name (its rows only, for a split fused tensor): read into
    memory when it fits one window, else a reader that the quantizer pulls windows from."""
    ref = u.tensors[canonical]
    rows = u.rows[canonical][:2] if canonical in u.rows else None
    _, shape, _ = index.info(ref)
    n = math.prod(shape) if rows is None else math.prod(shape) // shape[0] * (rows[1] - rows[0])
    if n > windows.WINDOW_ELEMS:
        return index.reader(ref, rows)
    w = index.read(ref)
    if rows is not None:
        w = w[rows[0]: rows[1]].clone()  # a copy: the fused tensor is freed, and the slice owns compact storage
    return InMemory(w)


def read_whole(index: TensorIndex, u: UnitPlan, canonical: str):
    """The whole source tensor in memory (the calibration pass runs a unit at a time)."""
    src = open_tensor(index, u, canonical)
    return src.read(0, math.prod(src.shape)).reshape(src.shape)


def tensor_plan(job: Job, u: UnitPlan, canonical: str) -> tuple[str, float, dict]:
    """(scheme, outlier fraction, stored tensor specs) of one canonical tensor, before reading it."""
    q, tied = job.quant, job.arch["tie_word_embeddings"]
    ref = u.tensors[canonical]
    _, shape, _ = job.index.info(ref)
    if canonical in u.rows:
        a, b, _ = u.rows[canonical]
        shape = [b - a, *shape[1:]]
    head = canonical == "head.weight" or (tied and canonical == "embed.weight")
    fraction = q.head_outlier_fraction if head and q.head_outlier_fraction is not None else q.outlier_fraction
    scheme = scheme_for(canonical, q.scheme, job.arch)
    k = outlier_count(fraction, math.prod(shape)) if scheme != SCHEME_NONE else 0
    return scheme, fraction, stored_specs(canonical, shape, scheme, DTYPE_NAMES[q.dtype], q.block_size, k)


def source_nbytes(index: TensorIndex, u: UnitPlan, canonical: str) -> int:
    _, shape, nbytes = index.info(u.tensors[canonical])
    if canonical in u.rows:
        a, b, _ = u.rows[canonical]
        return nbytes * (b - a) // shape[0]
    return nbytes