"""Speculative decoding: many candidate tokens checked per pass over the (streamed) layers.

When the target model streams its layers from disk, a forward pass costs about the same for 1 or
for dozens of token positions: the pass is bound by reading the weights. So each pass verifies a
whole token tree (drafts.py: prompt lookup or a small resident draft model) under the last
sampled token: the cache gets the tree's nodes as tentative columns with a tree attention mask
and tree positions (cache.add_tree), the target's logits at every node decide how far down the
tree the output follows the candidates, and the cache keeps that path's keys/values only
(cache.keep). Every pass yields the accepted tokens plus one token of the target's own.

Exactness:
- greedy: a candidate is accepted only if it is the target's argmax there, so the output is the
  plain greedy output token for token (up to float rounding differences between a 1-position and
  an N-position pass; fp32 compute makes that moot);
- sampling: multi-candidate speculative (rejection) sampling, SpecInfer/SpecTr style: at a node
  with target distribution p, children c_1, c_2.. drawn one after another without replacement
  from q (deterministic candidates: q a point mass), c_i is accepted with probability
  min(1, p(c_i)/q_i(c_i)); on rejection p becomes norm(max(p - q_i, 0)) and q_{i+1} is q_i
  without c_i; when every child is rejected the token is drawn from what p has become. By
  induction over the children the token drawn has the target's distribution p exactly.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .drafts import DraftProposer, LookupProposer, TokenTree
from .errors import LayerpackError
from .generate import GenerationStats, SamplingParams, sampling_probs

METHODS = ("lookup", "draft")
DEFAULT_DRAFT_TOKENS = {"lookup": 10, "draft": 16}  # tree nodes per pass (bench_speculative.py, BENCHMARKS.md)


@dataclass
class Speculation:
    """How to speculate: method "lookup" (prompt lookup) or "draft" (a loaded draft model)."""
    method: str = "lookup"
    draft: object | None = None        # a LayeredModel sharing the target's tokenizer (method "draft")
    draft_tokens: int | None = None    # tree nodes per target pass (default: DEFAULT_DRAFT_TOKENS)

    def check(self) -> None:
        if self.method not in METHODS:
            raise LayerpackError(f"--speculate must be one of {', '.join(METHODS)}, not {self.method!r}")
        if (self.method == "draft") != (self.draft is not None):
            raise LayerpackError("speculation with a draft model needs draft=..., and only then" if self.draft is None
                                 else "a draft model was given with --speculate lookup; use one or the other")
        if self.draft_tokens is not None and not 0 <= int(self.draft_tokens) <= 1024:
            raise LayerpackError(f"--draft-tokens must be in 0..1024, not {self.draft_tokens}")

    @property
    def budget(self) -> int:
        return int(self.draft_tokens) if self.draft_tokens is not None else DEFAULT_DRAFT_TOKENS[self.method]


@dataclass
class SpeculationStats:
    passes: int = 0                                    # target passes after the prefill
    accepted: list[int] = field(default_factory=list)  # candidates accepted in each pass
    positions: list[int] = field(default_factory=list) # positions verified in each pass (1 + tree nodes)
    draft_s: float = 0.0
    verify_s: float = 0.0                              # target passes with more than 1 position
    single_s: float = 0.0                              # target passes of 1 position (nothing proposed)
    singles: int = 0
    tokens: int = 0                                    # tokens generated after the first
    bytes_read: int = 0                                # target bytes streamed during those passes

    def summary(self) -> str:
        multi = self.passes - self.singles
        mean = sum(self.accepted) / self.passes if self.passes else 0.0
        hist = Counter(self.accepted)
        verify = f"{self.verify_s / multi:.3f} s per pass of {sum(self.positions) / max(1, len(self.positions)):.1f} positions" if multi else "no multi-position pass"
        single = f"{self.single_s / self.singles:.3f} s per 1-position pass" if self.singles else "no 1-position pass"
        return (f"speculation: {self.passes} target passes for {self.tokens} tokens; accepted candidates per pass: mean {mean:.2f}, "
                f"histogram {{{', '.join(f'{k}: {hist[k]}' for k in sorted(hist))}}} (+1 token of the target's own per pass); "
                f"draft {self.draft_s:.3f} s; verify {verify} vs {single}; "
                f"disk: {self.bytes_read / max(1, self.tokens) / 2**20:.1f} MiB read per generated token")


def verify(logits: torch.Tensor, tree: TokenTree, params: SamplingParams, generator: torch.Generator | None,
           residual: bool = True) -> tuple[list[int], int]:
    """logits [1 + len(tree), vocab] (float32): the target's at the root (row 0) and at every node
    (row node + 1). Returns the accepted nodes (a root-first path) and the next token after them.
    residual=False is a deliberately broken rule (tests only): after a rejection, draw from p
    itself rather than from the residual norm(max(p - q, 0)), which over-weights the draft's tokens."""
    accepted, node = [], -1
    while True:
        row = logits[node + 1]
        kids = tree.children.get(node, [])
        if params.temperature == 0:
            best = int(row.argmax())
            nxt = next((c for c in kids if tree.tokens[c] == best), None)
            if nxt is None:
                return accepted, best
        else:
            nxt, p = None, sampling_probs(row[None], params)[0].double()
            q = tree.proposal.get(node)
            q = None if q is None else q.to(p.device, torch.float64).clone()
            for c in kids:
                x = tree.tokens[c]
                u = float(torch.rand((), generator=generator, device=p.device))
                ratio = float(p[x]) if q is None else min(1.0, float(p[x] / q[x])) if q[x] > 0 else 0.0
                if u < ratio:
                    nxt = c
                    break
                rest = p.clone()
                if q is None:
                    rest[x] = 0
                else:
                    rest = (p - q).clamp_min_(0)
                    q[x] = 0
                    q = q / q.sum() if q.sum() > 0 else q
                if rest.sum() <= 1e-12:  # p == q up to rounding: the rejection had probability ~0
                    nxt = c
                    break
                if residual:
                    p = rest / rest.sum()
            if nxt is None:
                return accepted, int(torch.multinomial(p.float(), 1, generator=generator))
        accepted.append(nxt)
        node = nxt


def _proposer(spec: Speculation, params: SamplingParams, generator):
    if spec.method == "lookup":
        return LookupProposer()
    return DraftProposer(spec.draft, spec.budget, params, generator)


def speculative_tokens(model, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                       generator: torch.Generator | None, stats: GenerationStats, spec: Speculation,
                       spec_stats: SpeculationStats | None = None, residual: bool = True) -> Iterator[torch.Tensor]:
    """Like generate.generate_tokens for one prompt: yields the next token ([1] long, on CPU) until
    max_new_tokens; each target pass verifies a tree of up to spec.budget candidate tokens."""
    params.check()
    spec.check()
    if len(prompts) != 1:
        raise LayerpackError(f"speculative decoding generates for one prompt at a time, not a batch of {len(prompts)}")
    prompt = list(prompts[0])
    if not prompt:
        raise LayerpackError("a prompt encodes to no tokens; give some text")
    sstats = spec_stats if spec_stats is not None else SpeculationStats()
    stats.batch, stats.prompt_tokens, stats.steps = 1, len(prompt), 0
    stats.prefill_s = stats.decode_s = 0.0
    stats.threads = torch.get_num_threads()
    if max_new_tokens <= 0:
        return
    budget = spec.budget
    L = len(prompt)
    workload = getattr(model, "workload", None)
    if workload is not None and workload.declared and getattr(model, "max_memory", None) is not None:
        # a plan made once for a declared workload under a budget: trees only as large as it holds
        budget = max(0, min(budget, workload.step_tokens - 1, workload.context - L - max_new_tokens - 1))
    proposer = _proposer(spec, params, generator)
    cache = model.new_cache(1, L + max_new_tokens + budget + 1, step_tokens=max(L, budget + 1))
    if not hasattr(cache, "add_tree"):  # a stages.Pipeline's cache spans processes
        raise LayerpackError("--speculate is not supported with --stages yet")
    read0 = getattr(model, "bytes_read", 0)
    t0 = time.perf_counter()
    logits = model.forward(torch.tensor([prompt]), cache=cache, last_only=True)[:, -1]
    tok = int(torch.multinomial(sampling_probs(logits, params), 1, generator=generator)) if params.temperature else int(logits.argmax())
    stats.prefill_s, stats.steps = time.perf_counter() - t0, 1
    stats.bytes_read = getattr(model, "bytes_read", 0) - read0
    yield torch.tensor([tok])
    proposer.start(prompt, L + max_new_tokens)
    context = prompt + [tok]
    produced = 1
    while produced < max_new_tokens:
        t0 = time.perf_counter()
        tree = proposer.propose(context, budget if max_new_tokens - produced > 1 else 0)  # the last token needs no candidates
        t1 = time.perf_counter()
        read1 = getattr(model, "bytes_read", 0)
        cache.add_tree([-1] + [p + 1 for p in tree.parents])  # row 0: the root (the last token)
        logits = model.forward(torch.tensor([[tok] + tree.tokens]), cache=cache)[0]
        accepted, bonus = verify(logits, tree, params, generator, residual)
        cache.keep([0] + [n + 1 for n in accepted])
        proposer.accept(tree, accepted)
        new = tree.path_tokens(accepted) + [bonus]
        t2 = time.perf_counter()
        sstats.passes += 1
        sstats.accepted.append(len(accepted))
        sstats.positions.append(1 + len(tree))
        sstats.draft_s += t1 - t0
        if len(tree):
            sstats.verify_s += t2 - t1
        else:
            sstats.single_s += t2 - t1
            sstats.singles += 1
        sstats.bytes_read += getattr(model, "bytes_read", 0) - read1
        stats.decode_s += t2 - t0
        stats.bytes_read = getattr(model, "bytes_read", 0) - read0
        for t in new[:max_new_tokens - produced]:
            produced += 1
            sstats.tokens += 1
            stats.steps += 1
            yield torch.tensor([t])
        context += new
        tok = bonus


def speculation(target, speculate: str | None, draft, draft_tokens: int | None) -> Speculation | None:
    """generate()'s keyword options -> a checked Speculation (None: plain decoding). draft: a loaded
    model (draft_model.load_draft / open_draft)."""
    if speculate is None and draft is None:
        if draft_tokens is not None:
            raise LayerpackError("--draft-tokens needs --speculate lookup or --draft")
        return None
    if draft is not None and not hasattr(draft, "forward"):
        raise LayerpackError("draft= takes a loaded model: layerpack_runtime.draft_model.load_draft(path, target)")
    if draft is not None:
        check_draft(target, draft)
    spec = Speculation(method=speculate or "draft", draft=draft, draft_tokens=draft_tokens)
    spec.check()
    return spec


def check_draft(target, draft) -> None:
    """The draft must share the target's tokenizer: same vocabulary and special tokens (else one
    LayerpackError naming what differs)."""
    ta, da = target.args, draft.args
    if ta.vocab_size != da.vocab_size:
        raise LayerpackError(f"the draft's vocabulary has {da.vocab_size} tokens, the target's {ta.vocab_size}")
    for name in ("bos_token_id", "eos_token_ids", "pad_token_id"):
        if getattr(ta, name) != getattr(da, name):
            raise LayerpackError(f"the draft's {name} is {getattr(da, name)}, the target's {getattr(ta, name)}")
    tt, dt = _tokenizer_or_none(target), _tokenizer_or_none(draft)
    if (tt is None) != (dt is None):
        raise LayerpackError(f"the {'target' if tt is not None else 'draft'} has a tokenizer.json and the "
                             f"{'draft' if tt is not None else 'target'} has none")
    if tt is not None:
        tv, dv = tt.tok.get_vocab(with_added_tokens=True), dt.tok.get_vocab(with_added_tokens=True)
        if tv != dv:
            diff = sorted(set(tv.items()) ^ set(dv.items()), key=lambda kv: kv[1])[0]
            raise LayerpackError(f"the draft's tokenizer differs from the target's ({len(dv)} vs {len(tv)} tokens; "
                                 f"first difference at id {diff[1]}: {diff[0]!r})")
        if tt.special_tokens != dt.special_tokens or tt.eos_ids != dt.eos_ids or tt.bos_id != dt.bos_id:
            raise LayerpackError(f"the draft's special tokens {dt.special_tokens} (eos {dt.eos_ids}, bos {dt.bos_id}) differ from "
                                 f"the target's {tt.special_tokens} (eos {tt.eos_ids}, bos {tt.bos_id})")


def _tokenizer_or_none(model):
    try:
        return model.tokenizer
    except LayerpackError:  # a pack without tokenizer.json (token-id prompts only)
        return None


def tree_room(speculate: str | None, draft_tokens: int | None) -> int:
    """Cache columns a speculative generation needs beyond prompt + new tokens (the tree's
    tentative columns), for a workload declared at load."""
    return (int(draft_tokens) if draft_tokens is not None else DEFAULT_DRAFT_TOKENS[speculate or "draft"]) + 1
