"""Preallocated KV cache: per layer, k and v tensors of [batch, kv_heads, max_len, head_dim].

Columns are shared by the whole batch: prompts of different lengths are left-padded, and
`valid` marks which columns of which row hold a real token (padding never takes part in
attention); `positions` holds each column's rotary position. Each layer's tensors are separate
allocations, so a later memory planner can place them per layer (or offload them) freely.
"""
from __future__ import annotations

import torch

from .errors import LayerpackError


class LayerKV:
    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values [B, kv_heads, T, head_dim] at columns [start, start+T); return
        views of columns [0, start+T)."""
        T = k.shape[2]
        self.k.narrow(2, start, T).copy_(k)
        self.v.narrow(2, start, T).copy_(v)
        return self.k.narrow(2, 0, start + T), self.v.narrow(2, 0, start + T)


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.batch, self.max_len = batch, max_len
        self.layers = [LayerKV(batch, kv_heads, max_len, head_dim, dtype, device) for _ in range(num_layers)]
        self.length = 0                                   # columns filled so far
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # next rotary position per row
        self.padded = False                               # some row has a padding column

    def reserve(self, new_tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[int, torch.Tensor]:
        """Claim columns for new tokens [B, T] (attention_mask [B, T], 0 = padding). Returns the
        first column and the rotary positions [B, T] of the new tokens; call `commit` after the forward."""
        B, T = new_tokens.shape
        if B != self.batch:
            raise LayerpackError(f"batch of {B} does not match the KV cache's batch of {self.batch}")
        start = self.length
        if start + T > self.max_len:
            raise LayerpackError(f"sequence of {start + T} tokens exceeds the KV cache's {self.max_len} positions")
        if attention_mask is None:
            positions = self.next_pos[:, None] + torch.arange(T, device=self.next_pos.device)[None]
        else:
            valid = attention_mask.to(device=self.valid.device, dtype=torch.bool)
            self.valid[:, start:start + T] = valid
            if not bool(valid.all()):
                self.padded = True
            positions = (self.next_pos[:, None] + valid.long().cumsum(1) - 1).clamp_min(0)
        self.positions[:, start:start + T] = positions
        return start, positions

    def commit(self, T: int, attention_mask: torch.Tensor | None) -> None:
        self.length += T
        self.next_pos += T if attention_mask is None else attention_mask.to(self.next_pos.device).long().sum(1)

    def kv_valid(self, end: int) -> torch.Tensor | None:
        return self.valid[:, :end] if self.padded else None
