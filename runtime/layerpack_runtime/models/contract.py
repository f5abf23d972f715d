"""The pack contract, as data: what each family's packs hold, declared once per family.

Each `models/<family>.py` declares `FAMILY = Family(...)`: its canonical tensors (name -> unit kind,
shape from the architecture, quantizable or not, which blocks have it, the Hugging Face name it is
converted from), the runtime module whose code runs it, the HF architectures it converts from, and
the few config.json conventions that differ between families (ConfigRules). Everything else is
derived from these declarations, by the reader and by the converter alike:
- validation of a manifest's tensors (validate/layer_entries.py: names, units, shapes, schemes),
- the tensors a unit must hold (check_unit, called by the loader and `verify`),
- the converter's unit plan (HF name -> unit and canonical name) and expected source shapes, and its
  scheme choice (quantizable tensors take the pack's scheme, the rest stay in the pack dtype).
The stored layout of a tensor follows from its scheme alone (validate.stored_layout, docs/FORMAT.md).

Canonical names (architecture-neutral, so one runtime module serves several families):
  embed unit:  embed.weight
  block unit:  attn_norm.weight, attn.{q,k,v,o}.weight (+ .bias), attn.{q,k}_norm.weight,
               attn_post_norm.weight, mlp_norm.weight, mlp.{gate,up,down}.weight (+ .bias),
               mlp_post_norm.weight; MoE blocks: moe.router.weight, moe.experts.{j}.{gate,up,down}.weight,
               moe.shared.{gate,up,down}.weight, moe.shared_gate.weight
  head unit:   norm.weight, head.weight (absent when the embedding is tied)
Weights keep Hugging Face's layout (rotary q/k rows in HF's rotate-half order; [out, in] linears).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import FormatError
from ..format import EXPERT_PREFIX, ROUTER_WEIGHT, UNIT_BLOCK, UNIT_EMBED, UNIT_HEAD

# Which blocks hold a block tensor: every block; blocks without experts (a dense MLP: every block
# of a dense family, architecture.moe's other blocks in an MoE family); blocks with experts.
EVERY, DENSE_MLP, EXPERTS = "every", "dense_mlp", "experts"
EXPERT_INDEX = "{j}"   # in an expert tensor's canonical name and HF pattern; "{i}" is the block index


@dataclass(frozen=True)
class Rows:
    """A canonical tensor that is a row range of a fused HF tensor (Phi-3's qkv_proj, gate_up_proj).
    The converter splits fused projections so that every family shares one runtime code path and
    quantization blocks never straddle two projections (docs/FORMAT.md)."""
    pattern: str   # HF name pattern of the fused tensor
    part: str      # q | k | v (of q,k,v stacked by rows) or gate | up (of gate,up stacked by rows)


@dataclass(frozen=True)
class Fused:
    """Expert j's part of a per-block tensor that holds every expert (transformers 5's in-memory
    layout: experts.gate_up_proj [E, 2I, H], gate rows first; experts.down_proj [E, H, I])."""
    pattern: str
    part: str      # gate | up (halves of expert j's gate_up rows) | expert (expert j's slice)


@dataclass(frozen=True)
class Tensor:
    """One canonical tensor of a family's packs."""
    unit: str                          # embed | block | head
    shape: tuple[str, ...]             # dimension names (see dims())
    hf: "str | Rows | dict[str, str | Fused]"  # HF name pattern; MoE tensors: {naming scheme: pattern}
    quantizable: bool | str = False    # True, False, or the architecture flag that makes it so
    blocks: str = EVERY                # EVERY | DENSE_MLP | EXPERTS (block tensors)
    needs: str | None = None           # architecture flag: present exactly when it is true ("!flag": false)
    optional: bool = False             # may be present (the converter takes it when the source has it)


@dataclass(frozen=True)
class LayerTypeRopes:
    """Rotary tables per layer type: full-attention blocks use `rope`, sliding ones `rope_local`
    (Gemma 3). Read from rope_parameters per layer type (transformers>=5), or from rope_theta +
    rope_scaling (global) and `local_theta_field` (local, always the default rope type)."""
    global_theta: float                # default theta of the global table when config.json gives none
    local_theta: float                 # default theta of the local table
    local_theta_field: str             # older configs' field holding the local theta


@dataclass(frozen=True)
class ConfigRules:
    """How this family's config.json differs from the common reading (layerpack/families.py)."""
    tie_word_embeddings: bool = False  # default when config.json does not say
    attention_bias: bool = False       # default when config.json does not say
    window_flag: str | None = None     # a config flag without which sliding_window is ignored (Qwen)
    window_layers: str | None = None   # older configs without layer_types: "max_window_layers" | "period"
    layer_type_ropes: LayerTypeRopes | None = None  # None: one rope table for every block
    query_pre_attn_scalar: bool = False  # reads query_pre_attn_scalar (default: head_dim)
    softcapping: bool = False          # reads attn_logit_softcapping and final_logit_softcapping (null: none)
    refused: tuple[tuple[str, str], ...] = ()  # (config flag, error): a checkpoint with the flag true is refused
    moe_norm_topk_prob: bool = False   # default of norm_topk_prob
    moe_weights_dtype: str = "compute"  # routing weights in float32 or in the compute dtype


@dataclass(frozen=True)
class Family:
    name: str
    runs: str                          # runtime module with its code: llama | gemma3 | mixtral
    hf_architectures: tuple[str, ...]  # HF config `architectures` entries converted as this family
    tensors: dict[str, Tensor]         # canonical name (experts: with {j}) -> Tensor, in file order
    config: ConfigRules = field(default_factory=ConfigRules)
    moe_schemes: tuple[str, ...] = ()  # MoE source naming schemes, the usual one first

    # -- lookups -----------------------------------------------------------------------------------
    def tensor(self, name: str) -> tuple[str, Tensor, int | None] | None:
        """(declared name, Tensor, expert index or None) of a canonical name, or None if undeclared."""
        t = self.tensors.get(name)
        if t is not None:
            return name, t, None
        m = _EXPERT_NAME.fullmatch(name)
        if m:
            declared = f"{EXPERT_PREFIX}{EXPERT_INDEX}.{m.group(2)}.weight"
            if declared in self.tensors:
                return declared, self.tensors[declared], int(m.group(1))
        return None

    @property
    def has_experts(self) -> bool:
        return any(t.blocks == EXPERTS for t in self.tensors.values())

    def unit_tensors(self, unit: str) -> dict[str, Tensor]:
        return {n: t for n, t in self.tensors.items() if t.unit == unit}


_EXPERT_NAME = re.compile(re.escape(EXPERT_PREFIX) + r"(0|[1-9]\d{0,8})\.(gate|up|down)\.weight")


def dims(arch: dict) -> dict[str, int]:
    """Named dimensions of an architecture spec (the manifest's `architecture`)."""
    h, heads = arch["hidden_size"], arch["num_heads"]
    hd = arch.get("head_dim") or h // heads
    kv = arch.get("num_kv_heads") or heads
    d = {"h": h, "i": arch["intermediate_size"], "v": arch["vocab_size"], "hd": hd, "q": heads * hd, "kv": kv * hd, "1": 1}
    moe = arch.get("moe")
    if moe:
        d.update(e=moe["num_experts"], ei=moe["intermediate_size"])
        if moe.get("shared_intermediate_size"):
            d["si"] = moe["shared_intermediate_size"]
    return d


def flag(arch: dict, name: str) -> bool:
    return not arch.get(name[1:]) if name.startswith("!") else bool(arch.get(name))


def shape_of(fam: Family, name: str, arch: dict) -> tuple[int, ...] | None:
    """The shape `name` must have under `arch`; None when the family has no such tensor (or the
    architecture lacks a dimension it needs, e.g. experts beyond moe.num_experts)."""
    found = fam.tensor(name)
    if found is None:
        return None
    _, t, j = found
    d = dims(arch)
    if j is not None and j >= d.get("e", 0):
        return None
    if not all(k in d for k in t.shape):
        return None
    return tuple(d[k] for k in t.shape)


def is_quantizable(fam: Family, name: str, arch: dict) -> bool:
    found = fam.tensor(name)
    if found is None:
        return False
    q = found[1].quantizable
    return flag(arch, q) if isinstance(q, str) else q


def required(fam: Family, kind: str, arch: dict, experts: bool) -> list[str]:
    """Canonical tensors a unit of `kind` must hold (block units: with experts or a dense MLP)."""
    out = []
    for name, t in fam.unit_tensors(kind).items():
        if t.optional or (t.needs and not flag(arch, t.needs)):
            continue
        if kind == UNIT_BLOCK and t.blocks != EVERY and (t.blocks == EXPERTS) != experts:
            continue
        if EXPERT_INDEX in name:
            out += [name.replace(EXPERT_INDEX, str(j)) for j in range(dims(arch)["e"])]
        else:
            out.append(name)
    return out


def check_unit(fam: Family, arch: dict, kind: str, names) -> None:
    """The canonical tensors a unit must provide to the runtime (a clear error beats a KeyError mid-run)."""
    names = set(names)
    missing = [n for n in required(fam, kind, arch, experts=ROUTER_WEIGHT in names) if n not in names]
    if missing:
        raise FormatError(f"{kind} unit lacks tensor(s) {', '.join(missing[:4])} that the {fam.name} family needs")


def check_tensor_name(fam: Family, name: str, kind: str, arch: dict, expert_block: bool) -> str | None:
    """Why tensor `name` may not be in a `kind` unit of this architecture (None: it may)."""
    found = fam.tensor(name)
    if found is None or found[1].unit != kind or shape_of(fam, name, arch) is None:
        return f"{name!r} is not a tensor of a {kind} unit of this architecture"
    t = found[1]
    if kind == UNIT_BLOCK and t.blocks != EVERY and (t.blocks == EXPERTS) != expert_block:
        return f"{name!r} does not match architecture.moe.layers (which blocks have experts)"
    if t.needs and not t.needs.startswith("!") and not flag(arch, t.needs):  # (head.weight vs tying: validate says it)
        return f"{name!r} present but architecture.{t.needs} is false"
    return None


def merged(families) -> Family:
    """Every tensor of `families` (the first declaration of each name): the manifest checks of a
    pack whose family this runtime does not know (loading it then fails, naming the family)."""
    tensors: dict[str, Tensor] = {}
    for fam in families:
        for name, t in fam.tensors.items():
            tensors.setdefault(name, t)
    return Family("(unknown)", "", (), tensors)


UNITS = (UNIT_EMBED, UNIT_BLOCK, UNIT_HEAD)


# -- building blocks the families share (Llama's Hugging Face naming) -------------------------------
_L = "model.layers.{i}."
EMBED = {"embed.weight": Tensor(UNIT_EMBED, ("v", "h"), "model.embed_tokens.weight", quantizable="tie_word_embeddings")}
# the embedding is quantized only when tied: it is then also the head, read in full every token
HEAD = {"norm.weight": Tensor(UNIT_HEAD, ("h",), "model.norm.weight"),
        "head.weight": Tensor(UNIT_HEAD, ("v", "h"), "lm_head.weight", quantizable=True, needs="!tie_word_embeddings")}
# The attention half of a block, with the norm before the MLP (every family's blocks have it).
ATTN = {
    "attn_norm.weight": Tensor(UNIT_BLOCK, ("h",), _L + "input_layernorm.weight"),
    "attn.q.weight": Tensor(UNIT_BLOCK, ("q", "h"), _L + "self_attn.q_proj.weight", quantizable=True),
    "attn.k.weight": Tensor(UNIT_BLOCK, ("kv", "h"), _L + "self_attn.k_proj.weight", quantizable=True),
    "attn.v.weight": Tensor(UNIT_BLOCK, ("kv", "h"), _L + "self_attn.v_proj.weight", quantizable=True),
    "attn.o.weight": Tensor(UNIT_BLOCK, ("h", "q"), _L + "self_attn.o_proj.weight", quantizable=True),
    "mlp_norm.weight": Tensor(UNIT_BLOCK, ("h",), _L + "post_attention_layernorm.weight"),
}
# A dense SwiGLU MLP (every block of a dense family; the blocks without experts of an MoE family).
MLP = {
    "mlp.gate.weight": Tensor(UNIT_BLOCK, ("i", "h"), _L + "mlp.gate_proj.weight", quantizable=True, blocks=DENSE_MLP),
    "mlp.up.weight": Tensor(UNIT_BLOCK, ("i", "h"), _L + "mlp.up_proj.weight", quantizable=True, blocks=DENSE_MLP),
    "mlp.down.weight": Tensor(UNIT_BLOCK, ("h", "i"), _L + "mlp.down_proj.weight", quantizable=True, blocks=DENSE_MLP),
}
# Present only when the config enables them (llama attention_bias / mlp_bias): taken when the source has them.
BIASES = {
    "attn.q.bias": Tensor(UNIT_BLOCK, ("q",), _L + "self_attn.q_proj.bias", optional=True),
    "attn.k.bias": Tensor(UNIT_BLOCK, ("kv",), _L + "self_attn.k_proj.bias", optional=True),
    "attn.v.bias": Tensor(UNIT_BLOCK, ("kv",), _L + "self_attn.v_proj.bias", optional=True),
    "attn.o.bias": Tensor(UNIT_BLOCK, ("h",), _L + "self_attn.o_proj.bias", optional=True),
    "mlp.gate.bias": Tensor(UNIT_BLOCK, ("i",), _L + "mlp.gate_proj.bias", optional=True, blocks=DENSE_MLP),
    "mlp.up.bias": Tensor(UNIT_BLOCK, ("i",), _L + "mlp.up_proj.bias", optional=True, blocks=DENSE_MLP),
    "mlp.down.bias": Tensor(UNIT_BLOCK, ("h",), _L + "mlp.down_proj.bias", optional=True, blocks=DENSE_MLP),
}
# Per-head RMS norms of queries and keys, applied before rotary (Qwen3, Gemma 3): present when `qk_norm`.
QK_NORMS = {
    "attn.q_norm.weight": Tensor(UNIT_BLOCK, ("hd",), _L + "self_attn.q_norm.weight", needs="qk_norm"),
    "attn.k_norm.weight": Tensor(UNIT_BLOCK, ("hd",), _L + "self_attn.k_norm.weight", needs="qk_norm"),
}
# Experts of an MoE block, per source naming scheme: "per_expert" (checkpoints on the Hub, and
# transformers 5's save_pretrained) or "fused" (transformers 5's in-memory state dict). The router
# (whose argmax picks the experts) stays in the pack dtype; expert linears quantize like the MLP's.
MOE_SCHEMES = ("per_expert", "fused")


def experts(router: str, gate: str, up: str, down: str) -> dict[str, Tensor]:
    """Router and expert tensors with per-expert HF names `gate`, `up`, `down` ({j}: expert) and the
    router's per-expert-scheme name `router`."""
    fused_router = _L + "mlp.gate.weight"
    return {
        ROUTER_WEIGHT: Tensor(UNIT_BLOCK, ("e", "h"), {"per_expert": _L + router, "fused": fused_router}, blocks=EXPERTS),
        **{f"{EXPERT_PREFIX}{EXPERT_INDEX}.{part}.weight": Tensor(
            UNIT_BLOCK, ("h", "ei") if part == "down" else ("ei", "h"),
            {"per_expert": _L + pattern,
             "fused": Fused(_L + ("mlp.experts.down_proj" if part == "down" else "mlp.experts.gate_up_proj"),
                            "expert" if part == "down" else part)},
            quantizable=True, blocks=EXPERTS)
           for part, pattern in (("gate", gate), ("up", up), ("down", down))},
    }
