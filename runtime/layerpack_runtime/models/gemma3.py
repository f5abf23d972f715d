"""Gemma 3 text decoder (Gemma3ForCausalLM, model_type gemma3_text) in plain PyTorch, one layer
unit at a time, with the same unit functions as `llama` (see its docstring for the calling pattern).

What differs from llama, following Hugging Face's Gemma3 implementation operation by operation:
* RMSNorm multiplies by (1 + w), computed in float32 and then cast (the checkpoint stores w
  zero-centred); norms also follow attention and the MLP (`attn_post_norm`, `mlp_post_norm`),
  and queries/keys get per-head norms before rotary (`attn.q_norm`, `attn.k_norm`).
* The embedding is scaled by sqrt(hidden_size), the scale rounded to the compute dtype (as HF does).
* Sliding-window and global blocks (`layer_types`) use different rotary tables: the global one from
  `rope` (theta, optional scaling), the local one from `rope_local`. `rope_inv_freq` therefore
  returns one table per layer type, and `prepare_steps` builds one Step per layer type.
* Attention scores are scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5; optional tanh
  soft-capping of the final logits (None in Gemma 3). attn_logit_softcapping is recorded but, as in
  transformers' Gemma3 (which never applies it), not applied.
* GeGLU MLP with tanh-approximated GELU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import FormatError, LayerpackError
from ..qweight import embedding, linear
from . import contract, llama
from ..kernels import decode_block
from .llama import ROPE_TYPES, check_unit, Step, apply_qk_norm, fuse_unit, prepare_step, rope, rope_cos_sin  # noqa: F401 (check_unit, fuse_unit: the loader's)

ACTIVATIONS = ("gelu_pytorch_tanh",)
FULL, SLIDING = "full_attention", "sliding_attention"

# Gemma 3 text: norms before and after attention and the MLP, q/k norms. HF's post_attention_layernorm
# follows attention here (in llama it precedes the MLP).
_L = "model.layers.{i}."
_ATTN = {n: t for n, t in contract.ATTN.items() if n != "mlp_norm.weight"}
FAMILY = contract.Family(
    "gemma3", runs="gemma3", hf_architectures=("Gemma3ForCausalLM",),
    tensors={**contract.EMBED, **_ATTN, **contract.QK_NORMS,
             "attn_post_norm.weight": contract.Tensor("block", ("h",), _L + "post_attention_layernorm.weight"),
             "mlp_norm.weight": contract.Tensor("block", ("h",), _L + "pre_feedforward_layernorm.weight"),
             **contract.MLP,
             "mlp_post_norm.weight": contract.Tensor("block", ("h",), _L + "post_feedforward_layernorm.weight"),
             **contract.BIASES, **contract.HEAD},
    # tied by default; sliding blocks from a period in older configs; a rope table per layer type (global
    # theta 1e6 by default, local 10000, older configs' rope_local_base_freq); the attention scalar and
    # soft-capping fields; embedding models (bidirectional attention) refused
    config=contract.ConfigRules(
        tie_word_embeddings=True, window_layers="period",
        layer_type_ropes=contract.LayerTypeRopes(global_theta=1_000_000.0, local_theta=10_000.0,
                                                 local_theta_field="rope_local_base_freq"),
        query_pre_attn_scalar=True, softcapping=True,
        refused=(("use_bidirectional_attention", "Gemma 3 with bidirectional attention (an embedding model) is not supported"),)))


@dataclass
class ModelArgs(llama.ModelArgs):
    query_pre_attn_scalar: float = 256.0
    rope_local_type: str = "default"
    rope_local_theta: float = 10000.0
    rope_local_scaling: dict[str, Any] = field(default_factory=dict)
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    module: ClassVar[str] = "gemma3"
    activations: ClassVar[tuple[str, ...]] = ACTIVATIONS

    @classmethod
    def extra_fields(cls, arch: dict[str, Any]) -> dict[str, Any]:
        local = arch.get("rope_local") or {"type": "default", "theta": 10000.0}
        cap = lambda v: float(v) if v else None  # noqa: E731  (0 / None: no capping)
        return dict(
            query_pre_attn_scalar=float(arch.get("query_pre_attn_scalar") or arch["head_dim"]),
            rope_local_type=str(local.get("type", "default")),
            rope_local_theta=float(local.get("theta", 10000.0)),
            rope_local_scaling=dict(local.get("scaling") or {}),
            attn_logit_softcapping=cap(arch.get("attn_logit_softcapping")),
            final_logit_softcapping=cap(arch.get("final_logit_softcapping")),
        )

    @classmethod
    def from_dict(cls, arch: dict[str, Any]) -> "ModelArgs":
        args = super().from_dict(arch)
        if args.rope_local_type not in ROPE_TYPES:
            raise LayerpackError(f"rope type {args.rope_local_type!r} (sliding layers) is not supported by the runtime yet (supported: {', '.join(ROPE_TYPES)})")
        if args.sliding_window and args.layer_types is None:
            raise FormatError("a gemma3 manifest with a sliding window must give layer_types (which blocks are sliding)")
        return args

    def layer_type(self, block: int) -> str:
        return self.layer_types[block] if self.layer_types is not None else FULL


# -- rotary embedding ---------------------------------------------------------------------

def rope_inv_freq(args: ModelArgs, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One table per layer type: global blocks use `rope` (theta, scaling), sliding ones `rope_local`."""
    local = dataclasses.replace(args, rope_type=args.rope_local_type, rope_theta=args.rope_local_theta,
                                rope_scaling=args.rope_local_scaling)
    return {FULL: llama.rope_inv_freq(args, device), SLIDING: llama.rope_inv_freq(local, device)}


def prepare_steps(args: ModelArgs, inv_freq: dict[str, torch.Tensor], positions: torch.Tensor, start: int,
                  kv_valid: torch.Tensor | None, kv_positions: torch.Tensor | None, dtype: torch.dtype) -> list[Step]:
    """The Step of every block: one per layer type (its own rotary table and attention window)."""
    by_type: dict[str, Step] = {}
    steps = []
    for i in range(args.num_layers):
        t = args.layer_type(i)
        if t not in by_type:
            cos, sin = rope_cos_sin(inv_freq[t], positions, dtype)
            by_type[t] = prepare_step(positions, start, kv_valid, kv_positions, args.window_of(i), cos, sin)
        steps.append(by_type[t])
    return steps


# -- units -----------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: (x_normed * (1 + w)) in float32, then cast (llama casts before multiplying)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


def embed_forward(args: ModelArgs, w: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T] -> hidden states [B, T, hidden], scaled by sqrt(hidden) rounded to the compute dtype."""
    h = embedding(input_ids, w["embed.weight"])
    return h * torch.tensor(args.hidden_size ** 0.5, dtype=torch.float32).to(h.dtype)


def attention(args: ModelArgs, w: dict[str, torch.Tensor], x: torch.Tensor, step: Step, layer_cache) -> torch.Tensor:
    B, T, _ = x.shape
    H, KV, D = args.num_heads, args.num_kv_heads, args.head_dim
    q, k, v, _ = llama.qkv_proj(args, w, x)  # one matmul for a resident block (llama.fuse_unit)
    q, k = apply_qk_norm(args, w, q, k, norm=rms_norm)
    q, k = rope(q, step), rope(k, step)
    if layer_cache is not None:
        k, v = layer_cache.update(k, v, step.start)  # views of columns [0, end)
    # attn_logit_softcapping is deliberately not applied: transformers' Gemma3 keeps it in the config
    # but never passes it to attention (only Gemma 2 caps scores), and it is null in Gemma 3 checkpoints.
    if step.grouped:  # one query per row under a mask (llama.prepare_step)
        out = llama.grouped_decode_attention(q, k, v, step.mask, args.query_pre_attn_scalar ** -0.5)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, is_causal=step.is_causal,
                                             scale=args.query_pre_attn_scalar ** -0.5, enable_gqa=KV != H)
    out = out.transpose(1, 2).reshape(B, T, H * D)
    return linear(out, w["attn.o.weight"], w.get("attn.o.bias"))


def mlp(args: ModelArgs, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    gate, up = llama.gate_up_proj(w, x)
    return linear(F.gelu(gate, approximate="tanh").mul_(up), w["mlp.down.weight"], w.get("mlp.down.bias"))


def block_forward(args: ModelArgs, w: dict[str, torch.Tensor], h: torch.Tensor, step: Step, layer_cache=None) -> torch.Tensor:
    """One decoder block with norms before and after attention and the MLP: h [B, T, hidden] -> same."""
    out = decode_block.try_block(args, w, h, step, layer_cache)  # a plain one-token CPU step: one native call
    if out is not None:
        return out
    eps = args.norm_eps
    a = attention(args, w, rms_norm(h, w["attn_norm.weight"], eps), step, layer_cache)
    h = h + rms_norm(a, w["attn_post_norm.weight"], eps)
    m = mlp(args, w, rms_norm(h, w["mlp_norm.weight"], eps))
    return h + rms_norm(m, w["mlp_post_norm.weight"], eps)


def head_forward(args: ModelArgs, w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Final norm + output projection (+ optional tanh soft-capping): h -> logits [B, T, vocab]."""
    x = rms_norm(h, w["norm.weight"], args.norm_eps)
    logits = decode_block.dense_row(w["head.weight"], x)  # one bf16 row: the native GEMV (llama.head_forward)
    if logits is None:
        logits = linear(x, w["head.weight"])
    if args.final_logit_softcapping:
        cap = args.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


