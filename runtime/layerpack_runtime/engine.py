"""Continuous batching: many requests share each pass over the weights.

When every decode step streams the weights from disk, the only way to serve several users is to
share that pass. The engine runs one loop (in its own thread): at each iteration it

1. drops cancelled requests (their slots are freed at once);
2. admits waiting requests into free slots: their prompts are prefilled together (one left-padded
   batch, exactly `generate_tokens`' prefill; a lone prompt is exactly `LayeredModel.generate`'s;
   prompts that share a long prefix - a chat template's text - compute it once: shared_prefix.py),
   the first token is sampled, and each sequence's keys/values move into its own slot;
3. runs one decode step over every active slot (sequences of different lengths; slots.py), samples
   each row with its own parameters and generator, and reports the new text to each request.

With `speculation` (engine_speculation.py), a step with ONE active greedy request verifies a
token tree (prompt lookup or a resident draft model) instead: several tokens per pass, the same
tokens; steps with several requests decode plainly (they already share the pass).

A request ends at EOS, at a stop string, after max_tokens, or when cancelled, and leaves its slot
to the next one. Requests with the same prompt admitted together (`n` > 1, or clients sending the
same text) share one prefill row, then decode as separate rows. Each row chooses its tokens with its
own RequestSampler (request_sampling.py: penalties, logit_bias, constraints, logprobs).

Faults stay local: an error while choosing one request's token fails that request only; an error in
a forward pass fails the requests of that pass, and the supervisor in `_run` logs it, frees their
slots and goes on serving (`errors` / `last_error` count and show them, /health reports them).

What a request is and what it is told (Request, Event, QueueFull, the counters, the serving
Workload): engine_requests.py. The model is used only through `forward(ids, cache, attention_mask, last_only)`. Usable without any web layer: `Engine(model).submit(...)` returns a handle, and events arrive
through the callback (from the engine thread).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable

import torch

from .errors import LayerpackError
from .generate import SamplingParams
from .request_sampling import Choice, RequestSampler, RequestSampling, score_prompt
from .slots import SlotKVCache
from . import shared_prefix
from .tokenizer import TextStream
from .engine_requests import (ADMIT_WAIT_S, DEFAULT_MAX_QUEUE, MIN_PREFILL_TOKENS, SLACK_FRACTION, EngineStats, Event,  # noqa: F401
                              QueueFull, Request, engine_workload)

log = logging.getLogger("layerpack.engine")


class Engine:
    """Continuous-batching generation over a LayeredModel (see the module docstring).

    max_batch: slots (sequences decoded together). context: most tokens of one sequence (prompt +
    completion). prefill_tokens: most positions of one prefill forward (admitted prompts, padded;
    default: the larger of context and MIN_PREFILL_TOKENS). slack: timeline columns per slot beyond
    context (default context / SLACK_FRACTION). The memory plan reserves the slot cache, one
    prefill's cache and the larger of the prefill's and the decode step's activations at
    construction. `start()` runs the loop in a thread; without it, `step()` advances by hand.
    speculation: a speculative.Speculation (lookup, or a loaded draft checked against the model):
    a lone greedy request verifies a token tree per step (engine_speculation.py)."""

    def __init__(self, model, max_batch: int = 8, context: int = 2048, max_queue: int = DEFAULT_MAX_QUEUE,
                 prefill_tokens: int | None = None, slack: int | None = None, speculation=None):
        if int(max_batch) < 1:
            raise LayerpackError(f"max_batch must be >= 1, not {max_batch}")
        if int(context) < 2:
            raise LayerpackError(f"context must be >= 2 tokens, not {context}")
        if int(max_queue) < 0:
            raise LayerpackError(f"max_queue must be >= 0, not {max_queue}")
        self.model = model
        self.max_batch, self.context, self.max_queue = int(max_batch), int(context), int(max_queue)
        tree = speculation.budget if speculation is not None else 0
        self.workload = engine_workload(max_batch=self.max_batch, context=self.context, prefill_tokens=prefill_tokens,
                                        slack=slack, tree_tokens=tree)
        self.prefill_tokens = self.workload.prefill_tokens
        self.max_len = self.workload.context
        # The model's plan holds this workload: declared when it was loaded (serve.py loads with
        # engine_workload), so nothing is replanned here; an undeclared model (Python API) plans now.
        model.reserve(self.workload)
        a = model.args
        self.cache = SlotKVCache(a.num_layers, self.max_batch, a.num_kv_heads, self.max_len, a.head_dim, model.dtype, model.device)
        self.speculation = None
        if speculation is not None:
            from .engine_speculation import EngineSpeculation
            from .speculative import check_draft
            if speculation.draft is not None:
                check_draft(model, speculation.draft)
            self.speculation = EngineSpeculation(speculation, self.max_len)
        self.tokenizer = model.tokenizer
        self.eos = set(model.eos_ids)
        self.pad_id = model.pad_id()
        self.stats = EngineStats()
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []  # index = slot
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._admitting: list[Request] = []  # taken from the queue, not yet in a slot (counts as busy)
        self.error: str | None = None  # set if the loop itself died; requests then fail
        self.last_error: str | None = None  # the last failure the supervisor recovered from

    # -- requests --------------------------------------------------------------------------------
    def submit(self, prompt: list[int], max_tokens: int, params: SamplingParams | None = None, stop=None,
               seed: int | None = None, on_event: Callable[[Event], None] | None = None,
               sampling: RequestSampling | None = None, speculate: bool = True) -> Request:
        """Queue a request; raises LayerpackError for a bad one and QueueFull when the queue is full."""
        return self.submit_all([self.request(prompt, max_tokens, params, stop, seed, on_event, sampling, speculate)])[0]

    def submit_all(self, reqs: list[Request]) -> list[Request]:
        """Queue requests together (all or none: QueueFull when they do not all fit); those with the
        same prompt share one prefill row when admitted together (`n` > 1, prompt lists)."""
        if self.error or not self.alive:
            raise LayerpackError(f"the engine stopped: {self.error or 'its thread is not running'}")
        with self._lock:
            room = self.max_queue + max(0, self.max_batch - len(self._active) - len(self._admitting))
            if len(self._waiting) + len(reqs) > room:
                raise QueueFull(f"the server is busy ({len(self._waiting)} requests waiting); retry later")
            for r in reqs:
                r.id, r.submitted = next(self._ids), time.perf_counter()
                self._waiting.append(r)
            self._lock.notify()
        return reqs

    def request(self, prompt: list[int], max_tokens: int, params: SamplingParams | None = None, stop=None,
                seed: int | None = None, on_event: Callable[[Event], None] | None = None,
                sampling: RequestSampling | None = None, speculate: bool = True) -> Request:
        """A checked Request for submit_all (raises LayerpackError for a bad one). speculate=False:
        this request never verifies a token tree (it decodes one token per step)."""
        params = params or SamplingParams()
        params.check()
        if sampling is not None:
            sampling.check(self.model.args.vocab_size)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise LayerpackError("the prompt encodes to no tokens")
        vocab = self.model.args.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise LayerpackError(f"a prompt token is outside the vocabulary (0..{vocab - 1})")
        if int(max_tokens) < 1:
            raise LayerpackError(f"max_tokens must be >= 1, not {max_tokens}")
        if len(prompt) + int(max_tokens) > self.context:
            raise LayerpackError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                 f"context of {self.context} tokens")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        return Request(prompt, int(max_tokens), params, stops, seed, on_event or (lambda e: None), sampling, bool(speculate))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def alive(self) -> bool:
        """False once a started loop has ended (closed, or died: see `error`)."""
        return self._thread is None or self._thread.is_alive() or not self._started

    _started = False

    # -- the loop --------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="layerpack-engine", daemon=True)
            self._started = True
            self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        """The loop, and its supervisor: a failing step fails the requests it held, is logged with
        its traceback, and the loop goes on with the next requests."""
        try:
            while True:
                with self._lock:
                    idle = not self._active
                    while not self._stop and not self._waiting and not self._active:
                        self._lock.wait()
                    if self._stop:
                        break
                    deadline = time.monotonic() + ADMIT_WAIT_S
                    while idle and not self._stop and len(self._waiting) < self.max_batch and time.monotonic() < deadline:
                        self._lock.wait(max(0.0, deadline - time.monotonic()))
                try:
                    self.step()
                except Exception as e:  # noqa: BLE001 - fail this step's requests, keep serving the rest
                    self._recover(e)
        except BaseException as e:  # the supervisor itself failed: every waiting client must hear about it
            self.error = f"{type(e).__name__}: {e}"
            log.critical("the engine loop stopped: %s", self.error, exc_info=True)
        finally:
            with self._lock:
                pending = list(self._active) + list(self._waiting)
                self._waiting.clear()
            for r in pending:
                if r.finish_reason is None:
                    self._finish(r, "error" if self.error else "cancelled", error=self.error)

    def _recover(self, e: Exception) -> None:
        self.stats.errors += 1
        self.last_error = f"{type(e).__name__}: {e}"
        log.error("a generation step failed; its %d request(s) fail, the engine goes on: %s",
                  len(self._active) + len(self._admitting), self.last_error, exc_info=True)
        for r in self._active + self._admitting:
            self._finish(r, "error", error=self.last_error)
        self._active.clear()
        with self._lock:
            self._admitting.clear()
        self.cache.clear()

    def step(self) -> None:
        """One iteration: drop cancelled requests, admit waiting ones (one prefill), one decode step."""
        for slot in reversed(range(len(self._active))):
            if self._active[slot].cancelled:
                self._finish(self._active[slot], "cancelled")
                self._free(slot)
        admitted = self._take_waiting()
        if admitted:
            self._prefill(admitted)
            with self._lock:
                self._admitting = []
        if len(self._active) == 1 and self.speculation is not None and self.speculation.applies(self._active[0]):
            self._speculate()
        elif self._active:
            self._decode()

    def _take_waiting(self) -> list[Request]:
        out: list[Request] = []
        longest = 0
        with self._lock:
            for r in [r for r in self._waiting if r.cancelled]:  # a client that left while queued
                self._waiting.remove(r)
                self._finish(r, "cancelled")
            while self._waiting and len(self._active) + len(out) < self.max_batch:
                r = self._waiting[0]
                longest2 = max(longest, len(r.prompt))
                if out and longest2 * (len(out) + 1) > self.prefill_tokens:
                    break  # the rest waits for the next prefill
                out.append(self._waiting.popleft())
                longest = longest2
            self._admitting = out
        return out

    def _score_prompt(self, r: Request) -> None:
        """Echo + logprobs: every prompt token's logprob, before the batch's prefill allocates its
        cache, in chunks of logits no larger than one of the prefill's hidden states (the plan holds it)."""
        a = self.model.args
        chunk = max(1, self.prefill_tokens * a.hidden_size // a.vocab_size)
        r.prompt_entries = score_prompt(self.model, r.prompt, r.sampling.prompt_logprobs, chunk)

    @torch.inference_mode()
    def _prefill(self, reqs: list[Request]) -> None:
        m = self.model
        for r in reqs:
            if r.sampling is not None and r.sampling.prompt_logprobs is not None:
                try:
                    self._score_prompt(r)
                except Exception as e:  # noqa: BLE001 - this request's own passes: it fails alone
                    self._finish(r, "error", error=f"{type(e).__name__}: {e}")
        reqs = [r for r in reqs if r.finish_reason is None]
        if not reqs:
            return
        rows: dict[tuple[int, ...], int] = {}  # prompt -> its prefill row (equal prompts share one)
        for r in reqs:
            rows.setdefault(tuple(r.prompt), len(rows))
        # one left-padded batch, or a prefix the prompts share computed once (shared_prefix.py)
        logits, cache, passes = shared_prefix.prefill(m, [list(p) for p in rows], self.pad_id, self.prefill_tokens)
        self.stats.prefills += passes
        L = cache.length
        for r in reqs:
            b = rows[tuple(r.prompt)]
            r._stream = TextStream(self.tokenizer, r.stop)
            generator = torch.Generator(device=m.device).manual_seed(int(r.seed)) if r.seed is not None else None
            r._sampler = RequestSampler(r.params, r.sampling, generator)
            if self._advance(logits[b:b + 1], r):
                continue
            n = len(r.prompt)
            slot = self.cache.add([(layer.k[b, :, L - n:], layer.v[b, :, L - n:]) for layer in cache.layers])
            assert slot == len(self._active)
            self._active.append(r)
        self.stats.max_active = max(self.stats.max_active, len(self._active))

    @torch.inference_mode()
    def _decode(self) -> None:
        ids = torch.tensor([[r._last] for r in self._active], dtype=torch.long)
        logits = self.model.forward(ids, cache=self.cache.view(), last_only=True)[:, -1]
        self.stats.steps += 1
        done = []
        for slot, r in enumerate(self._active):
            if self._advance(logits[slot:slot + 1], r):
                done.append(slot)
        for slot in reversed(done):
            self._free(slot)

    def _speculate(self) -> None:
        from .engine_speculation import speculative_step
        if speculative_step(self, self._active[0]):
            self._free(0)

    def _advance(self, logits: torch.Tensor, r: Request) -> bool:
        """Choose and report r's next token; True when r is finished. A failure here (its sampler,
        constraint or text) ends r with "error", alone."""
        try:
            return self._emit(r, r._sampler.pick(logits))
        except Exception as e:  # noqa: BLE001 - one request's failure must not end the others
            error = f"{type(e).__name__}: {e}"
            log.warning("request %d failed while choosing or reporting its next token: %s", r.id, error)
            self._finish(r, "error", error=error)
            return True

    def _emit(self, r: Request, choice: Choice) -> bool:
        """Report the token chosen for request r; True when r is finished."""
        tok = choice.token
        if r.first_token_s is None:
            r.first_token_s = time.perf_counter() - r.submitted
        self.stats.tokens += 1
        r._last = tok
        r._tokens.append(tok)
        lp = dict(logprob=choice.logprob, top=choice.top)
        if tok in self.eos:
            r.completion_tokens += 1
            self._finish(r, "stop", r._stream.finish(), tok, **lp)
            return True
        r.completion_tokens += 1
        piece = r._stream.push(tok)
        if r._stream.stopped:
            self._finish(r, "stop", piece, tok, **lp)
            return True
        if r.completion_tokens >= r.max_tokens:
            self._finish(r, "length", piece + r._stream.finish(), tok, **lp)
            return True
        if r.cancelled:
            self._finish(r, "cancelled", piece, tok, **lp)
            return True
        self._call(r, Event(piece, tok, **lp))
        return False

    def _finish(self, r: Request, reason: str, text: str = "", tok: int | None = None, error: str | None = None,
                logprob: float | None = None, top: list | None = None) -> None:
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        self.stats.cancelled += reason == "cancelled"
        self.stats.failed += reason == "error"
        self._call(r, Event(text, tok, reason, error, logprob, top or []))

    @staticmethod
    def _call(r: Request, e: Event) -> None:
        try:
            r.on_event(e)
        except Exception:  # noqa: BLE001 - a failing consumer must not stop the others
            r.cancelled = True

    def _free(self, slot: int) -> None:
        moved = self.cache.remove(slot)
        last = self._active.pop()
        if moved is not None:
            self._active[slot] = last

    # -- convenience (no web layer) --------------------------------------------------------------
    def generate(self, prompt: list[int], max_tokens: int, params: SamplingParams | None = None, stop=None,
                 seed: int | None = None) -> tuple[str, Request]:
        """Blocking: submit one request and wait for its text (the engine must be started)."""
        done = threading.Event()
        parts: list[str] = []

        errors: list[str] = []

        def on_event(e: Event) -> None:
            parts.append(e.text)
            if e.error:
                errors.append(e.error)
            if e.finish_reason:
                done.set()

        r = self.submit(prompt, max_tokens, params, stop, seed, on_event)
        done.wait()
        if r.finish_reason == "error":
            raise LayerpackError(f"generation failed: {errors[0] if errors else self.error}")
        return "".join(parts), r
