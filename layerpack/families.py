"""Supported Hugging Face families: the HF-name -> canonical-name tables (data, not code) and the
translation of a HF config.json into the manifest's architecture spec.

Canonical names are architecture-neutral so one runtime module per family reads them:
  embed unit:  embed.weight
  block unit:  attn_norm.weight, attn.{q,k,v,o}.weight (+ .bias), attn.{q,k}_norm.weight (qwen3, gemma3),
               attn_post_norm.weight (gemma3), mlp_norm.weight, mlp.{gate,up,down}.weight,
               mlp_post_norm.weight (gemma3)
  head unit:   norm.weight, head.weight (absent when the embedding is tied)
  MoE blocks:  the attention tensors, moe.router.weight, moe.experts.{j}.{gate,up,down}.weight per expert j
Weights keep Hugging Face's layout (rotary q/k rows in HF's rotate-half order; [out, in] linears).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from layerpack_runtime import models
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import EXPERT_PREFIX


@dataclass(frozen=True)
class Rows:
    """A canonical tensor that is a row range of a fused HF tensor (Phi-3's qkv_proj, gate_up_proj).
    The converter splits fused projections so that every family shares one runtime code path and
    quantization blocks never straddle two projections (docs/FORMAT.md)."""
    pattern: str   # HF name pattern of the fused tensor
    part: str      # q | k | v (of q,k,v stacked by rows) or gate | up (of gate,up stacked by rows)


def split_rows(part: str, arch: dict) -> tuple[int, int, int]:
    """(start, stop, fused rows) of `part` within its fused tensor under the architecture spec."""
    q, kv, i = arch["num_heads"] * arch["head_dim"], arch["num_kv_heads"] * arch["head_dim"], arch["intermediate_size"]
    table = {"q": (0, q, q + 2 * kv), "k": (q, q + kv, q + 2 * kv), "v": (q + kv, q + 2 * kv, q + 2 * kv),
             "gate": (0, i, 2 * i), "up": (i, 2 * i, 2 * i)}
    return table[part]

# One table per family: canonical name -> HF name pattern ({i} = block index), and whether it must exist.
_LLAMA_BLOCK = {
    "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "attn.q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "attn.k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "attn.v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "attn.o.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "mlp.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "mlp.up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# The attention half of a block (every family has it; MoE blocks replace the MLP half).
_ATTN_BLOCK = {k: v for k, v in _LLAMA_BLOCK.items() if not k.startswith("mlp.")}
_DENSE_MLP = {k: v for k, v in _LLAMA_BLOCK.items() if k.startswith("mlp.")}
# Present only when the config enables them (llama attention_bias / mlp_bias; always for qwen2 q/k/v).
_OPTIONAL_BIASES = {
    "attn.q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "attn.k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "attn.v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "attn.o.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "mlp.gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "mlp.up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "mlp.down.bias": "model.layers.{i}.mlp.down_proj.bias",
}
# Qwen2 always has q/k/v biases (and no o bias).
_QWEN2_BLOCK = {**_LLAMA_BLOCK, **{k: v for k, v in _OPTIONAL_BIASES.items() if k in ("attn.q.bias", "attn.k.bias", "attn.v.bias")}}
# Qwen3: llama's block, no biases by default (attention_bias adds all four), plus per-head q/k norms.
_QK_NORMS = {
    "attn.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "attn.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
_QWEN3_BLOCK = {**_LLAMA_BLOCK, **_QK_NORMS}
# Phi-3: fused projections, split at conversion into llama's canonical tensors (HF's
# Phi3Attention slices qkv rows as q | k | v; Phi3MLP chunks gate_up rows as gate | up).
_PHI3_BLOCK = {
    "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "attn.q.weight": Rows("model.layers.{i}.self_attn.qkv_proj.weight", "q"),
    "attn.k.weight": Rows("model.layers.{i}.self_attn.qkv_proj.weight", "k"),
    "attn.v.weight": Rows("model.layers.{i}.self_attn.qkv_proj.weight", "v"),
    "attn.o.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "mlp.gate.weight": Rows("model.layers.{i}.mlp.gate_up_proj.weight", "gate"),
    "mlp.up.weight": Rows("model.layers.{i}.mlp.gate_up_proj.weight", "up"),
    "mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Gemma 3 text: norms before and after attention and the MLP, q/k norms. HF's
# post_attention_layernorm follows attention here (in llama it precedes the MLP).
_GEMMA3_BLOCK = {
    "attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "attn.q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "attn.k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "attn.v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "attn.o.weight": "model.layers.{i}.self_attn.o_proj.weight",
    **_QK_NORMS,
    "attn_post_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "mlp_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "mlp.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "mlp.up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "mlp_post_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
_EMBED = {"embed.weight": "model.embed_tokens.weight"}
_HEAD = {"norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
# Tensors some checkpoints carry that are derived buffers, not weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# Mixture-of-experts weights, per naming scheme a checkpoint may use ({j} = expert index). Checkpoints on
# the Hub (and transformers 5's save_pretrained, which converts back) store one tensor per expert;
# transformers 5's in-memory state dict fuses them per block: experts.gate_up_proj [E, 2I, H] (gate rows
# first, then up) and experts.down_proj [E, H, I]. A fused source is (tensor pattern, part): part
# "gate" / "up" = expert j's first / second half of gate_up_proj rows, "expert" = expert j's slice.
# Every such part is a contiguous byte range of the source tensor, so it is read without the rest.
_MIXTRAL_MOE = {
    "per_expert": {
        "moe.router.weight": "model.layers.{i}.block_sparse_moe.gate.weight",
        "moe.experts.{j}.gate.weight": "model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
        "moe.experts.{j}.up.weight": "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight",
        "moe.experts.{j}.down.weight": "model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight",
    },
    "fused": {
        "moe.router.weight": "model.layers.{i}.mlp.gate.weight",
        "moe.experts.{j}.gate.weight": ("model.layers.{i}.mlp.experts.gate_up_proj", "gate"),
        "moe.experts.{j}.up.weight": ("model.layers.{i}.mlp.experts.gate_up_proj", "up"),
        "moe.experts.{j}.down.weight": ("model.layers.{i}.mlp.experts.down_proj", "expert"),
    },
}
_QWEN_MOE = {
    "per_expert": {
        "moe.router.weight": "model.layers.{i}.mlp.gate.weight",
        "moe.experts.{j}.gate.weight": "model.layers.{i}.mlp.experts.{j}.gate_proj.weight",
        "moe.experts.{j}.up.weight": "model.layers.{i}.mlp.experts.{j}.up_proj.weight",
        "moe.experts.{j}.down.weight": "model.layers.{i}.mlp.experts.{j}.down_proj.weight",
    },
    "fused": _MIXTRAL_MOE["fused"],
}
# Qwen2-MoE adds a shared expert that every token uses (a dense SwiGLU MLP, scaled by a sigmoid gate):
# part of the block's dense tensors (read with attention and router), never selected.
_SHARED_EXPERT = {
    "moe.shared.gate.weight": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "moe.shared.up.weight": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "moe.shared.down.weight": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
    "moe.shared_gate.weight": "model.layers.{i}.mlp.shared_expert_gate.weight",
}
_QWEN2_MOE = {scheme: {**table, **_SHARED_EXPERT} for scheme, table in _QWEN_MOE.items()}


@dataclass(frozen=True)
class Family:
    name: str
    embed: dict[str, str]
    block: dict[str, str | Rows]
    head: dict[str, str]
    optional: dict[str, str]
    # MoE families: naming scheme -> expert table (see _MIXTRAL_MOE); `block` is then the attention half
    # and `dense_mlp` the MLP of blocks that have no experts (Qwen3-MoE's mlp_only_layers).
    moe: dict[str, dict] = field(default_factory=dict)
    dense_mlp: dict[str, str] = field(default_factory=dict)


FAMILIES = {
    "llama": Family("llama", _EMBED, _LLAMA_BLOCK, _HEAD, _OPTIONAL_BIASES),
    "mistral": Family("mistral", _EMBED, _LLAMA_BLOCK, _HEAD, _OPTIONAL_BIASES),
    "qwen2": Family("qwen2", _EMBED, _QWEN2_BLOCK, _HEAD, _OPTIONAL_BIASES),
    "qwen3": Family("qwen3", _EMBED, _QWEN3_BLOCK, _HEAD, _OPTIONAL_BIASES),
    "phi3": Family("phi3", _EMBED, _PHI3_BLOCK, _HEAD, {}),
    "gemma3": Family("gemma3", _EMBED, _GEMMA3_BLOCK, _HEAD, _OPTIONAL_BIASES),
    "mixtral": Family("mixtral", _EMBED, _ATTN_BLOCK, _HEAD, {}, moe=_MIXTRAL_MOE, dense_mlp=_DENSE_MLP),
    "qwen3_moe": Family("qwen3_moe", _EMBED, {**_ATTN_BLOCK, **_QK_NORMS}, _HEAD, {}, moe=_QWEN_MOE, dense_mlp=_DENSE_MLP),
    "qwen2_moe": Family("qwen2_moe", _EMBED, _ATTN_BLOCK, _HEAD, _OPTIONAL_BIASES, moe=_QWEN2_MOE, dense_mlp=_DENSE_MLP),
}
# HF `architectures[0]` -> family
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
# Linear weights that block quantization applies to. Norms and biases always stay in the pack
# dtype; the embedding is quantized only when tied (then it is also the head; see docs/FORMAT.md).
QUANTIZABLE = {
    "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
    "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight", "head.weight",
}
# Expert linears (and the shared expert's) are quantized like the dense MLP's; the router (a tiny
# [experts, hidden] matrix whose argmax decides which experts run) and the shared expert's [1, hidden]
# gate always stay in the pack dtype.
_EXPERT_LINEAR = re.compile(r"moe\.(experts\.\d+|shared)\.(gate|up|down)\.weight")


def is_quantizable(canonical: str) -> bool:
    return canonical in QUANTIZABLE or _EXPERT_LINEAR.fullmatch(canonical) is not None


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


# Upper bounds far above any real model (Llama 3.1 405B: hidden 16384, 126 layers, vocab 128256,
# intermediate 53248, 128 heads), there only so that a corrupt number fails here instead of
# allocating per-layer tables or overflowing later.
_MAX = {"vocab_size": 1 << 24, "hidden_size": 1 << 20, "intermediate_size": 1 << 22, "num_hidden_layers": 1 << 14,
        "num_attention_heads": 1 << 14, "num_key_value_heads": 1 << 14, "head_dim": 1 << 14,
        "max_position_embeddings": 1 << 40, "sliding_window": 1 << 40, "num_local_experts": 1 << 16,
        "num_experts": 1 << 16, "num_experts_per_tok": 1 << 16, "moe_intermediate_size": 1 << 22,
        "shared_expert_intermediate_size": 1 << 22, "decoder_sparse_step": 1 << 14, "max_window_layers": 1 << 14,
        "sliding_window_pattern": 1 << 14, "_sliding_window_pattern": 1 << 14}
_NO_VALUE = object()


class ConfigFields:
    """Typed, bounded reads of a config.json (or generation_config.json) object: every wrong type,
    missing required field or out-of-range number is a LayerpackError naming the file and the field.
    JSON null counts as absent (real configs write null for unused optional fields)."""

    def __init__(self, config: dict, file: str = "config.json"):
        self.d, self.file = config, file

    def _bad(self, key: str, want: str, v) -> LayerpackError:
        shown = json.dumps(v)[:60] if not isinstance(v, float) or math.isfinite(v) else str(v)
        return LayerpackError(f"{self.file}: field {key!r} must be {want}, not {shown}")

    def get(self, key: str, default=None):
        v = self.d.get(key)
        return default if v is None else v

    def int(self, key: str, default=_NO_VALUE, lo: int = 1, hi: int | None = None) -> int:
        v = self.d.get(key)
        if v is None:
            if default is _NO_VALUE:
                raise LayerpackError(f"{self.file}: required field {key!r} is missing")
            return default
        hi = hi if hi is not None else _MAX.get(key, 1 << 40)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self._bad(key, f"an integer in [{lo}, {hi}]", v)
        return v

    def float(self, key: str, default=_NO_VALUE, positive: bool = True) -> float:
        v = self.d.get(key)
        if v is None:
            if default is _NO_VALUE:
                raise LayerpackError(f"{self.file}: required field {key!r} is missing")
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise self._bad(key, "a positive number" if positive else "a finite number", v)
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):  # "false" (a string) is true in Python: never guess
            raise self._bad(key, "true or false", v)
        return v

    def str(self, key: str, default: str | None = None) -> str | None:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise self._bad(key, "a string", v)
        return v

    def dict(self, key: str) -> dict:
        v = self.d.get(key)
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self._bad(key, "an object", v)
        return v

    def ids(self, key: str, default=None) -> list[int]:
        """A token id or a list of token ids."""
        v = self.d.get(key, default)
        if v is None:
            return []
        items = v if isinstance(v, list) else [v]
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < (1 << 31) for x in items):
            raise self._bad(key, "a token id or a list of token ids", v)
        return list(items)

    def int_list(self, key: str, hi: int) -> list[int]:
        v = self.d.get(key)
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < hi for x in v):
            raise self._bad(key, f"a list of block indices below {hi}", v)
        return v

    def str_list(self, key: str, length: int) -> list[str] | None:
        v = self.d.get(key)
        if v is None:
            return None
        if not isinstance(v, list) or len(v) != length or not all(isinstance(x, str) for x in v):
            raise self._bad(key, f"a list of {length} strings (one per block)", v)
        return v


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


def _gemma3(config: dict) -> tuple[dict, dict]:
    """Gemma 3's global rope (`rope`) and local rope (`rope_local`, sliding blocks), from either
    spelling: rope_parameters per layer type (transformers>=5), or rope_theta + rope_scaling
    (global) and rope_local_base_freq (local)."""
    c = ConfigFields(config)
    if c.bool("use_bidirectional_attention", False):
        raise LayerpackError("Gemma 3 with bidirectional attention (an embedding model) is not supported")
    params = c.dict("rope_parameters")
    if "full_attention" in params or "sliding_attention" in params:
        per_type = ConfigFields(params, "config.json rope_parameters")
        full = _rope({"rope_parameters": {"rope_theta": 1_000_000.0, **per_type.dict("full_attention")}})
        local = _rope({"rope_parameters": {"rope_theta": 10_000.0, **per_type.dict("sliding_attention")}})
    else:
        full = _rope({"rope_theta": 1_000_000.0, **{k: v for k, v in config.items() if v is not None}})  # Gemma 3's default global theta
        local = {"type": "default", "theta": c.float("rope_local_base_freq", 10_000.0)}
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
    if fam.name in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe") and not c.bool("use_sliding_window", False):
        sliding = None  # qwen2/3 configs carry a window they do not use unless use_sliding_window is set
    layer_types = c.str_list("layer_types", layers)
    if layer_types is not None and not set(layer_types) <= {"full_attention", "sliding_attention"}:
        raise LayerpackError(f"config.json: field 'layer_types' must name full_attention or sliding_attention for each block, "
                             f"not {sorted(set(layer_types) - {'full_attention', 'sliding_attention'})[0][:40]!r}")
    if layer_types is None and fam.name == "gemma3" and sliding:
        # Older configs give a period: every `sliding_window_pattern`-th block is global (transformers' rule).
        period = c.int("sliding_window_pattern", None) or c.int("_sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(layers)]
    if layer_types is None and fam.name in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe") and sliding:
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
        "rope": _rope(config) if fam.name != "gemma3" else None,  # gemma3: set below
        # gemma: hidden_activation
        "activation": activation,
        "tie_word_embeddings": c.bool("tie_word_embeddings", fam.name == "gemma3"),
        # qwen2_moe spells it qkv_bias (q/k/v only, like qwen2)
        "attention_bias": c.bool("attention_bias", c.bool("qkv_bias", fam.name == "qwen2")),
        "mlp_bias": c.bool("mlp_bias", False),
        "sliding_window": sliding if sliding else None,
        # per block "full_attention" | "sliding_attention" when blocks differ; None: all blocks alike
        "layer_types": list(layer_types) if layer_types and sliding else None,
        "qk_norm": "attn.q_norm.weight" in fam.block,
        "bos_token_id": (special["bos_token_id"] or [None])[0],
        "eos_token_ids": special["eos_token_id"],
        "pad_token_id": (special["pad_token_id"] or [None])[0],
    }
    if fam.name == "gemma3":
        spec["rope"], spec["rope_local"] = _gemma3(config)
        spec["query_pre_attn_scalar"] = c.float("query_pre_attn_scalar", None) or float(spec["head_dim"])
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
        "norm_topk_prob": c.bool("norm_topk_prob", fam.name == "mixtral"),
        # Mixtral weights the expert outputs with float32 routing weights; Qwen MoE casts them to
        # the hidden states' dtype first (a visible difference in bf16).
        "weights_dtype": "float32" if fam.name == "mixtral" else "compute",
        "layers": [i for i in range(layers) if i not in dense_only and (i + 1) % step == 0],
        # Qwen2-MoE's shared expert (null: none)
        "shared_intermediate_size": c.int("shared_expert_intermediate_size") if "moe.shared.gate.weight" in fam.moe["fused"] else None,
    }


def expected_shape(canonical: str, arch: dict) -> list[int] | None:
    """Shape each canonical tensor must have under the architecture spec (catches configs that do
    not match their weights before anything is written)."""
    h, i, v = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"]
    moe = arch.get("moe")
    if moe and canonical.startswith("moe.shared"):
        s_i = moe["shared_intermediate_size"]
        return {"moe.shared.gate.weight": [s_i, h], "moe.shared.up.weight": [s_i, h], "moe.shared.down.weight": [h, s_i],
                "moe.shared_gate.weight": [1, h]}.get(canonical)
    if moe and canonical.startswith(EXPERT_PREFIX):
        e_i = moe["intermediate_size"]
        return {"gate": [e_i, h], "up": [e_i, h], "down": [h, e_i]}.get(canonical.split(".")[-2])
    if moe and canonical == "moe.router.weight":
        return [moe["num_experts"], h]
    q, kv = arch["num_heads"] * arch["head_dim"], arch["num_kv_heads"] * arch["head_dim"]
    table = {
        "embed.weight": [v, h], "head.weight": [v, h], "norm.weight": [h],
        "attn_norm.weight": [h], "mlp_norm.weight": [h], "attn_post_norm.weight": [h], "mlp_post_norm.weight": [h],
        "attn.q.weight": [q, h], "attn.k.weight": [kv, h], "attn.v.weight": [kv, h], "attn.o.weight": [h, q],
        "attn.q_norm.weight": [arch["head_dim"]], "attn.k_norm.weight": [arch["head_dim"]],
        "attn.q.bias": [q], "attn.k.bias": [kv], "attn.v.bias": [kv], "attn.o.bias": [h],
        "mlp.gate.weight": [i, h], "mlp.up.weight": [i, h], "mlp.down.weight": [h, i],
        "mlp.gate.bias": [i], "mlp.up.bias": [i], "mlp.down.bias": [h],
    }
    return table.get(canonical)
