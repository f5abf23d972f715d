"""Reading a Hugging Face config.json into the manifest's architecture spec, for the families the
runtime declares (layerpack_runtime/models/<family>.py: each family's pack contract, as data).

From those declarations this module also gives the converter its per-family tables (`FAMILIES`:
canonical name -> HF name pattern per unit, as convert.plan_units reads them), the expected shape of
each tensor and which tensors are quantizable: nothing about a family's tensors is written here.
What is here: every config.json field the runtime uses, read with its type and range checked
(config_fields.ConfigFields), and the config conventions that the declarations name (contract.ConfigRules).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from layerpack_runtime import models
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import UNIT_BLOCK, UNIT_EMBED, UNIT_HEAD
from layerpack_runtime.models import contract
from layerpack_runtime.models.contract import DENSE_MLP, EVERY, EXPERTS, Rows  # noqa: F401 (Rows: convert's)

from .config_fields import ConfigFields


def split_rows(part: str, arch: dict) -> tuple[int, int, int]:
    """(start, stop, fused rows) of `part` within its fused tensor under the architecture spec."""
    q, kv, i = arch["num_heads"] * arch["head_dim"], arch["num_kv_heads"] * arch["head_dim"], arch["intermediate_size"]
    table = {"q": (0, q, q + 2 * kv), "k": (q, q + kv, q + 2 * kv), "v": (q + kv, q + 2 * kv, q + 2 * kv),
             "gate": (0, i, 2 * i), "up": (i, 2 * i, 2 * i)}
    return table[part]


# Tensors some checkpoints carry that are derived buffers, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Family:
    """The converter's view of a declared family: canonical name -> HF name pattern ({i}: block),
    per unit; a Rows entry is a row range of a fused HF tensor."""
    name: str
    embed: dict[str, str]
    block: dict[str, str | Rows]
    head: dict[str, str]
    optional: dict[str, str]   # block tensors taken when the source has them
    # MoE families: naming scheme -> expert table ({j}: expert; a (pattern, part) tuple is expert j's
    # part of a per-block fused tensor); `block` is then the attention half and `dense_mlp` the MLP of
    # blocks that have no experts (Qwen3-MoE's mlp_only_layers).
    moe: dict[str, dict] = field(default_factory=dict)
    dense_mlp: dict[str, str] = field(default_factory=dict)
    contract: contract.Family | None = None


def _hf(t: contract.Tensor, scheme: str | None = None):
    h = t.hf[scheme] if isinstance(t.hf, dict) else t.hf
    return (h.pattern, h.part) if isinstance(h, contract.Fused) else h


def _converter_view(fam: contract.Family) -> Family:
    """The tables convert.plan_units reads, in the declaration's order (the order tensors are written)."""
    block = fam.unit_tensors(UNIT_BLOCK)
    moe = fam.has_experts
    return Family(
        fam.name,
        embed={n: _hf(t) for n, t in fam.unit_tensors(UNIT_EMBED).items()},
        block={n: _hf(t) for n, t in block.items() if not t.optional and (t.blocks == EVERY or not moe)},
        head={n: _hf(t) for n, t in fam.unit_tensors(UNIT_HEAD).items()},
        optional={n: _hf(t) for n, t in block.items() if t.optional},
        moe={s: {n: _hf(t, s) for n, t in block.items() if t.blocks == EXPERTS} for s in fam.moe_schemes} if moe else {},
        dense_mlp={n: _hf(t) for n, t in block.items() if t.blocks == DENSE_MLP and not t.optional} if moe else {},
        contract=fam,
    )


FAMILIES = {name: _converter_view(fam) for name, fam in models.FAMILIES.items()}
# HF `architectures[0]` -> family
ARCHITECTURES = {arch: name for name, fam in models.FAMILIES.items() for arch in fam.hf_architectures}


def supported() -> str:
    return ", ".join(f"{a} ({f})" for a, f in ARCHITECTURES.items())


def family_of(config: dict) -> Family:
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise LayerpackError(f"config.json: field 'architectures' must be a list of strings, not {json.dumps(archs)[:60]}")
    for arch in archs or []:
        if arch in ARCHITECTURES:
            return FAMILIES[ARCHITECTURES[arch]]
    name = archs[0] if archs else f"model_type {config.get('model_type')!r}"
    raise LayerpackError(f"config.json: unsupported architecture {str(name)[:80]}; supported: {supported()}")


def is_ignored(hf_name: str) -> bool:
    return hf_name.endswith(_IGNORED_SUFFIXES)


def _rope_fields(raw: dict, file: str, where: str) -> dict:
    """A rope_scaling / rope_parameters object: strings, finite numbers, or lists of finite numbers."""
    for k, v in raw.items():
        ok = (isinstance(v, str) or v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
              or (isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))
              or isinstance(v, bool))
        if not ok:
            raise LayerpackError(f"{file}: field {where}.{k} must be a number, a string or a list of numbers, not {json.dumps(v)[:60]}")
    return {k: v for k, v in raw.items() if v is not None}


# Rope types a config may name -> scaling fields each needs (what HF's rope code reads without a
# default). The runtime runs default, linear and llama3 (models/llama.ROPE_TYPES); the others convert
# (the pack records them for a later runtime) and are refused at load, in one line.
ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_ROPE_LISTS = ("short_factor", "long_factor")   # per-frequency factors: lists of positive numbers
_ROPE_INTS = ("original_max_position_embeddings",)


def _check_rope_scaling(kind: str, scaling: dict, file: str, where: str) -> None:
    """A known rope type with every field it needs, each of the right type and range."""
    if kind not in ROPE_REQUIRED:
        raise LayerpackError(f"{file}: {where} names rope type {kind[:40]!r}, which is unknown (known: {', '.join(ROPE_REQUIRED)})")
    for key in ROPE_REQUIRED[kind]:
        if key not in scaling:
            raise LayerpackError(f"{file}: {where} of rope type {kind!r} lacks its required field {key!r}")
    for key, v in scaling.items():
        if key in _ROPE_LISTS:
            if not isinstance(v, list) or not v or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in v):
                raise LayerpackError(f"{file}: field '{where}.{key}' must be a non-empty list of positive numbers, not {json.dumps(v)[:60]}")
        elif key in _ROPE_INTS:
            ConfigFields({f"{where}.{key}": v}, file).int(f"{where}.{key}", hi=1 << 40)
        elif key.endswith("factor") or key in ("beta_fast", "beta_slow"):
            ConfigFields({f"{where}.{key}": v}, file).float(f"{where}.{key}")
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        # the runtime divides by their difference
        raise LayerpackError(f"{file}: {where}.high_freq_factor ({scaling['high_freq_factor']}) must exceed "
                             f"low_freq_factor ({scaling['low_freq_factor']})")


def _rope(config: dict, file: str = "config.json") -> dict:
    """Normalise HF's two spellings (transformers<5: rope_theta + rope_scaling; >=5: rope_parameters)."""
    c = ConfigFields(config, file)
    params = _rope_fields(c.dict("rope_parameters"), file, "rope_parameters")
    scaling = _rope_fields(c.dict("rope_scaling"), file, "rope_scaling")
    top_theta = c.float("rope_theta", 10000.0)  # checked even when rope_parameters has the one used
    theta = params.pop("rope_theta", None)
    theta = ConfigFields({"rope_parameters.rope_theta": theta}, file).float("rope_parameters.rope_theta", None) \
        if theta is not None else top_theta
    merged = {**scaling, **params}
    where = "rope_parameters" if params else "rope_scaling"
    kind = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if not isinstance(kind, str):
        raise LayerpackError(f"{file}: field {where}.rope_type must be a string, not {json.dumps(kind)[:60]}")
    kind = {"su": "longrope"}.get(kind, kind)  # Phi-3's old name (transformers renames it too)
    _check_rope_scaling(kind, merged, file, where)
    prf = merged.pop("partial_rotary_factor", None)
    prf = ConfigFields({"partial_rotary_factor": prf}, file).float("partial_rotary_factor", None) if prf is not None \
        else c.float("partial_rotary_factor", None)
    if prf is not None and prf > 1:
        raise LayerpackError(f"{file}: field 'partial_rotary_factor' must be in (0, 1], not {prf}")
    rope = {"type": kind, "theta": float(theta)}
    if kind != "default":
        rope["scaling"] = {k: merged[k] for k in sorted(merged)}
    if prf not in (None, 1, 1.0):
        rope["partial_rotary_factor"] = float(prf)
    return rope


def _layer_type_ropes(config: dict, r: contract.LayerTypeRopes) -> tuple[dict, dict]:
    """The global rope (`rope`) and the local one (`rope_local`, sliding blocks) of a family that
    declares a table per layer type (ConfigRules.layer_type_ropes), from either spelling:
    rope_parameters per layer type (transformers>=5), or rope_theta + rope_scaling (global) and
    r.local_theta_field (local)."""
    c = ConfigFields(config)
    params = c.dict("rope_parameters")
    if "full_attention" in params or "sliding_attention" in params:
        per_type = ConfigFields(params, "config.json rope_parameters")
        full = _rope({"rope_parameters": {"rope_theta": r.global_theta, **per_type.dict("full_attention")}})
        local = _rope({"rope_parameters": {"rope_theta": r.local_theta, **per_type.dict("sliding_attention")}})
    else:
        full = _rope({"rope_theta": r.global_theta, **{k: v for k, v in config.items() if v is not None}})
        local = {"type": "default", "theta": c.float(r.local_theta_field, r.local_theta)}
    return full, local


def architecture_spec(config: dict, generation_config: dict | None = None) -> dict:
    """The manifest's `architecture` object: everything the runtime needs, nothing it must guess.
    Every field read is type- and range-checked (ConfigFields): a bad config.json fails here, with
    its file and field named, before anything is read or written."""
    fam = family_of(config)
    c = ConfigFields(config)
    g = ConfigFields(generation_config or {}, "generation_config.json")
    heads = c.int("num_attention_heads")
    hidden = c.int("hidden_size")
    layers = c.int("num_hidden_layers")
    head_dim = c.int("head_dim", None)
    if head_dim is None:
        if hidden % heads:
            raise LayerpackError(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads} (and no head_dim)")
        head_dim = hidden // heads
    kv_heads = c.int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise LayerpackError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    sliding = c.int("sliding_window", None, lo=0) or None  # 0: no window (Qwen2-MoE writes 0)
    rules = fam.contract.config
    if rules.window_flag and not c.bool(rules.window_flag, False):
        sliding = None  # qwen2/3 configs carry a window they do not use unless use_sliding_window is set
    layer_types = c.str_list("layer_types", layers)
    if layer_types is not None and not set(layer_types) <= {"full_attention", "sliding_attention"}:
        raise LayerpackError(f"config.json: field 'layer_types' must name full_attention or sliding_attention for each block, "
                             f"not {sorted(set(layer_types) - {'full_attention', 'sliding_attention'})[0][:40]!r}")
    if layer_types is None and rules.window_layers == "period" and sliding:
        # Older configs give a period: every `sliding_window_pattern`-th block is global (transformers' rule).
        period = c.int("sliding_window_pattern", None) or c.int("_sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
    if layer_types is None and rules.window_layers == "max_window_layers" and sliding:
        # Qwen2/3 window only blocks >= max_window_layers (transformers' rule when the config predates layer_types).
        first = c.int("max_window_layers", layers, lo=0)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    archs = config.get("architectures")
    # both files are checked; generation_config.json's value wins where it has the key
    special = {k: (lambda from_config: g.ids(k) if k in g.d else from_config)(c.ids(k))
               for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    vocab = c.int("vocab_size")
    for k, ids in special.items():
        if any(t >= vocab for t in ids):  # an id the embedding has no row for
            file = "generation_config.json" if k in g.d else "config.json"
            raise LayerpackError(f"{file}: field {k!r} holds token id {max(ids)}, outside the vocabulary of {vocab} (vocab_size)")
    activation_key = "hidden_activation" if c.str("hidden_activation") else "hidden_act"
    activation = c.str(activation_key, "silu")
    runs = models.module_for(fam.name).ModelArgs.activations
    if activation not in runs:  # refused here, not when the pack is run
        raise LayerpackError(f"config.json: field {activation_key!r} is {activation[:40]!r}; the {fam.name} family runs "
                             f"{', '.join(runs)}")
    spec = {
        "family": fam.name,
        "hf_architecture": archs[0],
        "model_type": c.str("model_type"),
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": c.int("intermediate_size"),
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": c.int("max_position_embeddings", 0, lo=0),
        "norm": {"type": "rms", "eps": c.float("rms_norm_eps", 1e-6)},
        "rope": _rope(config) if rules.layer_type_ropes is None else None,  # else set below
        # gemma: hidden_activation
        "activation": activation,
        "tie_word_embeddings": c.bool("tie_word_embeddings", rules.tie_word_embeddings),
        # qwen2_moe spells it qkv_bias (q/k/v only, like qwen2)
        "attention_bias": c.bool("attention_bias", c.bool("qkv_bias", rules.attention_bias)),
        "mlp_bias": c.bool("mlp_bias", False),
        "sliding_window": sliding if sliding else None,
        # per block "full_attention" | "sliding_attention" when blocks differ; None: all blocks alike
        "layer_types": list(layer_types) if layer_types and sliding else None,
        "qk_norm": "attn.q_norm.weight" in fam.contract.tensors,
        "bos_token_id": (special["bos_token_id"] or [None])[0],
        "eos_token_ids": special["eos_token_id"],
        "pad_token_id": (special["pad_token_id"] or [None])[0],
    }
    for flag, refusal in rules.refused:
        if c.bool(flag, False):
            raise LayerpackError(refusal)
    if rules.layer_type_ropes is not None:
        spec["rope"], spec["rope_local"] = _layer_type_ropes(config, rules.layer_type_ropes)
    if rules.query_pre_attn_scalar:
        spec["query_pre_attn_scalar"] = c.float("query_pre_attn_scalar", None) or float(spec["head_dim"])
    if rules.softcapping:
        spec["attn_logit_softcapping"] = c.float("attn_logit_softcapping", None)
        spec["final_logit_softcapping"] = c.float("final_logit_softcapping", None)
    if fam.moe:
        spec["moe"] = _moe_spec(fam, config, layers)
    return spec


def _moe_spec(fam: Family, config: dict, layers: int) -> dict:
    """Experts per block, routing, and which blocks have experts (the rest have a dense MLP)."""
    c = ConfigFields(config)
    experts = c.int("num_local_experts", None) or c.int("num_experts", 0, lo=0)
    top_k = c.int("num_experts_per_tok", 0, lo=0)
    if not 0 < top_k <= experts:
        raise LayerpackError(f"config.json: num_experts_per_tok={top_k} must be between 1 and the {experts} experts")
    step = c.int("decoder_sparse_step", 1)
    dense_only = set(c.int_list("mlp_only_layers", layers))
    return {
        "num_experts": experts,
        "top_k": top_k,
        "intermediate_size": c.int("moe_intermediate_size", None) or c.int("intermediate_size"),
        # Mixtral always renormalises the top-k probabilities; Qwen MoE only with norm_topk_prob.
        "norm_topk_prob": c.bool("norm_topk_prob", fam.contract.config.moe_norm_topk_prob),
        # Mixtral weights the expert outputs with float32 routing weights; Qwen MoE casts them to
        # the hidden states' dtype first (a visible difference in bf16).
        "weights_dtype": fam.contract.config.moe_weights_dtype,
        "layers": [i for i in range(layers) if i not in dense_only and (i + 1) % step == 0],
        # Qwen2-MoE's shared expert (null: none)
        "shared_intermediate_size": c.int("shared_expert_intermediate_size") if "moe.shared.gate.weight" in fam.contract.tensors else None,
    }


def expected_shape(canonical: str, arch: dict) -> list[int] | None:
    """Shape each canonical tensor must have under the architecture spec (catches configs that do
    not match their weights before anything is written); None: not a tensor of the family."""
    shape = contract.shape_of(models.family_of_pack(arch["family"]), canonical, arch)
    return list(shape) if shape is not None else None
