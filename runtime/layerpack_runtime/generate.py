"""Token generation: sampling, the prefill/decode loop over a KV cache, and timing.

Model-agnostic: works on any object with `new_cache(batch, max_len)` and
`forward(input_ids, cache=..., attention_mask=..., last_only=True)` returning float32 logits
[B, T, vocab] (see loader.LayeredModel). Text, chat templates and stop strings live one level up.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from .errors import LayerpackError

# A temperature below this samples greedily (as vLLM's _SAMPLING_EPS): dividing float32 logits by a
# tiny temperature overflows to inf (1e-300 is 0 in float32), and the softmax then gives NaN.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 0.0   # 0 (or below GREEDY_BELOW): greedy (argmax)
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off

    def check(self) -> None:
        if not self.temperature >= 0:
            raise LayerpackError(f"temperature must be >= 0 (0 = greedy), not {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise LayerpackError(f"top_k must be a whole number >= 0 (0 = off), not {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LayerpackError(f"top_p must be in (0, 1] (1 = off), not {self.top_p}")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, vocab] (float32) -> next token ids [B]."""
    if params.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    return torch.multinomial(sampling_probs(logits, params), 1, generator=generator).squeeze(-1)


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [B, vocab] (float32) -> the distribution `sample` draws from (temperature > 0), [B, vocab]."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, int(params.top_k), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        drop[..., 0] = False  # a top_p below float32's range (1e-300 is 0) keeps the first token too
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


@dataclass
class GenerationStats:
    batch: int = 0
    prompt_tokens: int = 0      # real prompt tokens over the batch (padding excluded)
    steps: int = 0              # tokens sampled per row (the first one comes from the prefill)
    prefill_s: float = 0.0      # time to first token
    decode_s: float = 0.0       # forward + sampling time of the later steps
    bytes_read: int = 0         # layer bytes streamed from disk during this generation
    io_wait_s: float = 0.0      # time compute waited for a streamed unit (reads not hidden by compute)
    threads: int = 0            # torch's CPU threads during this generation

    @property
    def decode_tokens_per_s(self) -> float:
        n = (self.steps - 1) * self.batch
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    def summary(self) -> str:
        per_step = self.bytes_read / self.steps / 2**20 if self.steps else 0.0
        return (f"prefill: {self.prompt_tokens} tokens in {self.prefill_s:.3f} s ({self.prefill_tokens_per_s:.1f} tokens/s); "
                f"decode: {max(self.steps - 1, 0) * self.batch} tokens in {self.decode_s:.3f} s ({self.decode_tokens_per_s:.2f} tokens/s); "
                f"disk: {per_step:.1f} MiB read per step, {self.io_wait_s:.3f} s waiting for reads; threads: {self.threads}")


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts of different lengths -> ids [B, L] left-padded with pad_id, and the attention
    mask (None when no row needed padding)."""
    if not prompts:
        raise LayerpackError("no prompt given")
    if any(len(p) == 0 for p in prompts):
        raise LayerpackError("a prompt encodes to no tokens; give some text")
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, L - len(p):] = 1
    return ids, (None if bool(mask.all()) else mask)


def generate_tokens(model, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                    pad_id: int = 0, generator: torch.Generator | None = None,
                    stats: GenerationStats | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B] long, on CPU), up to max_new_tokens times. Rows are
    never stopped here: the caller watches for EOS / stop strings and stops iterating when done."""
    params.check()
    ids, mask = left_pad(prompts, pad_id)
    stats = stats if stats is not None else GenerationStats()
    stats.batch, stats.prompt_tokens, stats.steps = len(prompts), sum(map(len, prompts)), 0
    stats.prefill_s = stats.decode_s = 0.0
    stats.threads = torch.get_num_threads()
    if max_new_tokens <= 0:
        return
    cache = model.new_cache(ids.shape[0], ids.shape[1] + max_new_tokens, step_tokens=ids.numel())
    read0, wait0 = getattr(model, "bytes_read", 0), getattr(model, "io_wait_s", 0.0)

    def io() -> None:
        stats.bytes_read = getattr(model, "bytes_read", 0) - read0
        stats.io_wait_s = getattr(model, "io_wait_s", 0.0) - wait0

    t0 = time.perf_counter()
    logits = model.forward(ids, cache=cache, attention_mask=mask, last_only=True)[:, -1]
    tok = sample(logits, params, generator)
    out = tok.cpu()  # also waits for an accelerator, so the timing is real
    stats.prefill_s = time.perf_counter() - t0
    stats.steps = 1
    io()
    yield out
    for _ in range(max_new_tokens - 1):
        t0 = time.perf_counter()
        logits = model.forward(tok[:, None], cache=cache, last_only=True)[:, -1]
        tok = sample(logits, params, generator)
        out = tok.cpu()
        stats.decode_s += time.perf_counter() - t0
        stats.steps += 1
        io()
        yield out
