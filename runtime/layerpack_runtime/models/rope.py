"""Rotary position embeddings as transformers computes them (default, linear and llama3 scaling):
inverse frequencies, cos/sin tables for positions, and their application to queries and keys.
Shared by every runtime module (llama.py re-exports them; gemma3 and mixtral import them there).
"""
from __future__ import annotations

import math

import torch

from ..errors import FormatError, LayerpackError

ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(args, device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverse frequencies (float32, [head_dim // 2]) for default, linear and llama3 rope."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
    s = args.rope_scaling
    if args.rope_type == "default":
        return inv_freq
    try:
        if args.rope_type == "linear":
            return inv_freq / float(s["factor"])
        if args.rope_type == "llama3":
            factor = float(s["factor"])
            low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
            old_ctx = float(s["original_max_position_embeddings"])
            low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
            smooth = (old_ctx / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
    except KeyError as e:
        raise FormatError(f"rope type {args.rope_type!r} needs scaling parameter {e.args[0]!r}, which the manifest lacks") from None
    raise LayerpackError(f"rope type {args.rope_type!r} is not supported by the runtime yet (supported: {', '.join(ROPE_TYPES)})")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, 1, T, head_dim] in `dtype` (computed in float32)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, as transformers computes it (the reference form)."""
    return (x * cos) + (rotate_half(x) * sin)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) * sin == swap_halves(x) * signed_sin(sin) bit for bit
    (negation is exact and rounding is symmetric), which saves the negation and a copy per call."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope(x: torch.Tensor, step) -> torch.Tensor:
    """apply_rope(x, step.cos, step.sin) in four operations instead of seven (same bits): x [B, heads, T, D];
    step: a llama.Step (its cos and sin_signed)."""
    return (x * step.cos).add_(x.roll(x.shape[-1] // 2, -1).mul_(step.sin_signed))
