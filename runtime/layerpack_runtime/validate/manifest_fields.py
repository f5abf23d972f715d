"""The manifest's fields (`check_manifest`): every field the runtime or `inspect` reads has its type, range
and cross-consistency checked: identity and version, source, file list, quantization, architecture
(norm, rope, MoE, token ids), totals, quality. The layer list against the family's contract is
layer_entries.py."""
from __future__ import annotations

import re
from typing import Any

from ..errors import FormatError, VersionError
from ..format import (
    ARCH_REQUIRED, COMPRESSIONS, DTYPE_NAMES, FORMAT_MAJOR, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, MAX_EXTRA_FILES,
    SCHEME_NONE, SCHEMES,
)
from .fields import (
    checked_block_size, checked_int, checked_number, checked_type, field_error, one_of, optional_number, shown,
)
from .layer_entries import check_layers


def parse_version(v: Any) -> tuple[int, int, int]:
    if isinstance(v, str) and re.fullmatch(r"\d{1,6}\.\d{1,6}\.\d{1,6}", v):
        return tuple(int(p) for p in v.split("."))  # type: ignore[return-value]
    raise FormatError(f"manifest format_version {shown(v)} is not MAJOR.MINOR.PATCH")


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
        raise FormatError(f"not a {FORMAT_NAME} manifest (field 'format' is {shown(d.get('format')) if isinstance(d, dict) else None})")
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
    checked_type(d.get("created_by", ""), str, "created_by")
    _check_source(d["source"])
    sizes = _check_files(d["files"], len(d["layers"]))
    q = _check_quantization(d["quantization"])
    arch = d["architecture"]
    _check_architecture(arch, len(d["layers"]))
    check_layers(d["layers"], arch, q, sizes)
    _check_totals(d["totals"], d["layers"], sizes)
    if d.get("quality") is not None:
        _check_quality(d["quality"])


def _check_source(s: dict) -> None:
    checked_type(s.get("kind"), str, "source.kind")
    checked_type(s.get("id"), str, "source.id")
    checked_type(s.get("revision"), str, "source.revision", optional=True)


def _check_files(files: list, n_layers: int) -> dict[str, int]:
    if len(files) > n_layers + MAX_EXTRA_FILES:
        raise field_error("files", f"{len(files)} entries for {n_layers} layers (at most {MAX_EXTRA_FILES} files beyond the layer files)")
    sizes: dict[str, int] = {}
    for i, f in enumerate(files):
        p = f"files[{i}]"
        checked_type(f, dict, p)
        if not safe_relpath(f.get("path")) or f["path"] == MANIFEST_FILE:
            raise FormatError(f"manifest file entry {p} path {shown(f.get('path'))} is malformed or points outside the pack")
        checked_int(f.get("size"), f"{p}.size")
        if not (isinstance(f.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", f["sha256"])):
            raise field_error(f"{p}.sha256", f"must be 64 lowercase hex digits, not {shown(f.get('sha256'))}")
        if f["path"] in sizes:
            raise field_error(p, f"{f['path']!r} is listed twice")
        sizes[f["path"]] = f["size"]
    return sizes


def _check_quantization(q: dict) -> dict:
    if q.get("scheme") not in SCHEMES:
        raise FormatError(f"manifest quantization scheme {shown(q.get('scheme'))} is not one of {', '.join(SCHEMES)}")
    if not one_of(q.get("dtype"), DTYPE_NAMES):
        raise FormatError(f"manifest dtype {shown(q.get('dtype'))} is not one of {', '.join(DTYPE_NAMES)}")
    if q.get("compression", "none") not in COMPRESSIONS:
        raise FormatError(f"manifest compression {shown(q.get('compression'))} is not one of {', '.join(COMPRESSIONS)}")
    bs = q.get("block_size")
    if q["scheme"] == SCHEME_NONE:
        if bs is not None:
            raise field_error("quantization.block_size", f"must be null for scheme none, not {shown(bs)}")
    else:
        checked_block_size(bs, "quantization.block_size")
    for key in ("outlier_fraction", "head_outlier_fraction"):
        if q.get(key) is not None:
            f = checked_number(q[key], f"quantization.{key}", lo=0)
            if f >= 1:
                raise field_error(f"quantization.{key}", f"{f} must be < 1")
    checked_type(q.get("zstd_level"), int, "quantization.zstd_level", optional=True)
    checked_type(q.get("quantized_embedding", False), bool, "quantization.quantized_embedding")
    checked_type(q.get("outlier_rule"), str, "quantization.outlier_rule", optional=True)
    checked_type(q.get("calibration"), dict, "quantization.calibration", optional=True)  # 1.2, informational
    return q



_ARCH_DIMS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads")


def _check_architecture(a: dict, n_layers: int) -> None:
    missing = [k for k in ARCH_REQUIRED if k not in a]
    if missing:
        raise field_error(f"architecture.{missing[0]}", "is missing (a required field)")
    checked_type(a.get("family"), str, "architecture.family")
    for key in _ARCH_DIMS:
        checked_int(a.get(key), f"architecture.{key}", lo=1)
    # The layer list is the bytes-backed truth: num_layers of 10^9 is refused here, before anything
    # builds a per-block list (KV cache, unit names) from it.
    checked_int(a.get("num_layers"), "architecture.num_layers", lo=0)
    if a["num_layers"] != n_layers - 2:
        raise field_error("architecture.num_layers", f"{a['num_layers']} blocks, but the manifest lists {n_layers} layer units "
                    f"(embed + blocks + head)")
    for key in ("num_kv_heads", "head_dim"):
        if a.get(key) is not None:
            checked_int(a[key], f"architecture.{key}", lo=1)
    kv = a.get("num_kv_heads") or a["num_heads"]
    if a["num_heads"] % kv:
        raise field_error("architecture.num_kv_heads", f"num_heads {a['num_heads']} is not a multiple of num_kv_heads {kv}")
    if not a.get("head_dim") and a["hidden_size"] < a["num_heads"]:
        raise field_error("architecture.num_heads", f"{a['num_heads']} heads of hidden_size {a['hidden_size']} leave no head_dim")
    for key in ("max_position_embeddings", "sliding_window"):
        checked_type(a.get(key), int, f"architecture.{key}", optional=True)
        if a.get(key) is not None:
            checked_int(a[key], f"architecture.{key}")
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias", "qk_norm"):
        checked_type(a.get(key, False), bool, f"architecture.{key}")
    checked_type(a.get("activation", "silu"), str, "architecture.activation")
    # norm and rope are required in full: a reader default (eps 1e-6, theta 10000) standing in for a
    # deleted field would run the model with other numbers than its own.
    norm = checked_type(a.get("norm"), dict, "architecture.norm")
    checked_type(norm.get("type"), str, "architecture.norm.type")
    checked_number(norm.get("eps"), "architecture.norm.eps", positive=True)
    _check_rope(a.get("rope"), "architecture.rope")
    if a.get("rope_local") is not None:
        _check_rope(a["rope_local"], "architecture.rope_local")
    optional_number(a, "query_pre_attn_scalar", "architecture", positive=True)
    optional_number(a, "final_logit_softcapping", "architecture")
    optional_number(a, "attn_logit_softcapping", "architecture")
    if a.get("layer_types") is not None:
        lt = checked_type(a["layer_types"], list, "architecture.layer_types")
        if len(lt) != a["num_layers"] or not all(t in ("full_attention", "sliding_attention") for t in lt):
            raise field_error("architecture.layer_types", f"must name full_attention or sliding_attention for each of the {a['num_layers']} blocks")
    vocab = a["vocab_size"]
    for key in ("bos_token_id", "pad_token_id"):
        if a.get(key) is not None:
            checked_int(a[key], f"architecture.{key}", hi=vocab - 1)  # a pad id is embedded: it must be a row
    for i, t in enumerate(checked_type(a.get("eos_token_ids") or [], list, "architecture.eos_token_ids")):
        checked_int(t, f"architecture.eos_token_ids[{i}]", hi=vocab - 1)  # generation compares sampled ids with it
    if a.get("moe") is not None:
        _check_moe(checked_type(a["moe"], dict, "architecture.moe"), a["num_layers"])


def _check_rope(r: Any, path: str) -> None:
    checked_type(r, dict, path)
    checked_type(r.get("type"), str, f"{path}.type")
    checked_number(r.get("theta"), f"{path}.theta", positive=True)
    if r.get("partial_rotary_factor") is not None:
        checked_number(r["partial_rotary_factor"], f"{path}.partial_rotary_factor", positive=True)
    for k, v in (checked_type(r.get("scaling") or {}, dict, f"{path}.scaling")).items():
        if not (isinstance(v, (str, bool, list)) or v is None):  # HF keeps a few strings/flags/lists there
            checked_number(v, f"{path}.scaling.{k}")


def _check_moe(m: dict, n_blocks: int) -> None:
    e = checked_int(m.get("num_experts"), "architecture.moe.num_experts", lo=1)
    checked_int(m.get("top_k"), "architecture.moe.top_k", lo=1, hi=e)
    checked_int(m.get("intermediate_size"), "architecture.moe.intermediate_size", lo=1)
    checked_type(m.get("norm_topk_prob"), bool, "architecture.moe.norm_topk_prob")
    if m.get("weights_dtype") not in ("float32", "compute"):
        raise field_error("architecture.moe.weights_dtype", f"must be float32 or compute, not {shown(m.get('weights_dtype'))}")
    if m.get("shared_intermediate_size") is not None:
        checked_int(m["shared_intermediate_size"], "architecture.moe.shared_intermediate_size", lo=1)
    layers = checked_type(m.get("layers"), list, "architecture.moe.layers")
    for i, b in enumerate(layers):
        checked_int(b, f"architecture.moe.layers[{i}]", hi=n_blocks - 1)
    if len(set(layers)) != len(layers):
        raise field_error("architecture.moe.layers", "lists a block twice")



def _check_totals(totals: dict, layers: list, sizes: dict[str, int]) -> None:
    params = sum(l["params"] for l in layers)
    if checked_int(totals.get("params"), "totals.params", lo=1) != params:
        raise field_error("totals.params", f"{totals['params']} != {params}, the sum of the layers' params")
    layer_bytes = sum(sizes[l["file"]] for l in layers)
    if checked_int(totals.get("layer_bytes"), "totals.layer_bytes") != layer_bytes:
        raise field_error("totals.layer_bytes", f"{totals['layer_bytes']} != {layer_bytes}, the sum of the layer files' sizes")
    checked_number(totals.get("bits_per_param"), "totals.bits_per_param", lo=0)


def _check_quality(qd: Any) -> None:
    """Informational (`inspect` prints it): each field present must have its type; NaN/inf allowed."""
    checked_type(qd, dict, "quality")
    for key in ("perplexity", "kl", "top1_agreement", "reference_perplexity", "bits_per_param", "outlier_fraction"):
        if qd.get(key) is not None and type(qd[key]) not in (int, float):
            raise field_error(f"quality.{key}", f"must be a number or null, not {shown(qd[key])}")
    for key in ("tokens", "window", "stride"):
        if qd.get(key) is not None:
            checked_int(qd[key], f"quality.{key}")
    for key in ("text", "reference", "scheme", "compute_dtype"):
        checked_type(qd.get(key), str, f"quality.{key}", optional=True)

