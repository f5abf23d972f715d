"""Where speculative decoding's candidate tokens come from: a token tree under the last sampled
token (the root), grown by prompt lookup or by a small resident draft model.

A `TokenTree` lists nodes in topological order (a parent before its children); each node's
children are in the order they were proposed, and `proposal[node]` (node -1: the root) is the
distribution they were drawn from one after another without replacement (None: proposed
deterministically). speculative.verify relies on exactly that to keep the target's distribution.

- `LookupProposer` (prompt-lookup decoding): continuations of earlier occurrences of the
  context's last n tokens (n = 3, then 2, then 1), merged into a trie. Deterministic.
- `DraftProposer`: the draft model's tree. Greedy decoding grows it as SpecExec does: always the
  nodes of highest cumulative draft probability, the draft expanding every node that can still
  make the cut, until `budget` nodes. Sampling draws each node's children from the draft's
  distribution (Gumbel top-k: an ordered sample without replacement) and chooses the tree's *shape*
  from fixed per-rank weights rather than from the drawn tokens' probabilities (Sequoia-style): a
  shape that looked at the drawn tokens would bias which tokens get proposed, and with them the
  output distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .generate import SamplingParams, sampling_probs
from .options import Workload

LOOKUP_NGRAMS = (3, 2, 1)   # suffix lengths tried, longest first
LOOKUP_MATCHES = 4          # earlier occurrences merged into the trie (most recent first)
CHILDREN_PER_NODE = 8       # most children a draft node gets (the budget caps the total)
SAMPLED_FIRST_CHILD = 0.8   # sampling: shape weight of a node's first child; rank r gets 0.8 * 0.2^r
# Draft forwards per proposal after the root's (so the tree is at most DRAFT_STEPS + 1 deep): a
# same-size draft (the NF4 pack of the target) costs as much compute per forward as the target, so
# on a CPU more steps cost more than the extra accepted tokens save. SmolLM2 NF4 draft vs bf16
# target agrees on the greedy token at only ~2/3 of positions (the target's token is in the draft's
# top 4 at ~96%), so a wide tree pays more than a deep one: measured with 16 nodes, 3.48 tokens per
# pass with 3 steps (4.0 draft forwards per pass) vs 3.62 with 4 (4.8), and 2.85 with 8 nodes and
# 4 steps (BENCHMARKS.md, "Speculative decoding").
DRAFT_STEPS = 3


@dataclass
class TokenTree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)       # -1: a child of the root
    children: dict[int, list[int]] = field(default_factory=lambda: {-1: []})
    proposal: dict[int, torch.Tensor | None] = field(default_factory=dict)  # node (-1: root) -> its children's q

    def add(self, token: int, parent: int) -> int:
        node = len(self.tokens)
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.children[parent].append(node)
        self.children[node] = []
        return node

    def __len__(self) -> int:
        return len(self.tokens)

    def path_tokens(self, nodes: list[int]) -> list[int]:
        return [self.tokens[n] for n in nodes]


class LookupProposer:
    """Prompt-lookup decoding: no model, candidates copied from the context itself."""

    def start(self, prompt: list[int], max_len: int) -> None:
        pass

    def propose(self, context: list[int], budget: int) -> TokenTree:
        tree = TokenTree()
        if budget <= 0:
            return tree
        conts = []
        for n in LOOKUP_NGRAMS:
            if len(context) <= n:
                continue
            suffix = context[-n:]
            for i in range(len(context) - n - 1, -1, -1):  # most recent occurrence first (not the suffix itself)
                if context[i:i + n] == suffix:
                    conts.append(context[i + n:i + n + budget])
                    if len(conts) == LOOKUP_MATCHES:
                        break
            if conts:
                break
        for k, cont in enumerate(conts):  # a trie: shared prefixes cost one node; the first match may take 2/3
            cap = budget * 2 // 3 if k == 0 and len(conts) > 1 else budget
            node = -1
            for t in cont[:cap]:
                child = next((c for c in tree.children[node] if tree.tokens[c] == t), None)
                if child is None:
                    if len(tree) >= budget:
                        break
                    child = tree.add(t, node)
                node = child
        tree.proposal = {n: None for n in tree.children}
        return tree

    def accept(self, tree: TokenTree, accepted: list[int]) -> None:
        pass


def draft_workload(max_len: int, first_tokens: int, budget: int) -> Workload:
    """What a DraftProposer asks of its draft model, to declare when the draft is loaded (so its
    memory is planned once, and counted where the run's budget is split): one cache row for
    sequences of up to `max_len` tokens plus tentative columns for at most 2 x budget processed
    tree nodes; forwards of up to `first_tokens` + 1 positions (the prompt, or tokens to catch up
    on, plus the root) or 2 x budget (a tree level)."""
    return Workload(context=max(1, int(max_len) + 2 * int(budget) + 2), batch=1,
                    prefill_tokens=max(1, int(first_tokens) + 1, 2 * int(budget)), prefill_batch=1)


class DraftProposer:
    """A small resident model proposes the tree; its KV cache follows the accepted path."""

    def __init__(self, draft, budget: int, params: SamplingParams, generator: torch.Generator | None):
        self.draft, self.budget, self.params, self.generator = draft, budget, params, generator
        self.cache = None
        self.pending: list[int] = []   # accepted tokens the draft has not processed yet
        self.columns: dict[int, int] = {}  # tree node -> the draft cache's tentative column

    def start(self, prompt: list[int], max_len: int) -> None:
        w = draft_workload(max_len, len(prompt), self.budget)
        self.cache = self.draft.new_cache(1, w.context, step_tokens=w.step_tokens)
        self.pending = list(prompt)

    def _children(self, logits: torch.Tensor) -> tuple[list[int], list[float], torch.Tensor | None]:
        """Children of a node whose next-token logits are `logits` [vocab]: tokens, shape scores
        (log weights) and the distribution they were drawn from (None: greedy top tokens)."""
        k = min(CHILDREN_PER_NODE, self.budget)
        if self.params.temperature == 0:
            logp = torch.log_softmax(logits.float(), -1)
            top = torch.topk(logp, k)
            return top.indices.tolist(), top.values.tolist(), None
        q = sampling_probs(logits[None].float(), self.params)[0]
        gumbel = -torch.empty_like(q).exponential_(generator=self.generator).log()
        keys = q.log() + gumbel  # -inf where q is 0: never drawn
        order = torch.topk(keys, min(k, int((q > 0).sum()))).indices.tolist()
        a = SAMPLED_FIRST_CHILD
        return order, [math.log(a) + r * math.log(1 - a) for r in range(len(order))], q

    def propose(self, context: list[int], budget: int) -> TokenTree:
        feed = self.pending + [context[-1]]
        self.pending = []
        root_logits = self.draft.forward(torch.tensor([feed]), cache=self.cache, last_only=True)[0, -1]
        self.columns, self._draft_node = {}, {}
        if budget <= 0:
            return TokenTree()
        # Candidate nodes: token, parent, log score (cumulative); self.columns: those the draft processed
        tokens, parents, scores, kids = [], [], [], {-1: []}
        proposal: dict[int, torch.Tensor | None] = {}

        def expand(node: int, logits: torch.Tensor, base: float) -> None:
            toks, logw, q = self._children(logits)
            proposal[node] = q
            for t, lw in zip(toks, logw):
                kids[node].append(len(tokens))
                kids[len(tokens)] = []
                tokens.append(t), parents.append(node), scores.append(base + lw)

        expand(-1, root_logits, 0.0)
        processed = steps = 0
        while processed < 2 * self.budget and steps < DRAFT_STEPS:
            steps += 1
            order = sorted(range(len(tokens)), key=lambda n: (-scores[n], n))  # ancestors rank before descendants
            top = order[:budget]
            cutoff = scores[top[-1]] if len(top) == budget else -math.inf
            todo = [n for n in sorted(top) if n not in self.columns and scores[n] > cutoff][:2 * self.budget - processed]
            if not todo:
                break
            n0 = len(self.columns)
            for i, n in enumerate(todo):
                self.columns[n] = n0 + i
            self.cache.add_tree([self.columns.get(parents[n], -1) for n in todo])
            logits = self.draft.forward(torch.tensor([[tokens[n] for n in todo]]), cache=self.cache)[0]
            processed += len(todo)
            for i, n in enumerate(todo):
                expand(n, logits[i], scores[n])
        keep = sorted(sorted(range(len(tokens)), key=lambda n: (-scores[n], n))[:budget])
        tree, renum = TokenTree(), {-1: -1}
        for n in keep:
            renum[n] = tree.add(tokens[n], renum[parents[n]])
        tree.proposal = {renum[n]: proposal.get(n) for n in renum}
        self._draft_node = {new: old for old, new in renum.items()}
        return tree

    def accept(self, tree: TokenTree, accepted: list[int]) -> None:
        """The target accepted tree nodes `accepted` (a root-first path): keep the draft's cache
        entries of those it processed, and feed it the rest next time."""
        original = [self._draft_node[n] for n in accepted] if accepted else []
        done = [self.columns[n] for n in original if n in self.columns]
        self.cache.keep(done)
        self.pending = [tree.tokens[n] for n in accepted[len(done):]]
