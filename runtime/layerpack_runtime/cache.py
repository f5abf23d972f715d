"""Preallocated KV cache: per layer, k and v tensors of [batch, kv_heads, max_len, head_dim].

Columns are shared by the whole batch: prompts of different lengths are left-padded, and
`valid` marks which columns of which row hold a real token (padding never takes part in
attention); `positions` holds each column's rotary position. Each layer's tensors are separate
allocations, so a later memory planner can place them per layer (or offload them) freely.

Speculative decoding (speculative.py) appends *tentative* columns: `add_tree(parents)` makes the
next forward's tokens nodes of a token tree (each attends to the committed columns and to its
tree ancestors only; its rotary position is the committed length plus its depth), and
`keep(path)` then keeps one root-first path of tentative columns - moved left to follow the
committed ones - and drops the rest (rollback is keep([])).
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
        # Tentative (tree) columns [base, length): ancestor-or-self matrix and depth of each.
        self.base: int | None = None                      # None: no tentative columns
        self.tree_ancestors = torch.zeros(0, 0, dtype=torch.bool, device=device)
        self.tree_depth = torch.zeros(0, dtype=torch.long, device=device)
        self._pending: list[int] | None = None            # parents of the next forward's tree nodes
        self.decoder = None                               # decode_step.StaticDecoder of this generation, if any

    def plain(self) -> bool:
        """No tentative (tree) columns held or pending: a decode step may be a fixed-shape one."""
        return self.base is None and self._pending is None

    def add_tree(self, parents) -> None:
        """The next forward's T tokens are tree nodes: parents[i] is the tentative column index
        (0 = the first tentative column, counted over every add_tree since the last keep) of token
        i's parent, or -1 for a child of the committed sequence. Parents precede their children."""
        n = 0 if self.base is None else self.length - self.base
        for i, p in enumerate(parents):
            if not -1 <= int(p) < n + i:
                raise LayerpackError(f"tree node {i} names parent {p}, which is not an earlier node")
        self._pending = [int(p) for p in parents]

    def _reserve_tree(self, T: int) -> tuple[int, torch.Tensor]:
        parents = self._pending
        if parents is None or len(parents) != T:
            raise LayerpackError(f"add_tree gave {0 if parents is None else len(parents)} nodes for a forward of {T} tokens")
        if self.base is None:
            self.base = self.length
        n, dev = self.length - self.base, self.tree_ancestors.device
        anc = torch.zeros(n + T, n + T, dtype=torch.bool, device=dev)
        anc[:n, :n] = self.tree_ancestors
        depth = torch.cat([self.tree_depth, torch.zeros(T, dtype=torch.long, device=dev)])
        for i, p in enumerate(parents):
            if p >= 0:
                anc[n + i] = anc[p]
                depth[n + i] = depth[p] + 1
            anc[n + i, n + i] = True
        self.tree_ancestors, self.tree_depth = anc, depth
        positions = self.next_pos[:, None] + depth[None, n:].to(self.next_pos.device)
        self.positions[:, self.length:self.length + T] = positions
        self.valid[:, self.length:self.length + T] = True
        return self.length, positions

    def keep(self, path) -> None:
        """Keep the tentative columns `path` (root-first: each the parent of the next) as committed
        tokens, moved to follow the committed columns; drop every other tentative column."""
        if self.base is None:
            if len(path):
                raise LayerpackError("keep: there are no tentative (tree) columns")
            return
        base, m = self.base, len(path)
        if m:
            idx = torch.as_tensor(list(path), dtype=torch.long, device=self.tree_ancestors.device)
            # depths 0, 1, 2.. and each node an ancestor of the next: each is the next one's parent
            chain = bool(self.tree_ancestors[idx[1:], idx[:-1]].all())
            if not chain or not bool((self.tree_depth[idx] == torch.arange(m, device=idx.device)).all()):
                raise LayerpackError("keep: the columns given are not a root-first path of the token tree")
            if not bool((idx == torch.arange(m, device=idx.device)).all()):  # already in place: nothing to move
                for layer in self.layers:
                    cols = idx.to(layer.k.device) + base
                    layer.k[:, :, base:base + m] = layer.k.index_select(2, cols)
                    layer.v[:, :, base:base + m] = layer.v.index_select(2, cols)
            self.positions[:, base:base + m] = self.next_pos[:, None] + torch.arange(m, device=self.next_pos.device)
            self.next_pos += m
        self.length = base + m
        self.base, self._pending = None, None
        self.tree_ancestors = self.tree_ancestors[:0, :0]
        self.tree_depth = self.tree_depth[:0]

    def reserve(self, new_tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[int, torch.Tensor]:
        """Claim columns for new tokens [B, T] (attention_mask [B, T], 0 = padding). Returns the
        first column and the rotary positions [B, T] of the new tokens; call `commit` after the forward."""
        B, T = new_tokens.shape
        if B != self.batch:
            raise LayerpackError(f"batch of {B} does not match the KV cache's batch of {self.batch}")
        start = self.length
        if start + T > self.max_len:
            raise LayerpackError(f"sequence of {start + T} tokens exceeds the KV cache's {self.max_len} positions")
        if self._pending is not None:
            return self._reserve_tree(T)
        if self.base is not None:
            raise LayerpackError("the KV cache holds tentative (tree) columns: keep() a path before a plain forward")
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
        if self._pending is not None:  # tree nodes stay tentative until keep()
            self._pending = None
            return
        self.next_pos += T if attention_mask is None else attention_mask.to(self.next_pos.device).long().sum(1)

    def kv_valid(self, end: int) -> torch.Tensor | None:
        """Which columns [0, end) the new tokens may see: [B, end] (None: all), or with tree nodes
        pending, [B, T, end]: the committed columns and each node's tree ancestors (and itself)."""
        if self._pending is None:
            return self.valid[:, :end] if self.padded else None
        T, base = len(self._pending), self.base
        committed = self.valid[:, None, :base].expand(self.batch, T, base)
        tree = self.tree_ancestors[-T:, :end - base].to(self.valid.device)[None].expand(self.batch, T, end - base)
        return torch.cat([committed, tree], dim=2)
