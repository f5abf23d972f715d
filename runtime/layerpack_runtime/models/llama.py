"""Llama-style decoder (llama, mistral, qwen2, qwen3, phi3) in plain PyTorch, one layer unit at a time.

gpt-fast / mlx-lm style: no nn.Module tree. Each unit is a function of its weights dict (the
canonical names of a pack unit, already dequantized to the compute dtype), so the caller decides
where weights come from and when they are dropped - the resident loader today, the streaming
planner next:

    steps = prepare_steps(args, inv_freq, positions, start, kv_valid, kv_positions, dtype)
    h = embed_forward(args, weights_for("embed"), input_ids)
    for i in range(args.num_layers):
        h = block_forward(args, weights_for(f"block.{i:03d}"), h, steps[i], cache.layers[i])
    logits = head_forward(args, weights_for("head"), h)

A `Step` (built once per forward, shared by all blocks with the same attention window) holds
rotary cos/sin for the new positions, where the new keys go in the KV cache, and the attention
mask (None where SDPA's is_causal or no mask at all is exact: the common unpadded cases).

Numerics follow Hugging Face's implementation operation by operation (RMSNorm in float32 then
cast, rotary tables computed in float32 then cast, rotate-half convention, SDPA attention), so a
bf16 pack generates the same greedy tokens as transformers does in bf16.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..kernels import decode_block
from ..qweight import QuantWeight, concat_rows, embedding, linear, split_rows
from ..errors import FormatError, LayerpackError
from . import contract
from .rope import ROPE_TYPES, apply_rope, rope, rope_cos_sin, rope_inv_freq, rotate_half, signed_sin  # noqa: F401 - this module's API too

# The llama family's pack contract (the tables are shared with mistral, qwen2, qwen3, phi3, which this module also runs).
FAMILY = contract.Family("llama", runs="llama", hf_architectures=("LlamaForCausalLM",),
                         tensors={**contract.EMBED, **contract.ATTN, **contract.MLP, **contract.BIASES, **contract.HEAD})
ACTIVATIONS = ("silu", "swish")


@dataclass
class ModelArgs:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    rope_type: str = "default"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    activation: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per block "full_attention" | "sliding_attention"; None: all alike
    qk_norm: bool = False  # per-head RMS norm of q and k before rotary (attn.q_norm / attn.k_norm)
    max_position_embeddings: int = 0
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    # What this module runs (the families whose contract names it: models.runs()); a module that
    # reuses these args (gemma3, mixtral) overrides them.
    module: ClassVar[str] = "llama"
    activations: ClassVar[tuple[str, ...]] = ACTIVATIONS

    @classmethod
    def extra_fields(cls, arch: dict[str, Any]) -> dict[str, Any]:
        """Fields a subclass adds, read from the architecture object (inside from_dict's error handling)."""
        return {}

    @classmethod
    def from_dict(cls, arch: dict[str, Any]) -> "ModelArgs":
        """From a manifest's `architecture` object; anything this module cannot run is a LayerpackError."""
        from . import family_of_pack, runs

        family = arch.get("family")
        if family not in runs(cls.module):
            raise LayerpackError(f"model family {family!r} is not supported by the {cls.module} runtime module (supports {', '.join(runs(cls.module))})")
        try:
            norm = arch.get("norm") or {"type": "rms", "eps": 1e-6}
            rope = arch.get("rope") or {"type": "default", "theta": 10000.0}
            args = cls(
                family=family,
                vocab_size=int(arch["vocab_size"]),
                hidden_size=int(arch["hidden_size"]),
                intermediate_size=int(arch["intermediate_size"]),
                num_layers=int(arch["num_layers"]),
                num_heads=int(arch["num_heads"]),
                num_kv_heads=int(arch.get("num_kv_heads") or arch["num_heads"]),
                head_dim=int(arch.get("head_dim") or int(arch["hidden_size"]) // int(arch["num_heads"])),
                norm_eps=float(norm.get("eps", 1e-6)),
                rope_type=str(rope.get("type", "default")),
                rope_theta=float(rope.get("theta", 10000.0)),
                rope_scaling=dict(rope.get("scaling") or {}),
                activation=str(arch.get("activation") or "silu"),
                tie_word_embeddings=bool(arch.get("tie_word_embeddings", False)),
                attention_bias=bool(arch.get("attention_bias", False)),
                mlp_bias=bool(arch.get("mlp_bias", False)),
                sliding_window=int(arch["sliding_window"]) if arch.get("sliding_window") else None,
                layer_types=[str(t) for t in arch["layer_types"]] if arch.get("layer_types") else None,
                qk_norm=bool(arch.get("qk_norm", False)),
                max_position_embeddings=int(arch.get("max_position_embeddings") or 0),
                bos_token_id=arch.get("bos_token_id"),
                eos_token_ids=[int(i) for i in (arch.get("eos_token_ids") or [])],
                pad_token_id=arch.get("pad_token_id"),
                **cls.extra_fields(arch),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"manifest architecture is incomplete or malformed ({type(e).__name__}: {e})") from None
        if norm.get("type", "rms") != "rms":
            raise LayerpackError(f"norm type {norm.get('type')!r} is not supported by the runtime (supported: rms)")
        if args.rope_type not in ROPE_TYPES:
            raise LayerpackError(f"rope type {args.rope_type!r} is not supported by the runtime yet (supported: {', '.join(ROPE_TYPES)})")
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise LayerpackError(f"partial rotary embeddings (factor {rope['partial_rotary_factor']}) are not supported by the runtime yet")
        if args.activation not in cls.activations:
            raise LayerpackError(f"activation {args.activation!r} is not supported by the {cls.module} runtime module (supported: {', '.join(cls.activations)})")
        if args.layer_types is not None:
            if len(args.layer_types) != args.num_layers or set(args.layer_types) - {"full_attention", "sliding_attention"}:
                raise FormatError(f"manifest layer_types must name full_attention or sliding_attention for each of the {args.num_layers} blocks")
        elif family_of_pack(args.family).config.window_layers == "max_window_layers" and args.sliding_window:
            # HF Qwen2/3 window only blocks >= max_window_layers, which the architecture spec does not record.
            raise LayerpackError(f"{args.family} packs with a sliding window are not supported yet (the manifest does not say which blocks use it)")
        if args.num_heads % args.num_kv_heads:
            raise FormatError(f"num_heads {args.num_heads} is not a multiple of num_kv_heads {args.num_kv_heads}")
        return args

    def window_of(self, block: int) -> int | None:
        """The sliding window of one block (None: full attention)."""
        if self.layer_types is not None and self.layer_types[block] != "sliding_attention":
            return None
        return self.sliding_window


# -- per-forward shared state --------------------------------------------------------------

@dataclass
class Step:
    """What the blocks of one forward call share."""
    cos: torch.Tensor                 # [B, 1, T, head_dim]
    sin: torch.Tensor
    start: int                        # cache column of the first new token
    end: int                          # start + T: keys/values [0, end) take part in attention
    mask: torch.Tensor | None = None  # bool [B, 1, T, end]: True = may attend; None with is_causal/no mask
    is_causal: bool = False
    sin_signed: torch.Tensor | None = None  # signed_sin(sin), for rope()
    grouped: bool = False             # one query per row under `mask` [B, 1, 1, end]: grouped_decode_attention
    window_first: int | None = None   # unpadded rows whose mask is only a sliding window: the first column it keeps


    def __post_init__(self):
        if self.sin_signed is None:
            self.sin_signed = signed_sin(self.sin)


def prepare_steps(args: ModelArgs, inv_freq: torch.Tensor, positions: torch.Tensor, start: int,
                  kv_valid: torch.Tensor | None, kv_positions: torch.Tensor | None, dtype: torch.dtype) -> list[Step]:
    """The Step of every block (blocks with the same attention window share one)."""
    cos, sin = rope_cos_sin(inv_freq, positions, dtype)
    by_window: dict[int | None, Step] = {}
    steps = []
    for i in range(args.num_layers):
        w = args.window_of(i)
        if w not in by_window:
            by_window[w] = prepare_step(positions, start, kv_valid, kv_positions, w, cos, sin)
        steps.append(by_window[w])
    return steps


def prepare_step(positions: torch.Tensor, start: int, kv_valid: torch.Tensor | None, kv_positions: torch.Tensor | None,
                 window: int | None, cos: torch.Tensor, sin: torch.Tensor) -> Step:
    """positions [B, T]: rotary positions of the new tokens. start: their first cache column.
    kv_valid [B, end] (None = every column holds a real token): False marks left padding; or
    [B, T, end]: the columns each query may see (tree attention for speculative decoding; the tree's
    nodes come in topological order, so the causal mask below never hides an ancestor).
    kv_positions [B, end]: positions of the cached columns (needed only with a sliding window).
    window: attend only to keys less than `window` positions back (None: no limit)."""
    B, T = positions.shape
    end = start + T
    window_bites = window is not None and end > window  # unpadded: position == column
    if kv_valid is None and not window_bites:
        if T == 1:  # one query sees every cached key (SDPA with enable_gqa: transformers' bits; the
            # grouped form would be 4-12x faster per call but rounds differently - plain CPU decode steps
            # run in the native decode block instead, kernels/decode_block.py)
            return Step(cos, sin, start, end)
        if start == 0:
            return Step(cos, sin, start, end, is_causal=True)  # plain causal prefill
    device = positions.device
    q_cols = torch.arange(start, end, device=device)
    kv_cols = torch.arange(end, device=device)
    allowed = (kv_cols[None, :] <= q_cols[:, None])[None].expand(B, T, end)
    if window is not None and window_bites:
        assert kv_positions is not None
        allowed = allowed & ((positions[:, :, None] - kv_positions[:, None, :end]) < window)
    if kv_valid is not None:  # [B, end] (left padding), or [B, T, end]: per query (a token tree, cache.add_tree)
        allowed = allowed & (kv_valid[:, :, :end] if kv_valid.dim() == 3 else kv_valid[:, None, :end])
    # A padding query would otherwise see no key at all (NaN rows): let every query see itself.
    allowed = allowed | (kv_cols[None, :] == q_cols[:, None])[None]
    # One query per row under a mask (a decode step over slots of different lengths, engine.py):
    # the grouped form, one fused-kernel problem per key/value head instead of one per query head
    # with a mask - about 5x less time for 8 rows of SmolLM2 on a CPU (bf16), where the per-problem
    # cost, not the arithmetic, is what a batch of short rows pays.
    # Unpadded rows under a window that bites: the mask keeps columns [end - window, end) of the last
    # query (position == column), which the native decode block takes as a range (kernels/decode_block.py).
    first = end - window if window_bites and kv_valid is None else None
    return Step(cos, sin, start, end, mask=allowed[:, None], grouped=T == 1, window_first=first)


def static_steps(args: ModelArgs, inv_freq: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 dtype: torch.dtype) -> list[Step]:
    """The Steps of a fixed-shape decode step (decode_step.py): one new token per row at rotary
    `positions` [B, 1], attending over every column of the cache that `mask` [B, 1, 1, max_len]
    allows. Every shape is the cache's, whatever the step, so the step can be captured once as a
    CUDA graph; the cache column written is the static cache's (decode_step.StaticLayerKV)."""
    if args.sliding_window is not None:
        raise LayerpackError("fixed-shape decode steps do not support sliding-window attention yet")
    cos, sin = rope_cos_sin(inv_freq, positions, dtype)
    step = Step(cos, sin, 0, mask.shape[-1], mask=mask, grouped=True)
    return [step] * args.num_layers


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row (q [B, H, 1, D]) over a whole cache (k, v [B, KV, L, D]) under `mask`
    [B, 1, 1, L]: the H / KV query heads that share a key/value head are that head's queries - the
    same products as GQA's repeated keys, without repeating them (and without enable_gqa, which not
    every fused SDPA kernel takes with a mask)."""
    B, H, T, D = q.shape
    KV = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(B, KV, H // KV * T, D), k, v, attn_mask=mask, scale=scale)
    return out.reshape(B, H, T, D)


# -- units -----------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalised in float32, cast, then scaled in the input dtype.
    torch.rms_norm is one kernel for x.float() * rsqrt(mean(x^2) + eps) cast back, with the same
    bits (tests/runtime/test_runtime.py checks it against that form)."""
    return weight * torch.rms_norm(x, (x.shape[-1],), eps=eps)  # 16-bit x: computed in float32, rounded once


def apply_qk_norm(args: ModelArgs, w: dict[str, torch.Tensor], q: torch.Tensor, k: torch.Tensor, norm=None):
    """Qwen3-style per-head RMS norm of queries and keys ([B, heads, T, head_dim], over head_dim),
    before rotary. `norm`: the family's RMS norm (default: llama's; Gemma passes its 1 + w form)."""
    norm = norm or rms_norm
    return norm(q, w["attn.q_norm.weight"], args.norm_eps), norm(k, w["attn.k_norm.weight"], args.norm_eps)


def embed_forward(args: ModelArgs, w: dict[str, torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
    """input_ids [B, T] -> hidden states [B, T, hidden]."""
    return embedding(input_ids, w["embed.weight"])


# -- fused projections -------------------------------------------------------------------------
# A resident block's q/k/v weights are concatenated once at load into one [(H + 2 KV) * D, hidden]
# matrix, and gate/up into one [2 * intermediate, hidden] matrix (the separate names stay, as views
# of the fused tensor: no extra memory). One matmul instead of three (two) per block and step: fewer
# operator dispatches and thread fork/joins. Only where it is bit-for-bit the same as the separate
# matmuls (each output row is the same dot product): 16-bit plain tensors on the CPU (oneDNN),
# tested for many shapes, batch sizes and thread counts; MKL's float32 GEMM picks kernels by the
# output width, so float32 stays unfused, as do streamed units. Quantized weights (QuantWeight) of a
# 16-bit compute dtype fuse the same way where every part ends on a block boundary (qweight.concat_rows):
# at decode the native GEMV computes each row alone (same bits), at prefill they dequantize into the
# same 16-bit rows as the separate weights, multiplied by the same GEMM as the plain tensors above.
QKV = "attn.qkv.weight"
GATE_UP = "mlp.gate_up.weight"
FUSE_DTYPES = (torch.bfloat16, torch.float16)


def _fusable(w: dict[str, object], names: tuple[str, ...]) -> bool:
    ts = [w.get(n) for n in names]
    return (all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in ts)
            and len({(t.dtype, t.device, t.shape[1]) for t in ts}) == 1
            and ts[0].dtype in FUSE_DTYPES and ts[0].device.type == "cpu")


def _fuse(w: dict[str, object], names: tuple[str, ...], fused_name: str) -> None:
    biases = [w.get(n.replace(".weight", ".bias")) for n in names]
    if any(b is not None for b in biases) and not all(isinstance(b, torch.Tensor) for b in biases):
        return
    ws = [w.get(n) for n in names]
    if _fusable(w, names):
        fused = torch.cat(ws)
        parts = fused.split([t.shape[0] for t in ws])
    elif all(isinstance(t, QuantWeight) and t.dtype in FUSE_DTYPES and t.codes.device.type == "cpu" for t in ws):
        fused = concat_rows(ws)
        if fused is None:
            return
        parts = split_rows(fused, ws)
    else:
        return
    for n, part in zip(names, parts):
        w[n] = part
    w[fused_name] = fused
    if biases[0] is not None:
        fb = torch.cat(biases)
        for n, part in zip(names, fb.split([b.shape[0] for b in biases])):
            w[n.replace(".weight", ".bias")] = part
        w[fused_name.replace(".weight", ".bias")] = fb


def fuse_unit(args: ModelArgs, w: dict[str, object]) -> dict[str, object]:
    """A resident block's weights with the fused projections added where that keeps the same bits (see above)."""
    w = decode_block.BlockWeights(w)
    _fuse(w, ("attn.q.weight", "attn.k.weight", "attn.v.weight"), QKV)
    _fuse(w, ("mlp.gate.weight", "mlp.up.weight"), GATE_UP)
    return w


def qkv_proj(args: ModelArgs, w: dict[str, object], x: torch.Tensor):
    """x [B, T, hidden] -> q [B, H, T, D], k and v [B, KV, T, D], and when fused (one matmul) also
    qk [B, H + KV, T, D]: q and k as one view, to rotate them in one go (else None)."""
    B, T, _ = x.shape
    H, KV, D = args.num_heads, args.num_kv_heads, args.head_dim
    fused = w.get(QKV)
    if fused is not None:
        y = linear(x, fused, w.get("attn.qkv.bias")).view(B, T, H + 2 * KV, D).transpose(1, 2)
        q, k, v = y.split((H, KV, KV), dim=1)
        return q, k, v, y.narrow(1, 0, H + KV)
    q = linear(x, w["attn.q.weight"], w.get("attn.q.bias")).view(B, T, H, D).transpose(1, 2)
    k = linear(x, w["attn.k.weight"], w.get("attn.k.bias")).view(B, T, KV, D).transpose(1, 2)
    v = linear(x, w["attn.v.weight"], w.get("attn.v.bias")).view(B, T, KV, D).transpose(1, 2)
    return q, k, v, None


def gate_up_proj(w: dict[str, object], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, hidden] -> gate, up [B, T, intermediate] (one matmul when fused)."""
    fused = w.get(GATE_UP)
    if fused is not None:
        return linear(x, fused, w.get("mlp.gate_up.bias")).chunk(2, dim=-1)
    return linear(x, w["mlp.gate.weight"], w.get("mlp.gate.bias")), linear(x, w["mlp.up.weight"], w.get("mlp.up.bias"))


def attention(args: ModelArgs, w: dict[str, torch.Tensor], x: torch.Tensor, step: Step, layer_cache) -> torch.Tensor:
    B, T, _ = x.shape
    H, KV, D = args.num_heads, args.num_kv_heads, args.head_dim
    q, k, v, qk = qkv_proj(args, w, x)
    if args.qk_norm:
        q, k = apply_qk_norm(args, w, q, k)
    if qk is not None and not args.qk_norm:  # one fused projection: rotate q and k together
        q, k = rope(qk, step).split((H, KV), dim=1)
    else:
        q, k = rope(q, step), rope(k, step)
    if layer_cache is not None:
        k, v = layer_cache.update(k, v, step.start)  # views of columns [0, end)
    if step.grouped:
        out = grouped_decode_attention(q, k, v, step.mask, D ** -0.5)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=step.mask, is_causal=step.is_causal, scale=D ** -0.5, enable_gqa=KV != H,
        )
    out = out.transpose(1, 2).reshape(B, T, H * D)
    return linear(out, w["attn.o.weight"], w.get("attn.o.bias"))


def mlp(args: ModelArgs, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up_proj(w, x)
    return linear(F.silu(gate).mul_(up), w["mlp.down.weight"], w.get("mlp.down.bias"))


def block_forward(args: ModelArgs, w: dict[str, torch.Tensor], h: torch.Tensor, step: Step, layer_cache=None) -> torch.Tensor:
    """One decoder block: h [B, T, hidden] -> [B, T, hidden]. layer_cache: this block's LayerKV
    (the new keys/values are written at columns [step.start, step.end)), or None for a cache-free
    forward over the whole sequence."""
    out = decode_block.try_block(args, w, h, step, layer_cache)  # a plain one-token CPU step: one native call
    if out is not None:
        return out
    h = h + attention(args, w, rms_norm(h, w["attn_norm.weight"], args.norm_eps), step, layer_cache)
    return h.add_(mlp(args, w, rms_norm(h, w["mlp_norm.weight"], args.norm_eps)))


def head_forward(args: ModelArgs, w: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Final norm + output projection: h [B, T, hidden] -> logits [B, T, vocab] (compute dtype).
    For tied models the caller passes the embedding as `head.weight`."""
    x = rms_norm(h, w["norm.weight"], args.norm_eps)
    # one bf16 row: the native GEMV, as the native blocks use (MoE families keep F.linear: their bf16
    # logits equal transformers' bit for bit, tests/runtime/test_moe.py, and their blocks are per-op anyway)
    y = None if getattr(args, "num_experts", 0) else decode_block.dense_row(w["head.weight"], x)
    return y if y is not None else linear(x, w["head.weight"])


def check_unit(args: ModelArgs, kind: str, names) -> None:
    """The canonical tensors a unit must provide to this module (from the family's contract)."""
    from . import family_of_pack

    contract.check_unit(family_of_pack(args.family), {"qk_norm": args.qk_norm, "tie_word_embeddings": args.tie_word_embeddings,
                                                      **_dims(args)}, kind, names)


def _dims(args: ModelArgs) -> dict:
    """The architecture fields contract.dims reads, from the args (experts: see mixtral.ModelArgs)."""
    d = {"hidden_size": args.hidden_size, "num_heads": args.num_heads, "head_dim": args.head_dim, "num_kv_heads": args.num_kv_heads,
         "intermediate_size": args.intermediate_size, "vocab_size": args.vocab_size}
    if getattr(args, "num_experts", 0):
        d["moe"] = {"num_experts": args.num_experts, "intermediate_size": args.moe_intermediate_size}
    return d
