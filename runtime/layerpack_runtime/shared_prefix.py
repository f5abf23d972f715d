"""The engine's prefill of several prompts at once, computing a prefix they share only once.

Chat requests start with the same template text (a system prompt, the role markers), so a burst of
clients sends prompts whose first few dozen tokens are equal. A left-padded batch computes those
tokens once per row; on a CPU, where a prefill is bound by its multiply-adds, that is most of the
work. Here, when the rows share a prefix of P tokens:

1. the prefix alone is one forward of [1, P] (causal: its keys and values depend on nothing after it);
2. every row's last T = (longest prompt - P) tokens are one forward of [n, T], over a cache whose
   first P columns hold, for row b, the first len_b - T prompt tokens (a prefix of the shared
   prefix: their keys/values from step 1, right-aligned; the columns left of them are padding);

so each row's new tokens are unpadded and see exactly its own prompt, at its own positions. The
result is the cache a left-padded prefill leaves ([n, P + T], rows right-aligned) and the last
position's logits of every row. Two passes over the weights instead of one: done only when it
saves at least MIN_SAVED_ROWS token-rows of compute.
"""
from __future__ import annotations

import torch

from .cache import KVCache
from .generate import left_pad

# Share a prefix only when that removes at least this many token-rows from the prefill (one more
# pass over the weights is then paid for by far fewer multiply-adds).
MIN_SAVED_ROWS = 64


def shared_prefix(prompts: list[list[int]]) -> int:
    """Tokens the prompts share at their start, leaving every prompt at least one token of its own."""
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def prefill(model, prompts: list[list[int]], pad_id: int, max_positions: int) -> tuple[torch.Tensor, KVCache, int]:
    """Prefill `prompts` (distinct) -> (logits of each row's last position [n, vocab], the cache
    [n, L] with row b's tokens in columns [L - len_b, L), the number of forwards). max_positions:
    most cache positions (rows x columns) the caller's memory plan holds for the prefill."""
    a = model.args
    n, longest = len(prompts), max(len(p) for p in prompts)
    P = shared_prefix(prompts) if n > 1 else 0
    if P * (n - 1) < MIN_SAVED_ROWS or n * longest + P > max_positions:
        ids, mask = left_pad(prompts, pad_id)
        cache = KVCache(a.num_layers, n, a.num_kv_heads, ids.shape[1], a.head_dim, model.dtype, model.device)
        return model.forward(ids, cache=cache, attention_mask=mask, last_only=True)[:, -1], cache, 1
    T = longest - P
    head = KVCache(a.num_layers, 1, a.num_kv_heads, P, a.head_dim, model.dtype, model.device)
    model.forward(torch.tensor([prompts[0][:P]], dtype=torch.long), cache=head, last_only=True)
    cache = KVCache(a.num_layers, n, a.num_kv_heads, P + T, a.head_dim, model.dtype, model.device)
    heads = [len(p) - T for p in prompts]  # row b's tokens before its last T: a prefix of the shared prefix
    for src, dst in zip(head.layers, cache.layers):
        for b, h in enumerate(heads):
            dst.k[b, :, P - h:P] = src.k[0, :, :h]
            dst.v[b, :, P - h:P] = src.v[0, :, :h]
    for b, h in enumerate(heads):
        cache.valid[b, :P - h] = False
        cache.positions[b, P - h:P] = torch.arange(h, device=cache.positions.device)
        cache.next_pos[b] = h
    cache.padded = any(h < P for h in heads)
    cache.length = P
    del head
    tails = torch.tensor([p[len(p) - T:] for p in prompts], dtype=torch.long)
    return model.forward(tails, cache=cache, last_only=True)[:, -1], cache, 2
