"""A KV cache of independent slots, for continuous batching (engine.py).

Each slot holds one sequence; sequences of different lengths share one decode step. Like KVCache,
the slots share a column timeline so that the family code writes every row's new key at the same
column: a slot's n tokens sit right-aligned in columns [end - n, end), and the attention mask
(`kv_valid`) hides the columns to their left, which belong to nobody (or to a finished sequence).
When the timeline reaches `max_len`, `realign` moves every slot's columns back to the left edge
(one copy per layer); a joining prompt longer than `end` shifts them right the same way.

Active slots are kept dense at rows [0, active): a finished sequence's slot takes the last
active row's data (`move`), so a decode step runs over a contiguous view of the first rows and
never computes for an empty slot.

Speculative decoding (engine_speculation.py) runs while ONE slot is active: `add_tree(parents)`
makes the next forward's tokens nodes of a token tree (tentative columns after `end`, each seeing
the slot's sequence and its tree ancestors, rotary position = length + depth), and `keep(path)`
keeps one root-first path of them (moved left to follow the sequence) and drops the rest. Several
slots would each need their own tree and their own number of accepted columns, which the shared,
right-aligned timeline cannot hold without holes; the engine decodes them plainly instead.
"""
from __future__ import annotations

import torch

from .errors import LayerpackError


class _LayerView:
    """Rows [0, rows) of one layer's k/v, with LayerKV's `update`."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        self.k.narrow(2, start, T).copy_(k)
        self.v.narrow(2, start, T).copy_(v)
        return self.k.narrow(2, 0, start + T), self.v.narrow(2, 0, start + T)


class SlotKVCache:
    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        if slots < 1 or max_len < 2:
            raise LayerpackError(f"a slot cache needs >= 1 slot and >= 2 positions, not {slots} x {max_len}")
        self.slots, self.max_len = slots, max_len
        self.k = [torch.zeros(slots, kv_heads, max_len, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.positions = torch.zeros(slots, max_len, dtype=torch.long, device=device)  # rotary position per column
        self.lengths = [0] * slots  # tokens held by each slot
        self.active = 0             # slots in use: rows [0, active)
        self.end = 0                # columns [0, end) of the timeline are in use
        self.realigns = 0           # times the slots' columns were moved (compactions and right shifts)
        # A token tree over the one active slot (speculative decoding): parents of the next
        # forward's nodes, then (after that forward) its ancestor-or-self matrix and depths.
        self._tree: list[int] | None = None
        self._tree_anc: torch.Tensor | None = None
        self._tree_depth: torch.Tensor | None = None

    # -- slot management -------------------------------------------------------------------------
    def add(self, layer_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Take a free slot for a sequence whose keys/values are given per layer as [kv_heads, n,
        head_dim] (e.g. sliced from a prefill's KVCache); its positions are 0..n-1. Returns the slot."""
        if self.active >= self.slots:
            raise LayerpackError("no free KV slot")
        n = layer_kv[0][0].shape[1]
        if n < 1 or n >= self.max_len:
            raise LayerpackError(f"a sequence of {n} tokens does not fit a slot of {self.max_len} positions")
        if self.active == 0:
            self.end = 0
        if self.end < n:
            self.realign(n)
        s = self.active
        for i, (k, v) in enumerate(layer_kv):
            self.k[i][s, :, self.end - n:self.end].copy_(k)
            self.v[i][s, :, self.end - n:self.end].copy_(v)
        self.positions[s, self.end - n:self.end] = torch.arange(n, device=self.positions.device)
        self.lengths[s] = n
        self.active += 1
        return s

    def remove(self, slot: int) -> int | None:
        """Free `slot`. The last active slot's sequence moves into it (rows stay dense); returns the
        slot that moved (now at `slot`), or None."""
        if not 0 <= slot < self.active:
            raise LayerpackError(f"slot {slot} is not in use")
        last = self.active - 1
        moved = None
        if slot != last:
            n, lo = self.lengths[last], self.end - self.lengths[last]
            for k, v in zip(self.k, self.v):
                k[slot, :, lo:self.end].copy_(k[last, :, lo:self.end])
                v[slot, :, lo:self.end].copy_(v[last, :, lo:self.end])
            self.positions[slot, lo:self.end] = self.positions[last, lo:self.end]
            self.lengths[slot] = n
            moved = last
        self.lengths[last] = 0
        self.active -= 1
        self._tree = self._tree_anc = self._tree_depth = None  # a tree is only ever over the one slot
        if self.active == 0:
            self.end = 0
        return moved

    def clear(self) -> None:
        """Free every slot (after a failed step: what its rows hold is no longer known)."""
        self.lengths = [0] * self.slots
        self.active = 0
        self.end = 0
        self._tree = self._tree_anc = self._tree_depth = None

    # -- speculative decoding (one active slot) --------------------------------------------------
    def add_tree(self, parents) -> None:
        """The next forward's T tokens are tree nodes over the one active slot's sequence: parents[i]
        is the index (among them) of token i's parent, or -1 for a child of the sequence."""
        if self.active != 1:
            raise LayerpackError(f"a token tree needs exactly one active slot, not {self.active}")
        if self._tree_anc is not None:
            raise LayerpackError("the slot holds tentative (tree) columns: keep() a path first")
        for i, p in enumerate(parents):
            if not -1 <= int(p) < i:
                raise LayerpackError(f"tree node {i} names parent {p}, which is not an earlier node")
        self._tree = [int(p) for p in parents]

    def keep(self, path) -> None:
        """Keep the tentative columns `path` (indices among the tree's nodes, root-first: each the
        parent of the next) as the slot's next tokens; drop every other tentative column."""
        if self._tree_anc is None:
            raise LayerpackError("keep: there are no tentative (tree) columns")
        m, base = len(path), self.end
        if m:
            idx = torch.as_tensor(list(path), dtype=torch.long, device=self._tree_anc.device)
            chain = bool(self._tree_anc[idx[1:], idx[:-1]].all())
            if not chain or not bool((self._tree_depth[idx] == torch.arange(m, device=idx.device)).all()):
                raise LayerpackError("keep: the columns given are not a root-first path of the token tree")
            if not bool((idx == torch.arange(m, device=idx.device)).all()):
                for k, v in zip(self.k, self.v):
                    cols = idx.to(k.device) + base
                    k[:1, :, base:base + m] = k[:1].index_select(2, cols)
                    v[:1, :, base:base + m] = v[:1].index_select(2, cols)
            self.positions[0, base:base + m] = self.lengths[0] + torch.arange(m, device=self.positions.device)
        self.end += m
        self.lengths[0] += m
        self._tree = self._tree_anc = self._tree_depth = None

    def realign(self, new_end: int) -> None:
        """Move every active slot's columns so that the timeline ends at `new_end` (>= the longest
        sequence, <= max_len). One row at a time: the temporary copy stays small."""
        m = max(self.lengths[:self.active], default=0)
        if not m <= new_end <= self.max_len:
            raise LayerpackError(f"cannot realign {m} tokens to end at column {new_end} of {self.max_len}")
        if new_end != self.end and m:
            src, dst = slice(self.end - m, self.end), slice(new_end - m, new_end)
            for k, v in zip(self.k, self.v):
                for r in range(self.active):
                    k[r, :, dst] = k[r, :, src].clone()
                    v[r, :, dst] = v[r, :, src].clone()
            self.positions[:self.active, dst] = self.positions[:self.active, src].clone()
            self.realigns += 1
        self.end = new_end

    def make_room(self, T: int = 1) -> None:
        """Ensure T more columns fit the timeline (compacting to the left when it is full)."""
        if self.end + T > self.max_len:
            self.realign(max(self.lengths[:self.active], default=0))
            if self.end + T > self.max_len:
                raise LayerpackError(f"a slot of {self.max_len} positions is full")

    def view(self) -> "SlotBatch":
        """The active slots as one batch, for LayeredModel.forward(..., cache=view)."""
        return SlotBatch(self)


class SlotBatch:
    """Rows [0, active) of a SlotKVCache with KVCache's interface (reserve / commit / kv_valid /
    positions / layers) for one forward of new tokens [active, T] without padding."""

    def __init__(self, cache: SlotKVCache):
        self.cache = cache
        n = cache.active
        self.batch, self.max_len = n, cache.max_len
        self.layers = [_LayerView(k[:n], v[:n]) for k, v in zip(cache.k, cache.v)]
        self.positions = cache.positions[:n]
        self.lengths = torch.tensor(cache.lengths[:n], dtype=torch.long, device=cache.positions.device)

    def reserve(self, new_tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[int, torch.Tensor]:
        B, T = new_tokens.shape
        if B != self.batch:
            raise LayerpackError(f"batch of {B} does not match the {self.batch} active slots")
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise LayerpackError("slot batches take no padding (prefill prompts separately)")
        self.cache.make_room(T)
        start = self.cache.end
        if self.cache._tree is not None:
            return start, self._reserve_tree(start, T)
        positions = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)[None]
        self.positions[:, start:start + T] = positions
        return start, positions

    def _reserve_tree(self, start: int, T: int) -> torch.Tensor:
        c = self.cache
        parents = c._tree
        if len(parents) != T:
            raise LayerpackError(f"add_tree gave {len(parents)} nodes for a forward of {T} tokens")
        dev = c.positions.device
        anc = torch.zeros(T, T, dtype=torch.bool, device=dev)
        depth = torch.zeros(T, dtype=torch.long, device=dev)
        for i, p in enumerate(parents):
            if p >= 0:
                anc[i] = anc[p]
                depth[i] = depth[p] + 1
            anc[i, i] = True
        c._tree_anc, c._tree_depth = anc, depth
        positions = (self.lengths[:, None] + depth[None]).to(dev)
        self.positions[:, start:start + T] = positions
        return positions

    def kv_valid(self, end: int) -> torch.Tensor | None:
        """Row b sees columns [end - its tokens, end); None when every row fills the timeline. With
        a token tree pending: [1, T, end], the sequence's columns and each node's ancestors."""
        c = self.cache
        if c._tree is not None:
            T = end - c.end
            seq = torch.arange(c.end, device=c.positions.device) >= c.end - c.lengths[0]
            return torch.cat([seq[None].expand(T, c.end), c._tree_anc[:, :T]], dim=1)[None]
        T = end - self.cache.end
        first = end - (self.lengths + T)
        if bool((first == 0).all()):
            return None
        return torch.arange(end, device=first.device)[None, :] >= first[:, None]

    def commit(self, T: int, attention_mask: torch.Tensor | None) -> None:
        c = self.cache
        if c._tree is not None:  # tree nodes stay tentative until keep()
            c._tree = None
            return
        c.end += T
        for b in range(self.batch):
            c.lengths[b] += T
        self.lengths += T
