"""Mixture-of-experts decoders (mixtral, qwen3_moe) in plain PyTorch, one layer unit at a time.

The attention half of a block is llama's (with its optional sliding window; Qwen3-MoE adds the
per-head q/k norms of llama's `qk_norm` flag); the MLP
half is a top-k routed set of SwiGLU experts. The router runs first; only then are the selected
experts' weights requested, from `w[EXPERTS_KEY]` when the loader streams them expert by expert
(experts.ExpertStore: nothing of an unselected expert is read), or from `w` itself when the whole
unit is in memory.

Routing follows transformers 5 operation by operation: router logits in the compute dtype, softmax
in float32, top-k, renormalised over the k (always for Mixtral; Qwen MoE with norm_topk_prob),
routing weights kept in float32 (Mixtral) or cast to the compute dtype (Qwen MoE); experts run in
ascending index order and their weighted outputs are summed with index_add_, as HF does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import FormatError, LayerpackError
from ..format import EXPERT_LINEARS, EXPERTS_KEY, ROUTER_WEIGHT, expert_weight
from ..qweight import linear
from . import contract, llama
from .llama import Step, check_unit, embed_forward, fuse_unit, head_forward, prepare_steps, rms_norm, rope_inv_freq

# The unit API the loader calls (embedding, head, rope, step preparation and projection fusion are llama's).
__all__ = ["ModelArgs", "block_forward", "check_unit", "embed_forward", "fuse_unit", "head_forward", "prepare_steps", "rope_inv_freq"]

# The mixtral family's pack contract (this module also runs qwen3_moe and qwen2_moe).
FAMILY = contract.Family(
    "mixtral", runs="mixtral", hf_architectures=("MixtralForCausalLM",),
    tensors={**contract.EMBED, **contract.ATTN, **contract.MLP,
             **contract.experts("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{j}.w1.weight",
                                "block_sparse_moe.experts.{j}.w3.weight", "block_sparse_moe.experts.{j}.w2.weight"),
             **contract.HEAD},
    # Mixtral always renormalises the top-k probabilities and weights expert outputs in float32
    config=contract.ConfigRules(moe_norm_topk_prob=True, moe_weights_dtype="float32"),
    moe_schemes=contract.MOE_SCHEMES)


@dataclass
class ModelArgs(llama.ModelArgs):
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    weights_fp32: bool = True          # routing weights stay float32 (Mixtral) or take the compute dtype
    moe_layers: list[int] = field(default_factory=list)
    shared_expert: bool = False        # Qwen2-MoE: a gated dense expert every token uses

    module: ClassVar[str] = "mixtral"

    @classmethod
    def extra_fields(cls, arch: dict[str, Any]) -> dict[str, Any]:
        moe = arch["moe"]
        if moe["weights_dtype"] not in ("float32", "compute"):
            raise ValueError(f"moe.weights_dtype {moe['weights_dtype']!r} is not float32 or compute")
        return dict(num_experts=int(moe["num_experts"]), top_k=int(moe["top_k"]),
                    moe_intermediate_size=int(moe["intermediate_size"]), norm_topk_prob=bool(moe["norm_topk_prob"]),
                    weights_fp32=moe["weights_dtype"] == "float32", moe_layers=[int(i) for i in moe["layers"]],
                    shared_expert=bool(moe.get("shared_intermediate_size")))

    @classmethod
    def from_dict(cls, arch: dict[str, Any]) -> "ModelArgs":
        args = super().from_dict(arch)
        if not 0 < args.top_k <= args.num_experts:
            raise FormatError(f"manifest architecture.moe: top_k {args.top_k} must be in 1..{args.num_experts}")
        if args.family in ("qwen3_moe", "qwen2_moe") and args.sliding_window and args.layer_types is None:
            raise LayerpackError(f"{args.family} packs with a sliding window are not supported yet (the manifest does not say which blocks use it)")
        return args


def route(args: ModelArgs, router: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, hidden] -> (routing weights [N, k], expert indices [N, k]), as transformers computes them."""
    logits = linear(x, router)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    top_w, top_i = torch.topk(probs, args.top_k, dim=-1)
    if args.norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    if not args.weights_fp32:
        top_w = top_w.to(logits.dtype)
    return top_w, top_i


def moe(args: ModelArgs, w: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    B, T, H = x.shape
    flat = x.reshape(-1, H)
    top_w, top_i = route(args, w[ROUTER_WEIGHT], flat)
    # [experts, k, tokens]: which (slot, token) pairs chose each expert
    chosen = F.one_hot(top_i, num_classes=args.num_experts).permute(2, 1, 0)
    needed = sorted(set(top_i.reshape(-1).tolist()))
    provider = w.get(EXPERTS_KEY)
    if provider is not None:
        experts = provider(needed)  # reads (or finds in the cache) exactly these experts
    else:
        experts = {j: {l: w[expert_weight(j, l)] for l in EXPERT_LINEARS} for j in needed}
    out = torch.zeros_like(flat)
    for j in needed:
        slot, tok = torch.where(chosen[j])
        e = experts[j]
        cur = flat[tok]
        y = linear(F.silu(linear(cur, e["gate"])) * linear(cur, e["up"]), e["down"])
        y = y * top_w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    if args.shared_expert:  # Qwen2-MoE: + sigmoid(gate(x)) * shared_mlp(x), every token
        shared = linear(F.silu(linear(flat, w["moe.shared.gate.weight"])) * linear(flat, w["moe.shared.up.weight"]), w["moe.shared.down.weight"])
        out = out + torch.sigmoid(linear(flat, w["moe.shared_gate.weight"])) * shared
    return out.reshape(B, T, H)


def block_forward(args: ModelArgs, w: dict[str, Any], h: torch.Tensor, step: Step, layer_cache=None) -> torch.Tensor:
    """One decoder block: attention, then the routed experts (or a dense MLP in blocks without experts)."""
    h = h + llama.attention(args, w, rms_norm(h, w["attn_norm.weight"], args.norm_eps), step, layer_cache)
    x = rms_norm(h, w["mlp_norm.weight"], args.norm_eps)
    return h + (moe(args, w, x) if ROUTER_WEIGHT in w else llama.mlp(args, w, x))


