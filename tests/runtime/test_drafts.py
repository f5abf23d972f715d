"""Candidate trees (drafts.py): prompt lookup prefers the longest earlier match; a draft model
never runs a forward of more tree nodes than the GEMV kernels take (ROWS_PER_FORWARD), greedy or
sampled; the sampled tree's shape is fixed before any token is drawn and respects the budget, the
depth and the per-forward rows. (Exactness of the trees' verification: test_speculative.py.)"""
from __future__ import annotations

import torch

from layerpack_runtime import drafts
from layerpack_runtime.cache import KVCache
from layerpack_runtime.drafts import DraftProposer, LookupProposer, sampled_shape
from layerpack_runtime.generate import SamplingParams
from layerpack_runtime.qweight import GEMV_MAX_ROWS


class TableModel:
    """Next-token logits from a [V, V] table (no layers) through a real KVCache; records each
    forward's number of positions."""

    def __init__(self, V: int, seed: int):
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 2
        self.rows: list[int] = []

    def new_cache(self, batch, max_len, step_tokens=None):
        return KVCache(0, batch, 1, max_len, 1, torch.float32)

    def forward(self, ids, cache=None, attention_mask=None, last_only=False):
        cache.reserve(ids, None)
        cache.commit(ids.shape[1], None)
        self.rows.append(ids.shape[1])
        out = self.table[ids]
        return out[:, -1:] if last_only else out


def _is_tree(tree) -> bool:
    """Parents before children, and siblings distinct tokens."""
    return all(-1 <= p < i for i, p in enumerate(tree.parents)) and all(
        len({tree.tokens[c] for c in kids}) == len(kids) for kids in tree.children.values())


def test_lookup_prefers_the_longest_match_and_keeps_the_budget():
    # the context ends with 7 8 9; an old occurrence of "7 8 9" is followed by 50 51 52, a recent
    # one of "9" alone by 60 61: the longer match's continuation comes first
    context = [7, 8, 9, 50, 51, 52, 1, 2, 3, 9, 60, 61, 4, 5, 7, 8, 9]
    tree = LookupProposer().propose(context, 4)
    assert len(tree) == 4 and _is_tree(tree)
    first = tree.children[-1][0]
    assert tree.tokens[first] == 50 and tree.tokens[tree.children[first][0]] == 51
    wide = LookupProposer().propose(context, 12)
    assert len(wide) == 12 and _is_tree(wide)
    assert [wide.tokens[c] for c in wide.children[-1]] == [50, 60]  # the shorter match gets a branch too
    assert all(q is None for q in tree.proposal.values())  # deterministic candidates
    assert len(LookupProposer().propose(context, 0)) == 0
    assert len(LookupProposer().propose([1, 2, 3], 8)) == 0  # no earlier occurrence: nothing proposed


def test_sampled_shape_respects_budget_depth_and_rows(monkeypatch):
    for a in (0.8, 0.5, 0.2):
        monkeypatch.setattr(drafts, "SAMPLED_FIRST_CHILD", a)
        for budget in (1, 4, 16, 40):
            kids = sampled_shape(budget)
            assert sum(kids.values()) == budget
            assert all(len(path) <= drafts.DRAFT_STEPS for path in kids)  # children at most DRAFT_STEPS + 1 deep
            for depth in range(1, drafts.DRAFT_STEPS + 1):
                assert sum(len(p) == depth for p in kids) <= GEMV_MAX_ROWS
            assert all(p[:-1] in kids and p[-1] < kids[p[:-1]] for p in kids if p)  # inner nodes are nodes of the shape
    monkeypatch.setattr(drafts, "SAMPLED_FIRST_CHILD", 0.5)
    assert sampled_shape(16)[()] > 1  # siblings at the root


def test_draft_forwards_stay_within_the_gemv_rows():
    for params in (SamplingParams(), SamplingParams(temperature=0.7)):
        model = TableModel(V=64, seed=0)
        proposer = DraftProposer(model, 40, params, torch.Generator().manual_seed(0))
        context = [1, 2, 3]
        proposer.start(context[:-1], 200)
        for _ in range(5):
            model.rows.clear()
            tree = proposer.propose(context, 40)
            assert 0 < len(tree) <= 40 and _is_tree(tree)
            assert 1 + drafts.DRAFT_STEPS >= len(model.rows) >= 2
            assert max(model.rows[1:]) <= GEMV_MAX_ROWS, model.rows  # the quantized kernels' path, ~3x cheaper above it
            path = [tree.children[-1][0]]
            proposer.accept(tree, path)
            context = context + tree.path_tokens(path) + [5]
