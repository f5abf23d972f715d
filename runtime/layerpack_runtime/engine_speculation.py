"""Speculative decoding in the serving engine (engine.py): a decode step that verifies a token tree.

Design (continuous batching): the engine speculates only while ONE request is active, and only
for a greedy request that did not opt out (`Request.speculate`). That is the case speculation is
for: a lone user whose every token costs one pass over the streamed weights. With several
requests active, they already share each pass (batching), and per-row trees would need per-row
tentative columns and per-row accepted lengths that the slots' shared, right-aligned column
timeline cannot hold (slots.py); those steps decode plainly, and speculation resumes when one
request is left. Sampled requests (temperature > 0) always decode plainly: whether a step
speculates depends on what else is active, i.e. on timing, and a speculative step draws different
random numbers, so a seeded request would stop being reproducible. Greedy output does not depend
on it: a tree step emits exactly the tokens plain steps would.

Exactness with every per-request processor: the request's own RequestSampler picks the token at
the root and then at each accepted node in turn (penalties, logit_bias, constraints, logprobs see
exactly the sequence plain decoding would give them); a candidate is accepted only if it is the
token picked there, and the walk stops at the request's end (EOS, stop string, max_tokens).

Drafts: prompt lookup keeps no state. A draft model keeps one KV cache, for the request it last
proposed for; a different request (or one that decoded plainly meanwhile) is caught up by feeding
the draft the tokens it has not seen - so the draft's memory is one cache of a slot's length,
declared at load (`draft_workload`) and counted inside --max-memory.
"""
from __future__ import annotations

import time

import torch

from .drafts import DraftProposer, LookupProposer, TokenTree
from .generate import GREEDY_BELOW, SamplingParams
from .speculative import Speculation, SpeculationStats


class EngineSpeculation:
    """The engine's proposer and its statistics (see the module docstring)."""

    def __init__(self, spec: Speculation, max_len: int):
        spec.check()
        self.spec, self.budget, self.max_len = spec, spec.budget, int(max_len)
        self.stats = SpeculationStats()
        self._proposer = (LookupProposer() if spec.method == "lookup"
                          else DraftProposer(spec.draft, self.budget, SamplingParams(), None))
        self._owner: int | None = None  # the request id whose tokens the draft's cache holds
        self._seen = 0                  # context tokens the draft holds or has pending

    @property
    def tree_tokens(self) -> int:
        """Positions of a verification pass beyond the root (cache columns a slot needs beyond its sequence)."""
        return self.budget

    def applies(self, request) -> bool:
        return bool(request.speculate) and request.params.temperature < GREEDY_BELOW and self.budget > 0

    def propose(self, request, context: list[int], room: int) -> TokenTree:
        """A tree of at most `room` candidates to follow `context` (whose last token is the root)."""
        if isinstance(self._proposer, DraftProposer):
            if self._owner != request.id:
                self._proposer.start(context[:-1], self.max_len)  # the draft's cache now follows this request
                self._owner = request.id
            else:
                self._proposer.pending += context[self._seen:-1]  # tokens decoded plainly meanwhile
        t0 = time.perf_counter()
        tree = self._proposer.propose(context, max(0, room))
        self.stats.draft_s += time.perf_counter() - t0
        return tree

    def accept(self, tree: TokenTree, accepted: list[int], context_len: int) -> None:
        """The target accepted `accepted`; the context is now `context_len` tokens long."""
        self._proposer.accept(tree, accepted)
        self._seen = context_len - 1

    def record(self, tree: TokenTree, accepted: int, emitted: int, seconds: float) -> None:
        s = self.stats
        s.passes += 1
        s.accepted.append(accepted)
        s.positions.append(1 + len(tree))
        s.tokens += emitted
        if len(tree):
            s.verify_s += seconds
        else:
            s.single_s += seconds
            s.singles += 1


@torch.inference_mode()
def speculative_step(engine, r) -> bool:
    """One verification pass for the engine's only active request r (slot 0). Returns True when r
    finished (the caller frees its slot)."""
    spec: EngineSpeculation = engine.speculation
    cache = engine.cache
    context = r.prompt + r._tokens
    room = min(spec.budget, r.max_tokens - r.completion_tokens - 1, cache.max_len - cache.lengths[0] - 1)
    tree = spec.propose(r, context, room)
    t0 = time.perf_counter()
    cache.add_tree([-1] + [p + 1 for p in tree.parents])  # node 0: the root (the last token)
    logits = engine.model.forward(torch.tensor([[r._last] + tree.tokens], dtype=torch.long), cache=cache.view())[0]
    # the engine's counters move before the request's last event is sent (a client that reads them
    # after its answer sees this step counted)
    engine.stats.steps += 1
    engine.stats.speculative_steps += 1
    node, accepted, emitted, done = -1, [], 0, False
    while True:
        done = engine._advance(logits[node + 1:node + 2], r)
        emitted += 1
        if done:
            break
        node = next((c for c in tree.children.get(node, []) if tree.tokens[c] == r._last), None)
        if node is None:
            break
        accepted.append(node)
        engine.stats.accepted += 1
    cache.keep([0] + [n + 1 for n in accepted])
    spec.record(tree, len(accepted), emitted, time.perf_counter() - t0)
    if not done:
        spec.accept(tree, accepted, len(context) + len(accepted) + 1)
    return done
