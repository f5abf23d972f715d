"""One request's token choice in the serving engine (engine.py): the OpenAI / vLLM logit processors
around generate.sample, and the log-probabilities a client asked for.

Order, as vLLM's sampler: the model's float32 logits -> presence / frequency penalties (over the
tokens this request generated) -> logit_bias -> a constraint's mask (structured output) ->
generate.sample (temperature, top_k, top_p, the request's generator). With none of the processors
set, the choice is exactly generate.sample's: a served request equals `layerpack run` for the same
seed. Log-probabilities come from the model's own distribution (log_softmax of the raw logits,
before any processor), as vLLM's default "raw_logprobs".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import LayerpackError
from .generate import SamplingParams, sample

MAX_PENALTY = 2.0      # presence / frequency penalty range [-2, 2], as OpenAI
MAX_BIAS = 100.0       # logit_bias values in [-100, 100], as OpenAI
MAX_LOGPROBS = 20      # most alternatives per token (OpenAI's top_logprobs limit)


class Constraint(Protocol):
    """Structured output: which tokens may come next (a grammar over the vocabulary)."""

    def allowed(self, vocab_size: int) -> torch.Tensor | None:
        """A bool mask [vocab_size] of the tokens allowed next (None: any)."""

    def advance(self, token: int) -> None:
        """The token chosen (it was allowed)."""


@dataclass
class Choice:
    token: int
    logprob: float | None = None                       # of the chosen token (None: not asked)
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely alternatives


@dataclass
class RequestSampling:
    """What a request asks of the sampler beyond SamplingParams."""
    presence_penalty: float = 0.0     # subtracted once from every token generated so far
    frequency_penalty: float = 0.0    # subtracted per occurrence of a token generated so far
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None       # None: none; k >= 0: the chosen token's and the k most likely
    constraint: Constraint | None = None
    prompt_logprobs: int | None = None  # also score the prompt's tokens (completions' echo + logprobs)

    def check(self, vocab_size: int) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise LayerpackError(f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}], not {v}")
        for t, b in self.logit_bias.items():
            if not 0 <= int(t) < vocab_size:
                raise LayerpackError(f"logit_bias token {t} is outside the vocabulary (0..{vocab_size - 1})")
            if not -MAX_BIAS <= b <= MAX_BIAS:
                raise LayerpackError(f"logit_bias values must be in [-{MAX_BIAS}, {MAX_BIAS}], not {b}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= int(v) <= MAX_LOGPROBS:
                raise LayerpackError(f"{name} must be in [0, {MAX_LOGPROBS}], not {v}")


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[tuple[int, float, list]]:
    """logits [T, vocab] predicting `tokens` [T] -> (token, its logprob, the k most likely) each."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    tops = [[] for _ in tokens]
    if k:
        vals, ids = torch.topk(lp, min(int(k), lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    return list(zip(tokens, chosen, tops))


@torch.inference_mode()
def score_prompt(model, ids: list[int], k: int, chunk: int) -> list[tuple[int, float | None, list]]:
    """The logprob of every token of `ids` after the first (which has no context: None), and the k
    most likely alternatives, from the model's own passes over `ids`, `chunk` positions at a time
    (one KV cache of len(ids) tokens; logits of `chunk` positions at once)."""
    from .cache import KVCache
    a = model.args
    cache = KVCache(a.num_layers, 1, a.num_kv_heads, len(ids), a.head_dim, model.dtype, model.device)
    entries: list = [(ids[0], None, [])]
    for s in range(0, len(ids) - 1, chunk):  # positions s..e-1 predict tokens s+1..e
        e = min(len(ids) - 1, s + chunk)
        logits = model.forward(torch.tensor([ids[s:e]], dtype=torch.long), cache=cache, last_only=False)[0]
        entries += token_logprobs(logits, ids[s + 1:e + 1], k)
    return entries


class RequestSampler:
    """The per-request state: the generator, the counts of generated tokens (for the penalties)."""

    def __init__(self, params: SamplingParams, extra: RequestSampling | None, generator: torch.Generator | None):
        self.params, self.extra, self.generator = params, extra or RequestSampling(), generator
        self._counts: torch.Tensor | None = None
        e = self.extra
        self._bias_ids = torch.tensor(sorted(e.logit_bias), dtype=torch.long) if e.logit_bias else None
        self._bias = (torch.tensor([float(e.logit_bias[t]) for t in sorted(e.logit_bias)], dtype=torch.float32)
                      if e.logit_bias else None)

    def pick(self, logits: torch.Tensor) -> Choice:
        """logits [1, vocab] (float32) -> the next token of this request."""
        e = self.extra
        x = logits
        if e.presence_penalty or e.frequency_penalty:
            if self._counts is not None:
                counts = self._counts.to(x.device)
                x = x - counts * e.frequency_penalty - (counts > 0).to(x.dtype) * e.presence_penalty
        if self._bias is not None:
            x = x.clone()
            x[0, self._bias_ids.to(x.device)] += self._bias.to(x.device)
        if e.constraint is not None:
            mask = e.constraint.allowed(x.shape[-1])
            if mask is not None:
                if not bool(mask.any()):
                    raise LayerpackError("the output constraint allows no token here")
                x = x.masked_fill(~mask.to(x.device)[None], float("-inf"))
        token = int(sample(x, self.params, self.generator)[0])
        if e.constraint is not None:
            e.constraint.advance(token)
        if e.presence_penalty or e.frequency_penalty:
            if self._counts is None:
                self._counts = torch.zeros(logits.shape[-1], dtype=torch.float32)
            self._counts[token] += 1
        choice = Choice(token)
        if e.logprobs is not None:
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            choice.logprob = float(lp[token])
            if e.logprobs:
                vals, ids = torch.topk(lp, min(int(e.logprobs), lp.shape[-1]))
                choice.top = list(zip(ids.tolist(), vals.tolist()))
        return choice
