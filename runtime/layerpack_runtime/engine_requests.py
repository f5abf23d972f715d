"""What the engine (engine.py) is asked and what it answers: a Request (prompt, limits, sampling,
stop strings and its event callback), the Events it reports, QueueFull, the engine's counters, the
Workload a serving engine plans its memory for, and the defaults of its admission rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .errors import LayerpackError
from .generate import SamplingParams
from .options import Workload
from .request_sampling import RequestSampler, RequestSampling
from .tokenizer import TextStream

# Default positions of one prefill forward at least (admitted prompts, padded): a burst of chat
# requests (each with its template's system prompt) shares one prefill - one pass over streamed
# weights - rather than one per few prompts when --context is small.
MIN_PREFILL_TOKENS = 512
# Default extra timeline columns per slot beyond --context (a fraction of it): without slack, a
# slot near the context limit would force a compaction (a copy of the KV cache) almost every step.
SLACK_FRACTION = 4
DEFAULT_MAX_QUEUE = 64
# An idle engine waits this long after the first request before its prefill, so that a burst of
# clients shares one prefill (one pass over the weights) instead of one each.
ADMIT_WAIT_S = 0.01

class QueueFull(LayerpackError):
    """The engine's waiting queue is full (an HTTP server answers 503)."""


@dataclass
class Event:
    text: str = ""                      # new final text (may be empty)
    token: int | None = None            # the token just generated (None for the closing event of a cancel)
    finish_reason: str | None = None    # "stop" (EOS / stop string), "length", "cancelled", "error"
    error: str | None = None
    logprob: float | None = None        # of `token`, when the request asked for logprobs
    top: list[tuple[int, float]] = field(default_factory=list)  # the most likely alternatives to `token`


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    on_event: Callable[[Event], None] = lambda e: None
    sampling: RequestSampling | None = None
    speculate: bool = True              # False: never verify a token tree for this request (opt-out)
    # filled by the engine
    prompt_entries: list | None = None  # sampling.prompt_logprobs: (token, logprob or None, top) per prompt token
    id: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    submitted: float = 0.0
    first_token_s: float | None = None  # time to first token, from submit
    _stream: TextStream | None = None
    _sampler: RequestSampler | None = None
    _last: int = 0
    _tokens: list[int] = field(default_factory=list)  # generated so far (speculation's context)

    def cancel(self) -> None:
        """Stop generating for this request (safe from any thread); its slot is freed at the next step."""
        self.cancelled = True


@dataclass
class EngineStats:
    steps: int = 0            # decode steps
    prefills: int = 0         # prefill forwards
    tokens: int = 0           # tokens generated over all requests
    max_active: int = 0       # most slots in use at once
    cancelled: int = 0        # requests that ended by cancel (a client that left)
    failed: int = 0           # requests that ended by an error (theirs, or their forward pass's)
    errors: int = 0           # forward passes that failed (the supervisor recovered from each)
    speculative_steps: int = 0  # decode steps that verified a token tree (engine_speculation.py)
    accepted: int = 0         # candidate tokens those steps accepted (tokens beyond one per step)


def engine_workload(*, max_batch: int = 8, context: int = 2048, prefill_tokens: int | None = None,
                    slack: int | None = None, tree_tokens: int = 0) -> Workload:
    """What an Engine asks of its model, to declare at load (serve.py): `max_batch` slots of
    `context` tokens plus slack columns each, beside one prefill's cache of up to `prefill_tokens`
    positions (admitted prompts, padded; default: the larger of context and MIN_PREFILL_TOKENS), run as
    one row-batch of 1 (the prefill), and decode steps of one position per slot. tree_tokens:
    speculation's candidates per pass - a slot holds that many tentative columns beyond its
    sequence, and a verification pass (1 row of 1 + tree_tokens positions) is within the prefill's."""
    max_batch, context = int(max_batch), int(context)
    prefill = max(int(prefill_tokens or MIN_PREFILL_TOKENS), context, int(tree_tokens) + 1)
    max_len = context + (max(1, context // SLACK_FRACTION) if slack is None else int(slack)) + int(tree_tokens)
    return Workload(context=max_len, batch=max_batch, prefill_tokens=prefill, prefill_batch=1, extra_kv_tokens=prefill)
