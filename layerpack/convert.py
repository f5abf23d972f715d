"""`layerpack convert`: HF checkpoint -> layerpack, streaming one tensor at a time.

Memory: the source tensor being quantized, the next one being read ahead, and the stored tensors
of the current unit (which are never larger than its source) - bounded by one layer unit, not by
the model. Crash safety: each layer file is written under a temporary name and renamed; a small
record per finished unit in OUT/.layerpack-partial lets a re-run skip it; the manifest is written
last, atomically, so a folder without manifest.json is never mistaken for a pack.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import (
    COMPRESS_ZSTD,
    DEFAULT_BLOCK_SIZE,
    DTYPE_NAMES,
    DTYPE_TO_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMAT_VERSION_CALIBRATED,
    LAYERS_DIR,
    MANIFEST_FILE,
    SCHEME_NONE,
    SCHEMES,
    SIDECAR_FILES,
    UNIT_BLOCK,
    UNIT_EMBED,
    UNIT_HEAD,
    unit_file,
    unit_name,
)
from layerpack_runtime.manifest import FileEntry, LayerEntry, Manifest, Quantization, TensorEntry
from layerpack_runtime.pack import sha256_file

from . import __version__
from .families import Family, Rows, architecture_spec, expected_shape, family_of, is_ignored, is_quantizable, split_rows
from .progress import progress_bar
from .calibrate import DEFAULT_TOKENS as DEFAULT_CALIBRATION_TOKENS, MAX_TOKENS as MAX_CALIBRATION_TOKENS
from .calibrated import Calibrated, parse_methods
from .quantize import OUTLIER_ROW, OUTLIER_RULES
from .schema import validate_manifest
from .source import Part, Source, TensorIndex, base_name, file_digest, provenance_files, read_json_object, resolve
from . import streamquant
from .streamquant import InMemory, outlier_count, quantize_stream, stored_specs
from .writer import TMP_MARK, UnitWriter, fsync_dir, write_bytes_atomic, write_text_atomic

PARTIAL_DIR = ".layerpack-partial"
_WEIGHT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}   # safetensors dtypes a weight may have
DEFAULT_ZSTD_LEVEL = 3


@dataclass
class ConvertOptions:
    quant: str = SCHEME_NONE
    dtype: str | None = None           # None: the source's dtype
    outliers: float = 0.0
    block_size: int | None = None      # None: the scheme's default
    compress: str = "none"
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    revision: str | None = None
    allow_pickle: bool = False
    overwrite: bool = False
    quiet: bool = False
    evaluate: bool = False             # --eval: measure quality and store it in the manifest
    eval_text: str | None = None       # None: the default text (layerpack_runtime.evaluate.default_text)
    outlier_rule: str = OUTLIER_ROW    # which entries --outliers keeps (quantize.OUTLIER_RULES; chosen by scripts/sweep_outliers.py)
    head_outliers: float | None = None  # the output head's fraction (a tied embedding is the head); None: `outliers`
    calibrate: bool = False            # --calibrate: activation-aware outliers and scales (calibrate.py, calibrated.py)
    calibration_text: str | None = None  # None: the text that ships with layerpack (calibrate.default_text)
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS
    calibrate_methods: str | None = None  # comma-separated subset of calibrated.METHODS; None: all

    def check(self) -> None:
        if self.quant not in SCHEMES:
            raise LayerpackError(f"--quant must be one of {', '.join(SCHEMES)}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise LayerpackError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}")
        if not 0.0 <= self.outliers < 0.5:
            raise LayerpackError("--outliers is a fraction of each weight's entries, in [0, 0.5)")
        if self.outliers and self.quant == SCHEME_NONE:
            raise LayerpackError("--outliers needs a quantized scheme (--quant int8 or nf4)")
        if self.head_outliers is not None and not 0.0 <= self.head_outliers < 0.5:
            raise LayerpackError("--head-outliers is a fraction of the head's entries, in [0, 0.5)")
        if self.head_outliers and self.quant == SCHEME_NONE:
            raise LayerpackError("--head-outliers needs a quantized scheme (--quant int8 or nf4)")
        if self.block_size is not None and self.quant == SCHEME_NONE:
            raise LayerpackError("--block-size needs a quantized scheme (--quant int8 or nf4)")
        if self.outlier_rule not in OUTLIER_RULES:
            raise LayerpackError(f"outlier rule must be one of {', '.join(OUTLIER_RULES)}")
        if self.block_size is not None and (self.block_size < 16 or self.block_size % 2):
            raise LayerpackError(f"--block-size must be an even number >= 16, not {self.block_size}")
        if self.calibrate and self.quant == SCHEME_NONE:
            raise LayerpackError("--calibrate needs a quantized scheme (--quant int8 or nf4)")
        if not self.calibrate and (self.calibration_text is not None or self.calibrate_methods is not None):
            raise LayerpackError("--calibration-text / --calibrate-methods need --calibrate")
        if not 1 <= self.calibration_tokens <= MAX_CALIBRATION_TOKENS:
            raise LayerpackError(f"--calibration-tokens must be in 1..{MAX_CALIBRATION_TOKENS}")
        if self.calibrate:
            parse_methods(self.calibrate_methods)


@dataclass
class UnitPlan:
    name: str
    kind: str
    index: int | None
    tensors: dict[str, str | Part]   # canonical -> HF name (or a part of a fused HF tensor)
    rows: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # canonical -> (start, stop, rows) of a fused HF tensor


def plan_units(family: Family, arch: dict, names: list[str]) -> list[UnitPlan]:
    """Map every source tensor to (unit, canonical name). Missing weights and unknown extra tensors
    are errors: silently dropping a weight would make a pack that runs and is wrong."""
    present = set(names)
    used: set[str] = set()

    rows: dict[int | None, dict[str, tuple[int, int, int]]] = {}

    def take(table: dict[str, str | Rows], optional: dict[str, str], i: int | None) -> dict[str, str]:
        out = {}
        for canonical, pattern in table.items():
            if isinstance(pattern, Rows):
                rows.setdefault(i, {})[canonical] = split_rows(pattern.part, arch)
                pattern = pattern.pattern
            hf = pattern.format(i=i)
            if hf not in present:
                raise LayerpackError(f"source lacks tensor {hf} required by the {family.name} family (config.json: num_hidden_layers={arch['num_layers']})")
            out[canonical] = hf
        for canonical, pattern in optional.items():
            hf = pattern.format(i=i)
            if hf in present and canonical not in out:
                out[canonical] = hf
        used.update(out.values())
        return out

    def block(i: int) -> dict:
        if not family.moe:
            return take(family.block, family.optional, i)
        if i not in arch["moe"]["layers"]:
            return take({**family.block, **family.dense_mlp}, family.optional, i)
        return {**take(family.block, family.optional, i), **experts(i)}

    def experts(i: int) -> dict:
        """Block i's router and per-expert weights, from whichever naming scheme the source uses."""
        tables = list(family.moe.values())
        table = next((t for t in tables if _source_name(t["moe.experts.{j}.gate.weight"], i, 0) in present), tables[0])
        out = {}
        for j in range(arch["moe"]["num_experts"]):
            for canonical, src in table.items():
                ref = _source_ref(src, i, j)
                hf = base_name(ref)
                if hf not in present:
                    raise LayerpackError(f"source lacks tensor {hf} required by the {family.name} family (config.json: num_hidden_layers={arch['num_layers']})")
                out[canonical.format(j=j)] = ref
                used.add(hf)
        return out

    tied = arch["tie_word_embeddings"]
    head_table = {k: v for k, v in family.head.items() if not (tied and k == "head.weight")}
    units = [UnitPlan(UNIT_EMBED, UNIT_EMBED, None, take(family.embed, {}, None))]
    units += [UnitPlan(unit_name(UNIT_BLOCK, i), UNIT_BLOCK, i, block(i), rows.get(i, {})) for i in range(arch["num_layers"])]
    units.append(UnitPlan(UNIT_HEAD, UNIT_HEAD, None, take(head_table, {}, None)))
    if tied:
        used.add(family.head["head.weight"])  # a tied checkpoint may still carry a copy; it is the embedding
    extra = sorted(n for n in present - used if not is_ignored(n))
    if extra:
        raise LayerpackError(
            f"source has {len(extra)} tensor(s) the {family.name} family does not use, e.g. {extra[0]} "
            f"(does config.json num_hidden_layers={arch['num_layers']} match the weights?)"
        )
    return units


def _source_ref(src, i: int, j: int):
    """An expert table entry (see families._MIXTRAL_MOE) for block i, expert j: an HF name, or a Part
    of a fused HF tensor."""
    if isinstance(src, tuple):
        pattern, part = src
        return Part(pattern.format(i=i), j, {"gate": 0, "up": 1, "expert": None}[part])
    return src.format(i=i, j=j)


def _source_name(src, i: int, j: int) -> str:
    return base_name(_source_ref(src, i, j))


def scheme_for(canonical: str, quant: str, tied: bool) -> str:
    """Norms/biases never quantized; the embedding only when tied (it is then read in full as the
    head every token; untied, only a few rows are gathered per token, so it stays exact)."""
    if quant == SCHEME_NONE:
        return SCHEME_NONE
    if is_quantizable(canonical) or (tied and canonical == "embed.weight"):
        return quant
    return SCHEME_NONE


def _load_json(path: str) -> dict:
    return read_json_object(path)


class _Partial:
    """Per-unit records of finished work, so a re-run after a crash skips it."""

    def __init__(self, out: str):
        self.dir = os.path.join(out, PARTIAL_DIR)

    def record_path(self, unit: str) -> str:
        return os.path.join(self.dir, f"{unit}.json")

    def fingerprint(self) -> str | None:
        p = os.path.join(self.dir, "job.json")
        return _load_json(p).get("fingerprint") if os.path.isfile(p) else None

    def start(self, fingerprint: str) -> None:
        os.makedirs(self.dir, exist_ok=True)
        write_text_atomic(os.path.join(self.dir, "job.json"), json.dumps({"fingerprint": fingerprint}))

    def done(self, out: str, unit: str) -> tuple[LayerEntry, FileEntry] | None:
        p = self.record_path(unit)
        if not os.path.isfile(p):
            return None
        try:
            rec = _load_json(p)
            f = FileEntry(**rec["file"])
            layer = LayerEntry(**{**rec["layer"], "tensors": [TensorEntry(**t) for t in rec["layer"]["tensors"]]})
        except (LayerpackError, TypeError, KeyError):
            return None
        path = os.path.join(out, f.path)
        # Re-hashing is far cheaper than re-quantizing, and catches a file damaged after the crash.
        if not os.path.isfile(path) or os.path.getsize(path) != f.size or sha256_file(path) != f.sha256:
            return None
        return layer, f

    def save(self, unit: str, layer: LayerEntry, f: FileEntry) -> None:
        write_text_atomic(self.record_path(unit), json.dumps({"layer": asdict(layer), "file": asdict(f)}, sort_keys=True))


def _job_fingerprint(opts: ConvertOptions, source: Source, quant: Quantization) -> str:
    files = []
    for rel in ["config.json"] + source.weight_files:
        st = os.stat(os.path.join(source.root, rel))
        files.append([rel, st.st_size, st.st_mtime_ns])
    job = {"format": FORMAT_VERSION, "converter": __version__, "quantization": quant.to_dict(), "source": source.provenance(), "files": files}
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


def _prepare_out(out: str, opts: ConvertOptions, fingerprint: str, quant: Quantization, source: Source) -> _Partial | None:
    """Decide between fresh start, resume, nothing-to-do (returns None) and refusal."""
    partial = _Partial(out)
    manifest_path = os.path.join(out, MANIFEST_FILE)
    if os.path.isdir(out) and os.listdir(out):
        if opts.overwrite:
            if os.path.exists(manifest_path):
                os.remove(manifest_path)  # first: the folder stops being a pack before anything else changes
            shutil.rmtree(partial.dir, ignore_errors=True)
        elif os.path.isfile(manifest_path):
            old = _load_json(manifest_path)
            old_sizes = {f.get("path"): f.get("size") for f in old.get("source", {}).get("files", [])}
            same = old.get("quantization") == quant.to_dict() and all(
                old_sizes.get(rel) == os.path.getsize(os.path.join(source.root, rel)) for rel in source.weight_files)
            if same:
                return None
            raise LayerpackError(f"{out}: already holds a different complete pack; pass --overwrite to replace it")
        elif partial.fingerprint() is None:
            raise LayerpackError(f"{out}: exists and is not empty; choose a new folder or pass --overwrite")
        elif partial.fingerprint() != fingerprint:
            raise LayerpackError(f"{out}: holds an unfinished conversion with other options or source; pass --overwrite to start over")
    os.makedirs(os.path.join(out, LAYERS_DIR), exist_ok=True)
    for d in (out, os.path.join(out, LAYERS_DIR)):
        for name in os.listdir(d):
            if TMP_MARK in name:  # debris of a killed run
                os.remove(os.path.join(d, name))
    partial.start(fingerprint)
    return partial


@dataclass
class _Job:
    source: Source
    arch: dict
    index: TensorIndex
    units: list[UnitPlan]
    quant: Quantization
    calibration_ids: torch.Tensor | None = None   # --calibrate: the calibration token ids
    stats: dict | None = None                     # --calibrate: {canonical: calibrate.ColumnStats}


def _plan(src: str, opts: ConvertOptions) -> _Job:
    """Everything decided before a byte is written: source, family, architecture, the mapping of every
    source tensor to a unit, shapes checked against config.json, and the quantization settings."""
    source = resolve(src, opts.revision, opts.allow_pickle, opts.quiet)
    config = _load_json(os.path.join(source.root, "config.json"))
    gen_path = os.path.join(source.root, "generation_config.json")
    family = family_of(config)
    arch = architecture_spec(config, _load_json(gen_path) if os.path.isfile(gen_path) else None)
    index = TensorIndex(source)
    units = plan_units(family, arch, index.names())
    for u in units:
        for canonical, hf in u.tensors.items():
            st_dtype, got = index.info(hf)[:2]
            if st_dtype.upper() not in _WEIGHT_DTYPES and not st_dtype.startswith(("torch.float", "torch.bfloat")):
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
        quantized_embedding=arch["tie_word_embeddings"] and opts.quant != SCHEME_NONE,
        outlier_rule=opts.outlier_rule if opts.outliers or opts.head_outliers else None,
        head_outlier_fraction=opts.head_outliers if opts.head_outliers is not None and opts.head_outliers != opts.outliers else None,
    )
    job = _Job(source, arch, index, units, quant)
    if opts.calibrate:  # the text is tokenized now: its provenance is part of the job (fingerprint, manifest)
        from . import calibrate

        text, text_id = calibrate.read_text(opts.calibration_text)
        job.calibration_ids = calibrate.token_ids(source.root, arch, text, opts.calibration_tokens)
        quant.calibration = {"text": text_id, "text_sha256": calibrate.text_sha256(text),
                             "tokens": int(job.calibration_ids.numel()), "sequence_length": calibrate.SEQ_LEN,
                             "methods": list(parse_methods(opts.calibrate_methods))}
    return job


def _open(index: TensorIndex, u: UnitPlan, canonical: str):
    """The source tensor of one canonical name (its rows only, for a split fused tensor): read into
    memory when it fits one window, else a reader that the quantizer pulls windows from."""
    ref = u.tensors[canonical]
    rows = u.rows[canonical][:2] if canonical in u.rows else None
    _, shape, _ = index.info(ref)
    n = math.prod(shape) if rows is None else math.prod(shape) // shape[0] * (rows[1] - rows[0])
    if n > streamquant.WINDOW_ELEMS:
        return index.reader(ref, rows)
    w = index.read(ref)
    if rows is not None:
        w = w[rows[0]: rows[1]].clone()  # a copy: the fused tensor is freed, and the slice owns compact storage
    return InMemory(w)


def _read_whole(index: TensorIndex, u: UnitPlan, canonical: str):
    """The whole source tensor in memory (the calibration pass runs a unit at a time)."""
    src = _open(index, u, canonical)
    return src.read(0, math.prod(src.shape)).reshape(src.shape)


def _tensor_plan(job: "_Job", u: UnitPlan, canonical: str) -> tuple[str, float, dict]:
    """(scheme, outlier fraction, stored tensor specs) of one canonical tensor, before reading it."""
    q, tied = job.quant, job.arch["tie_word_embeddings"]
    ref = u.tensors[canonical]
    _, shape, _ = job.index.info(ref)
    if canonical in u.rows:
        a, b, _ = u.rows[canonical]
        shape = [b - a, *shape[1:]]
    head = canonical == "head.weight" or (tied and canonical == "embed.weight")
    fraction = q.head_outlier_fraction if head and q.head_outlier_fraction is not None else q.outlier_fraction
    scheme = scheme_for(canonical, q.scheme, tied)
    k = outlier_count(fraction, math.prod(shape)) if scheme != SCHEME_NONE else 0
    return scheme, fraction, stored_specs(canonical, shape, scheme, DTYPE_NAMES[q.dtype], q.block_size, k)


def _nbytes(index: TensorIndex, u: UnitPlan, canonical: str) -> int:
    _, shape, nbytes = index.info(u.tensors[canonical])
    if canonical in u.rows:
        a, b, _ = u.rows[canonical]
        return nbytes * (b - a) // shape[0]
    return nbytes


def convert(src: str, out: str, opts: ConvertOptions | None = None) -> Manifest:
    opts = opts or ConvertOptions()
    opts.check()
    text = None
    if opts.evaluate:  # a bad --eval-text fails now, not after the conversion
        from .evaluate import read_text

        text = read_text(opts.eval_text)
    job = _plan(src, opts)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise LayerpackError(f"{out}: cannot create output folder ({e.strerror})") from None
    partial = _prepare_out(out, opts, _job_fingerprint(opts, job.source, job.quant), job.quant, job.source)
    if partial is None:
        manifest = Manifest.load(out)
        if text is not None and manifest.quality is None:  # the pack exists; only its measurement is missing
            manifest.quality = _evaluate(job, out, manifest, text, opts.quiet)
            validate_manifest(manifest.to_dict())
            write_text_atomic(os.path.join(out, MANIFEST_FILE), manifest.to_json())
        elif not opts.quiet:
            print(f"{out}: already a complete pack of this source with these options; nothing to do")
        return manifest

    results = {u.name: rec for u in job.units if (rec := partial.done(out, u.name))}
    if job.calibration_ids is not None and len(results) < len(job.units):
        job.stats = _calibration_stats(job, partial, opts.quiet)
    with ThreadPoolExecutor(1, thread_name_prefix="hash-source") as hasher:
        digests = _convert_units(job, [u for u in job.units if u.name not in results], out, partial, results, opts.quiet, hasher)
        src_files = [d.result() for d in digests]
    sidecars = _copy_sidecars(job.source, out)
    manifest = _build_manifest(job, [results[u.name] for u in job.units], sidecars, src_files)
    _remove_stale_layers(out, {unit_file(u.name) for u in job.units})
    if text is not None:  # every file is final; the manifest that makes the folder a pack comes after
        manifest.quality = _evaluate(job, out, manifest, text, opts.quiet)
        validate_manifest(manifest.to_dict())
    write_text_atomic(os.path.join(out, MANIFEST_FILE), manifest.to_json())
    fsync_dir(out)
    shutil.rmtree(partial.dir, ignore_errors=True)
    if not opts.quiet and not any(f.path == "tokenizer.json" for f in sidecars):
        _warn_no_tokenizer(src, job.source)
    return manifest


def _warn_no_tokenizer(src: str, source: Source) -> None:
    """A pack without tokenizer.json runs on token ids only: say so now, not at the first text prompt."""
    only_sp = os.path.isfile(os.path.join(source.root, "tokenizer.model"))
    print(f"warning: {src} has no tokenizer.json" + (" (only a sentencepiece tokenizer.model, which the runtime does not read)" if only_sp else "")
          + "; the pack takes token ids but no text prompts. Add the model's tokenizer.json to the source and convert again",
          file=sys.stderr)


def _convert_units(job: _Job, todo: list[UnitPlan], out: str, partial: _Partial,
                   results: dict[str, tuple[LayerEntry, FileEntry]], quiet: bool, hasher: ThreadPoolExecutor) -> list[Future]:
    """Quantize and write each unit of `todo`, tensor by tensor, recording each finished unit.
    Source files are hashed (provenance) on `hasher` right after the converter's last read from
    each, while their pages are still cached: hashing ahead would read a model larger than RAM
    twice from disk. Returns the digest futures, in provenance_files order."""
    q = job.quant
    dtype = DTYPE_NAMES[q.dtype]
    jobs = [(u, c) for u in todo for c in sorted(u.tensors)]
    last_read = {job.index.file_of(u.tensors[c]): j for j, (u, c) in enumerate(jobs)}
    digests: dict[str, Future] = {}
    for rel in provenance_files(job.source):
        if rel not in last_read:  # config, tokenizer, shards no remaining unit reads
            digests[rel] = hasher.submit(file_digest, job.source, rel)
    total = sum(_nbytes(job.index, u, c) for u, c in jobs)
    with progress_bar(total, "convert", quiet) as bar, ThreadPoolExecutor(1) as reader:
        # Read tensor i+1 (disk) while tensor i is quantized (CPU): both overlap on 2 cores. A tensor
        # larger than one window is not read here but window by window as it is quantized.
        ahead = reader.submit(_open, job.index, *jobs[0]) if jobs else None
        on_window = _window_done(bar)
        j = 0
        for u in todo:
            names = sorted(u.tensors)
            plans = {c: _tensor_plan(job, u, c) for c in names}
            specs = {n: spec for c in names for n, spec in plans[c][2].items()}
            rel = unit_file(u.name)
            entries: list[TensorEntry] = []
            params = 0
            bar.set_description(u.name)
            with UnitWriter(os.path.join(out, rel), u.name, specs, q.zstd_level) as writer:
                for canonical in names:
                    src = ahead.result()
                    ahead = reader.submit(_open, job.index, *jobs[j + 1]) if j + 1 < len(jobs) else None
                    scheme, fraction, _ = plans[canonical]
                    entries.append(quantize_stream(canonical, src, scheme, dtype, q.block_size, fraction,
                                                   q.outlier_rule or OUTLIER_ROW, writer, on_window,
                                                   _calibrated(job, u.name, canonical, scheme)))
                    params += math.prod(src.shape)
                    del src
                    for f_rel, last in last_read.items():
                        if last == j:
                            digests[f_rel] = hasher.submit(file_digest, job.source, f_rel)
                    j += 1
                size, sha = writer.finish()
            layer, f = LayerEntry(u.name, u.kind, rel, params, entries, u.index), FileEntry(rel, size, sha)
            partial.save(u.name, layer, f)
            results[u.name] = (layer, f)
            _fault_point(len(results))
    return [digests[rel] for rel in provenance_files(job.source)]


def _calibration_stats(job: _Job, partial: _Partial, quiet: bool) -> dict:
    """The activation statistics of every linear: saved by an earlier run of this job (resume), or
    computed now by running the source unit by unit (calibrate.collect) and saved for a resume."""
    from . import calibrate

    path = os.path.join(partial.dir, calibrate.STATS_FILE)
    fingerprint = partial.fingerprint() or ""
    stats = calibrate.load(path, fingerprint)
    if stats is None:
        with progress_bar(len(job.units), "calibrate", quiet, unit="unit") as bar:
            stats = calibrate.collect(job.arch, job.units, lambda u: {c: _read_whole(job.index, u, c) for c in u.tensors},
                                      job.calibration_ids, job.arch["tie_word_embeddings"], lambda u: bar.update(1))
        calibrate.save(path, stats, fingerprint)
    return stats


def _calibrated(job: _Job, unit: str, canonical: str, scheme: str) -> Calibrated | None:
    """The calibration of one weight for quantize_tensor (None: not calibrated, or not a quantized linear)."""
    from .calibrate import key

    st = job.stats.get(key(unit, canonical)) if job.stats is not None and scheme != SCHEME_NONE else None
    if st is None:
        return None
    return Calibrated(st.sq_mean, st.abs_max, tuple(job.quant.calibration["methods"]))


def _evaluate(job: _Job, out: str, manifest: Manifest, text: tuple[str, str], quiet: bool) -> dict:
    """The manifest's `quality`: perplexity of the pack in `out` (run from the in-memory manifest,
    before manifest.json exists) and, unless the pack holds the source's own values, KL and top-1
    agreement against the source checkpoint converted unquantized in its own dtype (a temporary
    pack under the partial folder)."""
    from layerpack_runtime.loader import LayeredModel
    from layerpack_runtime.pack import Pack

    from .evaluate import DEFAULT_EVAL_DTYPE, evaluate_model, quality_record

    q = manifest.quantization
    src_dtype = DTYPE_TO_NAME.get(job.index.dtype_of(job.units[0].tensors["embed.weight"]))  # None: e.g. fp8, needs --dtype
    same_as_source = q.scheme == SCHEME_NONE and q.dtype == src_dtype
    model = LayeredModel(Pack(out, manifest=manifest), dtype=DEFAULT_EVAL_DTYPE)
    ref, ref_dir, desc = None, os.path.join(out, PARTIAL_DIR, "reference"), None
    try:
        if not same_as_source:
            from layerpack_runtime.loader import load

            ref_dtype = src_dtype or q.dtype
            convert(job.source.root, ref_dir, ConvertOptions(quant=SCHEME_NONE, dtype=ref_dtype, overwrite=True, quiet=True))
            ref, desc = load(ref_dir, dtype=DEFAULT_EVAL_DTYPE), f"source checkpoint, unquantized ({ref_dtype})"
        result = evaluate_model(model, text[0], reference=ref, quiet=quiet)
    finally:
        shutil.rmtree(ref_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # an existing pack being evaluated: leave no partial folder behind
            os.rmdir(os.path.dirname(ref_dir))
    return quality_record(manifest, result, text[1], DEFAULT_EVAL_DTYPE, desc)


def _window_done(bar):
    """Progress per window read; with LAYERPACK_FAULT_KILL_AFTER_WINDOWS=N the process SIGKILLs
    itself after N windows, i.e. in the middle of a unit (the resume tests' kill -9)."""
    limit = int(os.environ.get("LAYERPACK_FAULT_KILL_AFTER_WINDOWS") or 0)
    if not limit:
        return bar.update
    count = [0]

    def update(nbytes: int) -> None:
        bar.update(nbytes)
        count[0] += 1
        if count[0] >= limit:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
    return update


def _fault_point(units_done: int) -> None:
    """Crash-test hook: LAYERPACK_FAULT_KILL_AFTER_UNITS=N makes the process SIGKILL itself once N
    units are recorded, so the tests exercise resume after a real `kill -9`, deterministically."""
    limit = os.environ.get("LAYERPACK_FAULT_KILL_AFTER_UNITS")
    if limit and units_done >= int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _copy_sidecars(source: Source, out: str) -> list[FileEntry]:
    entries = []
    for name in SIDECAR_FILES:
        p = os.path.join(source.root, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                size, sha = write_bytes_atomic(os.path.join(out, name), f.read())
            entries.append(FileEntry(name, size, sha))
    return entries


def _remove_stale_layers(out: str, keep: set[str]) -> None:
    d = os.path.join(out, LAYERS_DIR)
    for name in os.listdir(d):
        if f"{LAYERS_DIR}/{name}" not in keep:
            os.remove(os.path.join(d, name))


def _build_manifest(job: _Job, done: list[tuple[LayerEntry, FileEntry]], sidecars: list[FileEntry], src_files: list[dict]) -> Manifest:
    total_bytes = sum(f.size for _, f in done)
    params = sum(l.params for l, _ in done)
    m = Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION_CALIBRATED if job.quant.calibration is not None else FORMAT_VERSION,
        created_by=f"layerpack {__version__}",
        source={**job.source.provenance(), "files": src_files},
        architecture=job.arch,
        quantization=job.quant,
        layers=[l for l, _ in done],
        files=sorted([f for _, f in done] + sidecars, key=lambda f: f.path),
        totals={"params": params, "layer_bytes": total_bytes, "bits_per_param": round(8 * total_bytes / params, 4)},
    )
    validate_manifest(m.to_dict())
    return m
