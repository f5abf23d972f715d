"""The reader's one validation layer: everything a pack says is checked here before it is used.

Packs are downloaded from strangers, so every byte is hostile until checked, in this order:
1. JSON (manifest, layer headers, zstd metadata): size bounded before parsing, duplicate keys and
   deep nesting refused (`load_json`).
2. The manifest (`check_manifest`): every field the runtime or `inspect` reads has its type, range
   and cross-consistency checked: layer list == architecture's blocks, each layer's own file, tensor
   entries complete, block size consistent with the scheme, and architecture dimensions tied to the
   tensor shapes, which are tied to the bytes of the files (so nothing is allocated from a number
   that the bytes present do not back).
3. Pack files (`resolve_in_pack`): every file must resolve inside the pack (no symlink escapes).
4. Each layer file's header against the manifest (`check_layer_file`): stored names, dtypes, shapes
   and byte counts per scheme, zstd sizes; before any payload byte is read.
5. Payloads as they are read (`check_payload`): absmax finite and >= 0, outlier tables in range,
   strictly increasing, values finite. Cheap vectorised reductions over the small tensors only.
Every failure is a FormatError naming the file and field. No jsonschema here: the runtime stays light
(the toolkit's `verify` also runs the schema; the tests hold the two together).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterable

import torch

from .errors import FormatError, VersionError
from .models import contract, family_of_pack
from .format import (
    ARCH_REQUIRED, BLOCK_SIZE_MULTIPLE, COMPRESS_ZSTD, COMPRESSIONS, DTYPE_NAMES, FORMAT_MAJOR, FORMAT_NAME,
    FORMAT_VERSION, MANIFEST_FILE, MAX_EXTRA_FILES, MAX_JSON_DEPTH, MAX_TENSOR_RANK, MAX_ZSTD_RATIO, META_UNIT,
    META_ZSTD, NF4_ZERO_CODE, OUTLIER_IDX_I64_FROM, SCHEME_INT8, SCHEME_NF4, SCHEME_NONE, SCHEMES, ST_DTYPES, SUFFIX_ABSMAX,
    SUFFIX_CODES, SUFFIX_OUTLIER_IDX, SUFFIX_OUTLIER_VAL, TORCH_TO_ST, UNIT_BLOCK, UNIT_EMBED, UNIT_HEAD,
    ZSTD_SMALL_BYTES, unit_name,
)

# Tests and the overhead benchmark switch payload checks off to measure them; nothing else should.
PAYLOAD_CHECKS = True


# -- 1. JSON ---------------------------------------------------------------------------------------

class _Duplicate(ValueError):
    pass


def _pairs(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):  # json keeps the last value silently: a second meaning hidden in one file
        seen = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def load_json(data: bytes | str, where: str, max_bytes: int) -> Any:
    """Parse untrusted JSON: at most max_bytes, no duplicate keys, nesting at most MAX_JSON_DEPTH."""
    where = f"{where}: " if where else ""
    if len(data) > max_bytes:
        raise FormatError(f"{where}more than the reader's limit of {max_bytes} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        obj = json.loads(text, object_pairs_hook=_pairs)
    except _Duplicate as e:
        raise FormatError(f"{where}duplicate key {str(e.args[0])[:60]!r}") from None
    except RecursionError:
        raise FormatError(f"{where}JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{where}not valid JSON ({str(e)[:120]})") from None
    stack = [(obj, 1)]
    while stack:  # iterative: a deep structure must not recurse here either
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise FormatError(f"{where}JSON nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return obj


# -- small typed getters: each failure names the field ------------------------------------------

def _fail(path: str, what: str) -> FormatError:
    return FormatError(f"manifest field {path}: {what}")


def _show(v: Any) -> str:
    if v is None:
        return "null (or missing)"
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _int(v: Any, path: str, lo: int = 0, hi: int | None = None) -> int:
    if type(v) is not int:  # bool is an int subclass: refused too
        raise _fail(path, f"must be an integer, not {_show(v)}")
    if v < lo or (hi is not None and v > hi):
        raise _fail(path, f"{v} is out of range [{lo}, {'...' if hi is None else hi}]")
    return v


def _num(v: Any, path: str, lo: float | None = None, positive: bool = False) -> float:
    if type(v) not in (int, float) or not math.isfinite(v):
        raise _fail(path, f"must be a finite number, not {_show(v)}")
    if (positive and v <= 0) or (lo is not None and v < lo):
        raise _fail(path, f"{v} must be {'> 0' if positive else f'>= {lo}'}")
    return float(v)


def _one_of(v: Any, choices) -> bool:
    """Membership without hashing a hostile value (a dict or list where a string belongs)."""
    return isinstance(v, str) and v in choices


def _typed(v: Any, typ, path: str, optional: bool = False):
    if v is None and optional:
        return None
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise _fail(path, f"must be a {names}{' or null' if optional else ''}, not {_show(v)}")
    return v


def _opt_num(d: dict, key: str, path: str, positive: bool = False) -> None:
    if d.get(key) is not None:
        _num(d[key], f"{path}.{key}", lo=0, positive=positive)


# -- 2. the manifest -------------------------------------------------------------------------------

def parse_version(v: Any) -> tuple[int, int, int]:
    if isinstance(v, str) and re.fullmatch(r"\d{1,6}\.\d{1,6}\.\d{1,6}", v):
        return tuple(int(p) for p in v.split("."))  # type: ignore[return-value]
    raise FormatError(f"manifest format_version {_show(v)} is not MAJOR.MINOR.PATCH")


def safe_relpath(p: Any) -> bool:
    """Pack paths must stay inside the pack: relative, '/'-separated, no '..' (a pulled pack is untrusted)."""
    import posixpath

    return (
        isinstance(p, str) and p != "" and not p.startswith("/") and "\\" not in p and "\0" not in p
        and posixpath.normpath(p) == p and not p.startswith("..")
    )


def check_manifest(d: Any) -> None:
    """Identity and version first (a newer major version says so), then every field, then consistency."""
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise FormatError(f"not a {FORMAT_NAME} manifest (field 'format' is {_show(d.get('format')) if isinstance(d, dict) else None})")
    major = parse_version(d.get("format_version"))[0]
    if major > FORMAT_MAJOR:
        raise VersionError(f"pack format version {d['format_version']} is newer than this reader supports "
                           f"({FORMAT_VERSION}); upgrade layerpack-llm / layerpack-llm-runtime")
    if major < 1:
        raise VersionError(f"pack format version {d['format_version']} predates format 1 and is not supported")
    for key, typ in (("source", dict), ("architecture", dict), ("quantization", dict), ("layers", list), ("files", list),
                     ("totals", dict)):
        if not isinstance(d.get(key), typ):
            raise FormatError(f"manifest field {key!r} is missing or not a {'list' if typ is list else 'object'}")
    _typed(d.get("created_by", ""), str, "created_by")
    _check_source(d["source"])
    sizes = _check_files(d["files"], len(d["layers"]))
    q = _check_quantization(d["quantization"])
    arch = d["architecture"]
    _check_architecture(arch, len(d["layers"]))
    _check_layers(d["layers"], arch, q, sizes)
    _check_totals(d["totals"], d["layers"], sizes)
    if d.get("quality") is not None:
        _check_quality(d["quality"])


def _check_source(s: dict) -> None:
    _typed(s.get("kind"), str, "source.kind")
    _typed(s.get("id"), str, "source.id")
    _typed(s.get("revision"), str, "source.revision", optional=True)


def _check_files(files: list, n_layers: int) -> dict[str, int]:
    if len(files) > n_layers + MAX_EXTRA_FILES:
        raise _fail("files", f"{len(files)} entries for {n_layers} layers (at most {MAX_EXTRA_FILES} files beyond the layer files)")
    sizes: dict[str, int] = {}
    for i, f in enumerate(files):
        p = f"files[{i}]"
        _typed(f, dict, p)
        if not safe_relpath(f.get("path")) or f["path"] == MANIFEST_FILE:
            raise FormatError(f"manifest file entry {p} path {_show(f.get('path'))} is malformed or points outside the pack")
        _int(f.get("size"), f"{p}.size")
        if not (isinstance(f.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", f["sha256"])):
            raise _fail(f"{p}.sha256", f"must be 64 lowercase hex digits, not {_show(f.get('sha256'))}")
        if f["path"] in sizes:
            raise _fail(p, f"{f['path']!r} is listed twice")
        sizes[f["path"]] = f["size"]
    return sizes


def _check_quantization(q: dict) -> dict:
    if q.get("scheme") not in SCHEMES:
        raise FormatError(f"manifest quantization scheme {_show(q.get('scheme'))} is not one of {', '.join(SCHEMES)}")
    if not _one_of(q.get("dtype"), DTYPE_NAMES):
        raise FormatError(f"manifest dtype {_show(q.get('dtype'))} is not one of {', '.join(DTYPE_NAMES)}")
    if q.get("compression", "none") not in COMPRESSIONS:
        raise FormatError(f"manifest compression {_show(q.get('compression'))} is not one of {', '.join(COMPRESSIONS)}")
    bs = q.get("block_size")
    if q["scheme"] == SCHEME_NONE:
        if bs is not None:
            raise _fail("quantization.block_size", f"must be null for scheme none, not {_show(bs)}")
    else:
        _block_size(bs, "quantization.block_size")
    for key in ("outlier_fraction", "head_outlier_fraction"):
        if q.get(key) is not None:
            f = _num(q[key], f"quantization.{key}", lo=0)
            if f >= 1:
                raise _fail(f"quantization.{key}", f"{f} must be < 1")
    _typed(q.get("zstd_level"), int, "quantization.zstd_level", optional=True)
    _typed(q.get("quantized_embedding", False), bool, "quantization.quantized_embedding")
    _typed(q.get("outlier_rule"), str, "quantization.outlier_rule", optional=True)
    _typed(q.get("calibration"), dict, "quantization.calibration", optional=True)  # 1.2, informational
    return q


def _block_size(bs: Any, path: str) -> int:
    _int(bs, path, lo=BLOCK_SIZE_MULTIPLE)
    if bs % BLOCK_SIZE_MULTIPLE:
        raise _fail(path, f"{bs} is not a multiple of {BLOCK_SIZE_MULTIPLE}")
    return bs


_ARCH_DIMS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads")


def _check_architecture(a: dict, n_layers: int) -> None:
    missing = [k for k in ARCH_REQUIRED if k not in a]
    if missing:
        raise _fail(f"architecture.{missing[0]}", "is missing (a required field)")
    _typed(a.get("family"), str, "architecture.family")
    for key in _ARCH_DIMS:
        _int(a.get(key), f"architecture.{key}", lo=1)
    # The layer list is the bytes-backed truth: num_layers of 10^9 is refused here, before anything
    # builds a per-block list (KV cache, unit names) from it.
    _int(a.get("num_layers"), "architecture.num_layers", lo=0)
    if a["num_layers"] != n_layers - 2:
        raise _fail("architecture.num_layers", f"{a['num_layers']} blocks, but the manifest lists {n_layers} layer units "
                    f"(embed + blocks + head)")
    for key in ("num_kv_heads", "head_dim"):
        if a.get(key) is not None:
            _int(a[key], f"architecture.{key}", lo=1)
    kv = a.get("num_kv_heads") or a["num_heads"]
    if a["num_heads"] % kv:
        raise _fail("architecture.num_kv_heads", f"num_heads {a['num_heads']} is not a multiple of num_kv_heads {kv}")
    if not a.get("head_dim") and a["hidden_size"] < a["num_heads"]:
        raise _fail("architecture.num_heads", f"{a['num_heads']} heads of hidden_size {a['hidden_size']} leave no head_dim")
    for key in ("max_position_embeddings", "sliding_window"):
        _typed(a.get(key), int, f"architecture.{key}", optional=True)
        if a.get(key) is not None:
            _int(a[key], f"architecture.{key}")
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias", "qk_norm"):
        _typed(a.get(key, False), bool, f"architecture.{key}")
    _typed(a.get("activation", "silu"), str, "architecture.activation")
    # norm and rope are required in full: a reader default (eps 1e-6, theta 10000) standing in for a
    # deleted field would run the model with other numbers than its own.
    norm = _typed(a.get("norm"), dict, "architecture.norm")
    _typed(norm.get("type"), str, "architecture.norm.type")
    _num(norm.get("eps"), "architecture.norm.eps", positive=True)
    _check_rope(a.get("rope"), "architecture.rope")
    if a.get("rope_local") is not None:
        _check_rope(a["rope_local"], "architecture.rope_local")
    _opt_num(a, "query_pre_attn_scalar", "architecture", positive=True)
    _opt_num(a, "final_logit_softcapping", "architecture")
    _opt_num(a, "attn_logit_softcapping", "architecture")
    if a.get("layer_types") is not None:
        lt = _typed(a["layer_types"], list, "architecture.layer_types")
        if len(lt) != a["num_layers"] or not all(t in ("full_attention", "sliding_attention") for t in lt):
            raise _fail("architecture.layer_types", f"must name full_attention or sliding_attention for each of the {a['num_layers']} blocks")
    vocab = a["vocab_size"]
    for key in ("bos_token_id", "pad_token_id"):
        if a.get(key) is not None:
            _int(a[key], f"architecture.{key}", hi=vocab - 1)  # a pad id is embedded: it must be a row
    for i, t in enumerate(_typed(a.get("eos_token_ids") or [], list, "architecture.eos_token_ids")):
        _int(t, f"architecture.eos_token_ids[{i}]", hi=vocab - 1)  # generation compares sampled ids with it
    if a.get("moe") is not None:
        _check_moe(_typed(a["moe"], dict, "architecture.moe"), a["num_layers"])


def _check_rope(r: Any, path: str) -> None:
    _typed(r, dict, path)
    _typed(r.get("type"), str, f"{path}.type")
    _num(r.get("theta"), f"{path}.theta", positive=True)
    if r.get("partial_rotary_factor") is not None:
        _num(r["partial_rotary_factor"], f"{path}.partial_rotary_factor", positive=True)
    for k, v in (_typed(r.get("scaling") or {}, dict, f"{path}.scaling")).items():
        if not (isinstance(v, (str, bool, list)) or v is None):  # HF keeps a few strings/flags/lists there
            _num(v, f"{path}.scaling.{k}")


def _check_moe(m: dict, n_blocks: int) -> None:
    e = _int(m.get("num_experts"), "architecture.moe.num_experts", lo=1)
    _int(m.get("top_k"), "architecture.moe.top_k", lo=1, hi=e)
    _int(m.get("intermediate_size"), "architecture.moe.intermediate_size", lo=1)
    _typed(m.get("norm_topk_prob"), bool, "architecture.moe.norm_topk_prob")
    if m.get("weights_dtype") not in ("float32", "compute"):
        raise _fail("architecture.moe.weights_dtype", f"must be float32 or compute, not {_show(m.get('weights_dtype'))}")
    if m.get("shared_intermediate_size") is not None:
        _int(m["shared_intermediate_size"], "architecture.moe.shared_intermediate_size", lo=1)
    layers = _typed(m.get("layers"), list, "architecture.moe.layers")
    for i, b in enumerate(layers):
        _int(b, f"architecture.moe.layers[{i}]", hi=n_blocks - 1)
    if len(set(layers)) != len(layers):
        raise _fail("architecture.moe.layers", "lists a block twice")


def numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def _stored_min_bytes(t: dict, dtype_bytes: int) -> int:
    n = numel(t["shape"])
    return {SCHEME_NONE: n * dtype_bytes, SCHEME_INT8: n, SCHEME_NF4: (n + 1) // 2}[t["scheme"]]


def _check_layers(layers: list, a: dict, q: dict, sizes: dict[str, int]) -> None:
    fam = family_of_pack(a.get("family"))  # the family's declared contract (models/<family>.py)
    dtype_bytes = torch.empty(0, dtype=DTYPE_NAMES[q["dtype"]]).element_size()
    used: dict[str, str] = {}
    moe_blocks = set(a["moe"]["layers"]) if a.get("moe") else set()
    for i, l in enumerate(layers):
        p = f"layers[{i}]"
        _typed(l, dict, p)
        kind, index = (UNIT_EMBED, None) if i == 0 else (UNIT_HEAD, None) if i == len(layers) - 1 else (UNIT_BLOCK, i - 1)
        want = unit_name(kind, index)
        if l.get("name") != want or l.get("kind") != kind or l.get("index") != index:
            raise _fail(p, f"must be unit {want!r} (kind {kind!r}, index {index}) in execution order, not name "
                        f"{_show(l.get('name'))} kind {_show(l.get('kind'))} index {_show(l.get('index'))}")
        f = l.get("file")
        if not _one_of(f, sizes):
            raise FormatError(f"layer {want!r} refers to {_show(f)}, which the manifest's file list lacks")
        if f in used:
            raise _fail(f"{p}.file", f"{f!r} is already the file of layer {used[f]!r} (each layer has a file of its own)")
        used[f] = want
        _int(l.get("params"), f"{p}.params")
        tensors = _typed(l.get("tensors"), list, f"{p}.tensors")
        names, implied, params = set(), 0, 0
        for j, t in enumerate(tensors):
            tp = f"{p}.tensors[{j}]"
            _check_tensor(t, tp, q, a, fam, kind, index in moe_blocks if index is not None else False)
            if t["name"] in names:
                raise _fail(f"{tp}.name", f"{t['name']!r} appears twice in layer {want!r}")
            names.add(t["name"])
            implied += _stored_min_bytes(t, dtype_bytes)
            params += numel(t["shape"])
        if kind == UNIT_HEAD and ("head.weight" in names) == bool(a.get("tie_word_embeddings")):
            # a tied model's head is the embedding: a head.weight beside it would be silently ignored
            raise _fail(f"{p}.tensors", f"head.weight {'present' if 'head.weight' in names else 'absent'} but "
                        f"architecture.tie_word_embeddings is {a.get('tie_word_embeddings')}")
        if l["params"] != params:
            raise _fail(f"{p}.params", f"{l['params']} != {params}, the sum of its tensors' elements")
        # Bounded by the bytes present: the file (whose size is checked on disk) must hold the tensors.
        budget = sizes[f] * (MAX_ZSTD_RATIO if q.get("compression") == COMPRESS_ZSTD else 1) + ZSTD_SMALL_BYTES * len(tensors)
        if implied > budget:
            raise _fail(p, f"its tensors need at least {implied} bytes, more than {f} ({sizes[f]} bytes) can hold")


def _check_tensor(t: Any, p: str, q: dict, a: dict, fam, kind: str, moe_block: bool) -> None:
    _typed(t, dict, p)
    name = _typed(t.get("name"), str, f"{p}.name")
    shape = _typed(t.get("shape"), list, f"{p}.shape")
    if not 1 <= len(shape) <= MAX_TENSOR_RANK:
        raise _fail(f"{p}.shape", f"rank {len(shape)} is not in 1..{MAX_TENSOR_RANK}")
    for k, dim in enumerate(shape):
        _int(dim, f"{p}.shape[{k}]", lo=1)
    why = contract.check_tensor_name(fam, name, kind, a, moe_block)
    if why:
        raise _fail(f"{p}.name", why)
    want = contract.shape_of(fam, name, a)
    if tuple(shape) != want:
        raise _fail(f"{p}.shape", f"{name} has shape {shape}, the architecture implies {list(want)}")
    scheme = t.get("scheme")
    declared = fam.tensor(name)[1].quantizable
    if scheme not in (SCHEME_NONE, q["scheme"]) or (scheme != SCHEME_NONE and declared is False):
        raise _fail(f"{p}.scheme", f"{_show(scheme)} for {name} in a {q['scheme']} pack")
    if scheme != SCHEME_NONE and not contract.is_quantizable(fam, name, a):
        raise _fail(f"{p}.scheme", "an untied embedding is never quantized (FORMAT.md: the embedding rule)" if name == "embed.weight"
                    else f"{name} is quantized only when architecture.{declared} is true")
    n = numel(shape)
    if scheme == SCHEME_NONE:
        if t.get("block_size") is not None or t.get("outliers", 0) != 0:
            raise _fail(p, f"unquantized {name} must have block_size null and no outliers")
    else:
        _block_size(t.get("block_size"), f"{p}.block_size")
        if t["block_size"] != q["block_size"]:  # the converter uses one block size per pack
            raise _fail(f"{p}.block_size", f"{t['block_size']} != quantization.block_size {q['block_size']}")
        _int(t.get("outliers", 0), f"{p}.outliers", hi=n - 1)
    _num(t.get("rel_rms_error", 0.0), f"{p}.rel_rms_error", lo=0)


def _check_totals(totals: dict, layers: list, sizes: dict[str, int]) -> None:
    params = sum(l["params"] for l in layers)
    if _int(totals.get("params"), "totals.params", lo=1) != params:
        raise _fail("totals.params", f"{totals['params']} != {params}, the sum of the layers' params")
    layer_bytes = sum(sizes[l["file"]] for l in layers)
    if _int(totals.get("layer_bytes"), "totals.layer_bytes") != layer_bytes:
        raise _fail("totals.layer_bytes", f"{totals['layer_bytes']} != {layer_bytes}, the sum of the layer files' sizes")
    _num(totals.get("bits_per_param"), "totals.bits_per_param", lo=0)


def _check_quality(qd: Any) -> None:
    """Informational (`inspect` prints it): each field present must have its type; NaN/inf allowed."""
    _typed(qd, dict, "quality")
    for key in ("perplexity", "kl", "top1_agreement", "reference_perplexity", "bits_per_param", "outlier_fraction"):
        if qd.get(key) is not None and type(qd[key]) not in (int, float):
            raise _fail(f"quality.{key}", f"must be a number or null, not {_show(qd[key])}")
    for key in ("tokens", "window", "stride"):
        if qd.get(key) is not None:
            _int(qd[key], f"quality.{key}")
    for key in ("text", "reference", "scheme", "compute_dtype"):
        _typed(qd.get(key), str, f"quality.{key}", optional=True)


# -- 3. pack files ---------------------------------------------------------------------------------

def pack_roots(pack_dir: str) -> list[str]:
    """Folders a pack's files may resolve into: the pack itself, and for a pack in the Hugging Face
    cache (`<repo>/snapshots/<commit>`) its repo's `blobs/`, where the cache keeps the bytes its
    snapshot symlinks point to."""
    root = os.path.realpath(pack_dir)
    roots = [root]
    parent = os.path.dirname(os.path.abspath(pack_dir))
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.realpath(os.path.join(os.path.dirname(parent), "blobs")))
    return roots


def resolve_in_pack(pack_dir: str, rel: str, roots: list[str] | None = None) -> str:
    """The real path of pack file `rel`, refused when a symlink leads outside the pack."""
    real = os.path.realpath(os.path.join(pack_dir, rel))
    if not is_inside(real, roots or pack_roots(pack_dir)):
        raise FormatError(f"{rel}: resolves to {real}, outside the pack (a symlink leads out of it)")
    return real


def is_inside(real: str, roots: list[str]) -> bool:
    return any(real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


# -- 4. a layer file's header against its manifest entry --------------------------------------------

def stored_spec(t, pack_dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{stored name: (safetensors dtype, shape)} that the format prescribes for one tensor entry."""
    n = numel(t.shape)
    if t.scheme == SCHEME_NONE:
        return {t.name: (pack_dtype, tuple(t.shape))}
    blocks = -(-n // t.block_size)
    # int8 codes: the converter writes them flat [n]; FORMAT.md first said "same shape as W": both hold n bytes
    spec = {t.name + SUFFIX_CODES: ("I8", (n,)) if t.scheme == SCHEME_INT8 else ("U8", ((n + 1) // 2,)),
            t.name + SUFFIX_ABSMAX: ("F32", (blocks,))}
    if t.outliers:
        spec[t.name + SUFFIX_OUTLIER_IDX] = ("I32" if n < OUTLIER_IDX_I64_FROM else "I64", (t.outliers,))
        spec[t.name + SUFFIX_OUTLIER_VAL] = (pack_dtype, (t.outliers,))
    return spec


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
            raise FormatError(f"{path}: {META_ZSTD} metadata names {_show(k)}, which the file does not hold")
        if not (isinstance(v, dict) and _one_of(v.get("dtype"), ST_DTYPES) and isinstance(v.get("shape"), list)
                and len(v["shape"]) <= MAX_TENSOR_RANK and all(type(d) is int and d >= 0 for d in v["shape"])):
            raise FormatError(f"{path}: {META_ZSTD} metadata of tensor {k!r} is malformed ({_show(v)})")
        out[k] = (v["dtype"], tuple(v["shape"]))
    return out


# -- 5. payloads -----------------------------------------------------------------------------------

def check_payload(entries: Iterable, stored: dict[str, torch.Tensor], path: str) -> None:
    """Values a header cannot vouch for, checked on the bytes just read (quantized entries whose
    tables are in `stored`): absmax finite and >= 0; outlier indices strictly increasing within
    [0, n); outlier values finite. The unit's scales are checked as one concatenated tensor and its
    outlier values likewise, so a unit costs a handful of vectorised reductions (per-call overhead,
    not bytes, dominates these small tables); the culprit is looked for only on failure."""
    if not PAYLOAD_CHECKS:
        return
    quantized = [t for t in entries if t.scheme != SCHEME_NONE and t.name + SUFFIX_ABSMAX in stored]
    if not quantized:
        return
    scales = [stored[t.name + SUFFIX_ABSMAX].reshape(-1) for t in quantized]
    if not _scales_ok(torch.cat(scales) if len(scales) > 1 else scales[0]):
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
        if not _finite(torch.cat(vals) if len(vals) > 1 else vals[0]):
            bad = next(t for t, v in zip(with_outliers, vals) if not _finite(v))
            raise FormatError(f"{path}: {bad.name}{SUFFIX_OUTLIER_VAL} holds a NaN or infinite value")


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
