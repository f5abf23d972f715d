"""Where speculative decoding's candidate tokens come from: a token tree under the last sampled
token (the root), grown by prompt lookup or by a small resident draft model.

A `TokenTree` lists nodes in topological order (a parent before its children); each node's
children are in the order they were proposed, and `proposal[node]` (node -1: the root) is the
distribution they were drawn from one after another without replacement (None: proposed
deterministically). speculative.verify relies on exactly that to keep the target's distribution.

- `LookupProposer` (prompt-lookup decoding): continuations of the earlier occurrences of the
  context's end that match it longest, merged into a weighted trie. Deterministic.
- `DraftProposer`: the draft model's tree. Greedy decoding grows it as SpecExec does: always the
  nodes of highest cumulative draft probability, the draft expanding the best nodes that can
  still make the cut (at most ROWS_PER_FORWARD per forward), until `budget` nodes. Sampling draws each node's children from the draft's
  distribution (Gumbel top-k: an ordered sample without replacement) and chooses the tree's *shape*
  from fixed per-rank weights rather than from the drawn tokens' probabilities (Sequoia-style): a
  shape that looked at the drawn tokens would bias which tokens get proposed, and with them the
  output distribution. The shape is known before any token is drawn, so the draft runs exactly
  its inner nodes, one forward per depth.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch

from .generate import SamplingParams, sampling_probs
from .options import Workload
from .qweight import GEMV_MAX_ROWS

LOOKUP_MATCHES = 8          # earlier occurrences merged into the trie (the longest matches)
LOOKUP_MAX_MATCH = 8        # match lengths counted up to this many tokens
LOOKUP_DEPTH_DECAY = 0.8    # a lookup node's weight shrinks by this per level (agreement fades with depth)
CHILDREN_PER_NODE = 8       # most children a draft node gets (the budget caps the total)
SAMPLED_FIRST_CHILD = 0.8   # sampling: shape weight of a node's first child; rank r gets 0.8 * 0.2^r
# Draft forwards per proposal after the root's (so the tree is at most DRAFT_STEPS + 1 deep): a
# same-size draft (the NF4 pack of the target) costs as much compute per forward as the target, so
# on a CPU more steps cost more than the extra accepted tokens save. SmolLM2 NF4 draft vs bf16
# target agrees on the greedy token at only ~2/3 of positions (the target's token is in the draft's
# top 4 at ~96%), so a wide tree pays more than a deep one: greedy, 16 nodes, 3.48 tokens per pass
# with 3 steps (3.9 draft forwards, 20 rows per pass) vs 3.62 with 4 (4.7, 22 rows), 3.13 with 2;
# at temperature 0.7, 3.36 with 3 steps vs 3.28 with 4 (scripts/sweep_speculative.py; BENCHMARKS.md,
# "Speculative decoding").
DRAFT_STEPS = 3
ROWS_PER_FORWARD = GEMV_MAX_ROWS  # tree nodes per draft forward (see DraftProposer)


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
    """Prompt-lookup decoding: no model, candidates copied from the context itself.

    Every earlier occurrence of the context's last token is a match, ranked by how many tokens
    before it also agree with the context's end (up to LOOKUP_MAX_MATCH; ties: the most recent
    first). The best LOOKUP_MATCHES continuations are merged into a trie whose nodes are weighed by
    the matches through them (a match of length m weighs m^2) times LOOKUP_DEPTH_DECAY per level,
    and the tree is the `budget` heaviest nodes (a node never outweighs its parent, so they form a
    tree). Timing-free sweep (scripts/sweep_speculative.py, BENCHMARKS.md): on the grounded
    prompts this gives more tokens per pass than taking the first matching 3-, 2- or 1-gram's
    recent occurrences (e.g. 3.18 vs 3.03 at budget 10 and 3.54 vs 3.28 at 16, 5 prompts x 64
    tokens, replayed on the plain greedy output)."""

    def start(self, prompt: list[int], max_len: int) -> None:
        pass

    def propose(self, context: list[int], budget: int) -> TokenTree:
        tree = TokenTree()
        matches = self._matches(context) if budget > 0 else []
        tokens, parents, weights, depths = [], [], [], []
        index: dict[tuple[int, int], int] = {}  # (parent, token) -> trie node
        total = sum(m * m for m, _ in matches)
        for m, end in matches:
            node = -1
            for depth, t in enumerate(context[end + 1:end + 1 + budget], 1):
                child = index.get((node, t))
                if child is None:
                    child = index[(node, t)] = len(tokens)
                    tokens.append(t), parents.append(node), weights.append(0.0), depths.append(depth)
                weights[child] += m * m / total
                node = child
        score = [w * LOOKUP_DEPTH_DECAY ** d for w, d in zip(weights, depths)]
        keep = sorted(sorted(range(len(tokens)), key=lambda n: (-score[n], n))[:budget])  # parents rank first: ties by index
        renum = {-1: -1}
        for n in keep:
            renum[n] = tree.add(tokens[n], renum[parents[n]])
        tree.proposal = {n: None for n in tree.children}
        return tree

    @staticmethod
    def _matches(context: list[int]) -> list[tuple[int, int]]:
        """(match length, end index) of the best LOOKUP_MATCHES earlier occurrences of context[-1]."""
        last, n = context[-1], len(context)
        found = []
        for end in range(n - 2, -1, -1):
            if context[end] == last:
                m = 1
                while m < LOOKUP_MAX_MATCH and end - m >= 0 and context[end - m] == context[n - 1 - m]:
                    m += 1
                found.append((m, end))
        found.sort(key=lambda f: (-f[0], -f[1]))
        return found[:LOOKUP_MATCHES]

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
    """A small resident model proposes the tree; its KV cache follows the accepted path.

    Each draft forward after the root's processes at most ROWS_PER_FORWARD tree nodes: up to
    that many activation rows a forward runs the quantized GEMV kernels, above it another path that
    costs more per row (SmolLM2 NF4 draft, CPU time at 1 thread: 16 ms for 1 row, 35 ms for 8,
    53 ms for 16, 93 ms for 32 after session 4's kernel work; 22 / 33 / 108 ms before it - BENCHMARKS.md,
    "Speculative decoding"). Capping each step at 8 cost no tokens per pass in the sweeps there."""

    def __init__(self, draft, budget: int, params: SamplingParams, generator: torch.Generator | None):
        self.draft, self.budget, self.params, self.generator = draft, budget, params, generator
        self.cache = None
        self.pending: list[int] = []   # accepted tokens the draft has not processed yet
        self.columns: dict[int, int] = {}  # draft node -> the draft cache's tentative column
        self._draft_node: dict[int, int] = {}  # tree node -> draft node

    def start(self, prompt: list[int], max_len: int) -> None:
        w = draft_workload(max_len, len(prompt), self.budget)
        self.cache = self.draft.new_cache(1, w.context, step_tokens=w.step_tokens)
        self.pending = list(prompt)

    def propose(self, context: list[int], budget: int) -> TokenTree:
        feed = self.pending + [context[-1]]
        self.pending = []
        root_logits = self.draft.forward(torch.tensor([feed]), cache=self.cache, last_only=True)[0, -1:]
        self.columns, self._draft_node = {}, {}
        if budget <= 0:
            return TokenTree()
        if self.params.temperature == 0:
            return self._grow_greedy(root_logits, budget)
        return self._grow_sampled(root_logits, budget)

    def _forward_nodes(self, parents: list[int], tokens: list[int]) -> torch.Tensor:
        """Run the draft over tree nodes (parents: draft nodes already processed, or -1) -> logits [n, vocab]."""
        self.cache.add_tree([self.columns.get(p, -1) for p in parents])
        return self.draft.forward(torch.tensor([tokens]), cache=self.cache)[0]

    def _grow_greedy(self, root_logits: torch.Tensor, budget: int) -> TokenTree:
        """SpecExec: candidates scored by cumulative draft log-probability; each step expands the
        best unexpanded nodes that can still place children in the top `budget` (at most
        ROWS_PER_FORWARD per step); the tree is the top `budget` candidates."""
        k = min(CHILDREN_PER_NODE, self.budget)
        tokens, parents, scores = [], [], []

        def expand(nodes: list[int], logits: torch.Tensor) -> None:
            top = torch.topk(torch.log_softmax(logits.float(), -1), k)
            for node, toks, logp in zip(nodes, top.indices.tolist(), top.values.tolist()):
                base = scores[node] if node >= 0 else 0.0
                for t, lp in zip(toks, logp):
                    tokens.append(t), parents.append(node), scores.append(base + lp)

        expand([-1], root_logits)
        for _ in range(DRAFT_STEPS):
            order = sorted(range(len(tokens)), key=lambda n: (-scores[n], n))  # ancestors rank before descendants
            top = order[:budget]
            cutoff = scores[top[-1]] if len(top) == budget else -math.inf
            todo = [n for n in top if n not in self.columns and scores[n] > cutoff]
            todo = todo[:min(ROWS_PER_FORWARD, 2 * self.budget - len(self.columns))]  # the draft's declared workload
            if not todo:
                break
            logits = self._forward_nodes([parents[n] for n in todo], [tokens[n] for n in todo])
            for n in todo:
                self.columns[n] = len(self.columns)
            expand(todo, logits)
        keep = sorted(sorted(range(len(tokens)), key=lambda n: (-scores[n], n))[:budget])
        tree, renum = TokenTree(), {-1: -1}
        for n in keep:
            renum[n] = tree.add(tokens[n], renum[parents[n]])
        tree.proposal = {renum[n]: None for n in renum}
        self._draft_node = {new: old for old, new in renum.items()}
        return tree

    def _grow_sampled(self, root_logits: torch.Tensor, budget: int) -> TokenTree:
        """Sampling: the tree's shape is fixed in advance (sampled_shape); each node's children
        are an ordered sample without replacement (Gumbel top-k) from the draft's distribution
        there, as many as the shape gives it, and the draft runs over the shape's inner nodes only,
        one forward per depth."""
        kids = sampled_shape(budget)
        tree, path_of = TokenTree(), {-1: ()}
        proposal: dict[int, torch.Tensor | None] = {}
        level = [-1]
        logits = root_logits
        for depth in range(DRAFT_STEPS + 1):
            counts = [kids[path_of[n]] for n in level]
            q = sampling_probs(logits.float(), self.params)
            keys = q.log() - torch.empty_like(q).exponential_(generator=self.generator).log()  # Gumbel: -inf where q is 0
            order = torch.topk(keys, max(counts)).indices.tolist()
            drawn = (q > 0).sum(-1).tolist()
            nxt = []
            for i, node in enumerate(level):
                proposal[node] = q[i]
                for r, t in enumerate(order[i][:min(counts[i], drawn[i])]):
                    child = tree.add(t, node)
                    path_of[child] = path_of[node] + (r,)
                    if path_of[child] in kids:
                        nxt.append(child)
            if not nxt or depth == DRAFT_STEPS:
                break
            logits = self._forward_nodes([tree.parents[n] for n in nxt], [tree.tokens[n] for n in nxt])
            for n in nxt:
                self.columns[n] = len(self.columns)
            level = nxt
        tree.proposal = {n: proposal.get(n) for n in tree.children}
        self._draft_node = {n: n for n in range(len(tree))}
        return tree

    def accept(self, tree: TokenTree, accepted: list[int]) -> None:
        """The target accepted tree nodes `accepted` (a root-first path): keep the draft's cache
        entries of those it processed, and feed it the rest next time."""
        original = [self._draft_node[n] for n in accepted] if accepted else []
        done = [self.columns[n] for n in original if n in self.columns]
        self.cache.keep(done)
        self.pending = [tree.tokens[n] for n in accepted[len(done):]]


def sampled_shape(budget: int) -> dict[tuple, int]:
    """The fixed tree shape for sampling: {a node's path of child ranks (root: ()): its number of
    children}, for nodes that have children. The `budget` nodes of highest shape weight, the rank-r
    child weighing SAMPLED_FIRST_CHILD * (1 - SAMPLED_FIRST_CHILD)^r times its parent (about the
    acceptance rates measured for SmolLM2's NF4 draft at temperature 0.7: 0.74 for the first child,
    0.40 / 0.25 / 0.11 for the next ones after rejections), at most DRAFT_STEPS + 1 deep and at most
    ROWS_PER_FORWARD inner nodes per depth (one draft forward each). Fixed, not chosen from the
    drawn tokens: a shape that looked at them would bias which tokens are proposed."""
    a = SAMPLED_FIRST_CHILD
    first, later = math.log(a), math.log(1 - a) if a < 1 else -math.inf
    heap = [(-first, (0,))]
    kids: dict[tuple, int] = {}
    inner = [0] * (DRAFT_STEPS + 2)  # inner nodes per depth
    chosen = 0
    while heap and chosen < budget:
        neg, path = heapq.heappop(heap)
        parent, rank = path[:-1], path[-1]
        if len(path) > DRAFT_STEPS + 1 or rank >= CHILDREN_PER_NODE:
            continue
        if parent not in kids:
            if parent and inner[len(parent)] >= ROWS_PER_FORWARD:
                continue  # its parent cannot get a row in that depth's forward
            inner[len(parent)] += 1
            kids[parent] = 0
        kids[parent] += 1
        chosen += 1
        heapq.heappush(heap, (neg - later, parent + (rank + 1,)))
        heapq.heappush(heap, (neg - first, path + (0,)))
    return kids
