"""One chat or completion request of `layerpack serve`, from its parsed body to its answer: prompts
encoded (tools through the chat template), one engine request per choice (n per prompt, submitted
together so equal prompts share one prefill), each with its own sampler settings and constraint
(response_format, forced tool calls), and the engine's events shaped into one OpenAI response or
a stream of chunks (tool calls parsed, logprobs in each endpoint's format)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from layerpack_runtime.engine import Engine, Event, QueueFull
from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.generate import SamplingParams
from layerpack_runtime.request_sampling import RequestSampling

from . import openai_shapes as shapes
from . import tool_calls
from .openai_api import ApiError, GenerationRequest

DISCONNECT_POLL_S = 0.5           # a non-streaming request checks this often whether its client left


@dataclass
class ChoiceState:
    index: int
    prompt: int                    # which prompt (completions' prompt lists)
    req: object = None             # engine Request
    parts: list[str] = field(default_factory=list)
    entries: list[tuple] = field(default_factory=list)  # (token, logprob, top) for logprobs
    finish: str | None = None
    error: str | None = None


class Job:
    """Built by `start` (in the event loop; blocking parts in a thread)."""

    def __init__(self, engine: Engine, model_name: str, g: GenerationRequest, chat: bool, grammars):
        self.engine, self.model_name, self.g, self.chat, self.grammars = engine, model_name, g, chat, grammars
        self.tokenizer = engine.tokenizer
        self.text = shapes.TokenText(self.tokenizer)
        self.kind = tool_calls.style(self.tokenizer.chat_template) if g.tools else None
        self.prompt_ids: list[list[int]] = []
        self.choices: list[ChoiceState] = []
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rid = shapes.new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    # -- building ------------------------------------------------------------------------------
    def encode(self) -> None:
        """Prompts -> ids (a thread: templates and tokenizers take time)."""
        g, tok = self.g, self.tokenizer
        if g.tools and "tools" not in (tok.chat_template or ""):
            # the template would drop them without a word: the model would never learn of the tools
            raise ApiError(400, "this model's chat template does not render tools, so it cannot be told about them",
                           param="tools")
        try:
            if self.chat:
                self.prompt_ids = [tok.encode_chat(g.messages, **({"tools": g.tools} if g.tools else {}))]
            else:
                self.prompt_ids = [tok.encode(p) if isinstance(p, str) else list(p) for p in g.prompts]
        except LayerpackError as e:
            raise ApiError(400, str(e), param="messages" if self.chat else "prompt") from None
        except Exception as e:  # noqa: BLE001 - a template failing on this request's messages is the request's fault
            raise ApiError(400, f"the chat template failed on these messages: {type(e).__name__}: {e}",
                           param="messages") from None

    def _constraint(self):
        g = self.g
        try:
            if g.json_schema is not None:
                return self.grammars().json_schema(g.json_schema)
            if g.tools and g.tool_choice != "auto":
                return self.grammars().lark(tool_calls.forced_grammar(g.tools, g.tool_choice, self.kind,
                                                                      g.parallel_tool_calls))
        except LayerpackError as e:
            raise ApiError(400, str(e), param="response_format" if g.json_schema is not None else "tool_choice") from None
        return None

    def requests(self, loop) -> list:
        """One engine request per choice (checked; raises ApiError)."""
        g, engine = self.g, self.engine
        total = len(self.prompt_ids) * g.n
        if total > engine.max_batch + engine.max_queue:
            raise ApiError(400, f"{total} choices (n x prompts) exceed what this server holds at once "
                                f"({engine.max_batch} slots + {engine.max_queue} waiting)", param="n")
        out = []
        for p, ids in enumerate(self.prompt_ids):
            room = engine.context - len(ids)
            if room < 1:
                raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is {engine.context} tokens "
                                    f"(prompt + completion)", param="messages" if self.chat else "prompt",
                               code="context_length_exceeded")
            max_tokens = g.max_tokens if g.max_tokens is not None else room
            if max_tokens > room:
                raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds this server's "
                                    f"context of {engine.context} tokens", param="max_tokens", code="context_length_exceeded")
            for j in range(g.n):
                c = ChoiceState(len(self.choices), p)
                self.choices.append(c)
                sampling = RequestSampling(g.presence_penalty, g.frequency_penalty, dict(g.logit_bias), g.logprobs,
                                           self._constraint(), prompt_logprobs=g.logprobs if g.echo else None)
                seed = None if g.seed is None else g.seed + j  # choice j of a seeded request: seed + j
                on_event = (lambda e, i=c.index: loop.call_soon_threadsafe(self.queue.put_nowait, (i, e)))
                try:
                    out.append(engine.request(ids, max_tokens, SamplingParams(g.temperature, g.top_k, g.top_p), g.stop,
                                              seed, on_event, sampling, speculate=g.speculate))
                except LayerpackError as e:
                    raise ApiError(400, str(e)) from None
        return out

    def submit(self, reqs: list) -> None:
        if self.engine.error:
            raise ApiError(503, f"the server cannot generate: {self.engine.error}", "server_error")
        try:
            self.engine.submit_all(reqs)
        except QueueFull as e:
            raise ApiError(503, str(e), "server_error", code="server_busy") from None
        except LayerpackError as e:
            raise ApiError(503, str(e), "server_error") from None
        for c, r in zip(self.choices, reqs):
            c.req = r

    def cancel(self) -> None:
        for c in self.choices:
            if c.req is not None and c.req.finish_reason is None:
                c.req.cancel()

    # -- events ----------------------------------------------------------------------------------
    def _note(self, c: ChoiceState, e: Event) -> None:
        if e.token is not None and e.logprob is not None and e.token not in self.engine.eos:
            c.entries.append((e.token, e.logprob, e.top))
        if e.finish_reason:
            c.finish, c.error = e.finish_reason, e.error

    def _failed(self, c: ChoiceState) -> ApiError:
        return ApiError(500, f"generation failed: {c.error or self.engine.error or c.finish}", "server_error")

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompt_ids))

    @property
    def completion_tokens(self) -> int:
        return sum(c.req.completion_tokens for c in self.choices)

    def _logprobs(self, c: ChoiceState, entries: list, offset: int = 0):
        if self.g.logprobs is None:
            return None
        return shapes.chat_logprobs(entries, self.text) if self.chat else shapes.completion_logprobs(entries, self.text, offset)

    def _prompt_text(self, p: int) -> str:
        prompt = self.g.prompts[p]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt, skip_special_tokens=False)

    async def collect(self, is_disconnected) -> dict | None:
        """The whole answer; None when the client left (its requests are cancelled)."""
        pending = len(self.choices)
        next_check = time.monotonic() + DISCONNECT_POLL_S
        while pending:
            try:
                i, e = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                i = e = None
            if e is not None:
                c = self.choices[i]
                c.parts.append(e.text)
                self._note(c, e)
                pending -= e.finish_reason is not None
            if time.monotonic() >= next_check:  # events may arrive every few ms: check by the clock
                next_check = time.monotonic() + DISCONNECT_POLL_S
                if await is_disconnected():
                    self.cancel()
                    return None
        for c in self.choices:
            if c.finish not in ("stop", "length"):
                raise self._failed(c)
        if self.chat:
            out = []
            for c in self.choices:
                text, finish, message = "".join(c.parts), c.finish, None
                if self.kind:
                    content, calls = tool_calls.parse(text, self.kind)
                    if calls:
                        message = {"content": content, "tool_calls": calls}
                        finish = "tool_calls" if finish == "stop" else finish
                out.append(shapes.chat_choice(c.index, message or {"content": text}, finish, self._logprobs(c, c.entries)))
            return shapes.chat_response(self.rid, self.model_name, out, self.prompt_tokens, self.completion_tokens)
        out = []
        for c in self.choices:
            head = self._prompt_text(c.prompt) if self.g.echo else ""
            entries = (c.req.prompt_entries or []) + c.entries  # echo + logprobs: the prompt's tokens first
            out.append(shapes.completion_choice(c.index, head + "".join(c.parts), c.finish, self._logprobs(c, entries)))
        return shapes.completion_response(self.rid, self.model_name, out, self.prompt_tokens, self.completion_tokens)

    async def stream(self):
        """Server-sent events; cancels what is left whatever way the client leaves."""
        def data(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        name, rid, created, chat = self.model_name, self.rid, self.created, self.chat

        offsets = {c.index: 0 for c in self.choices}  # completions' text_offset of the next token

        def chunk(c: ChoiceState, text: str | None = None, finish: str | None = None, delta: dict | None = None) -> str:
            lp = None
            if self.g.logprobs is not None and (c.entries or finish):
                lp = self._logprobs(c, c.entries, offsets[c.index])
                offsets[c.index] += sum(len(self.text(t)) for t, _, _ in c.entries)
                c.entries = []
            if chat:
                return data(shapes.chat_chunk(rid, name, created, delta if delta is not None else
                                              ({"content": text} if text else {}), finish, index=c.index, logprobs=lp))
            return data(shapes.completion_chunk(rid, name, created, text or "", finish, index=c.index, logprobs=lp))

        splitters = {c.index: tool_calls.StreamSplitter(self.kind) for c in self.choices} if self.kind else {}
        try:
            for c in self.choices:
                if chat:
                    yield data(shapes.chat_chunk(rid, name, created, {"role": "assistant", "content": ""}, index=c.index))
            echoed: set[int] = set()
            pending = len(self.choices)
            while pending:
                i, e = await self.queue.get()
                c = self.choices[i]
                if self.g.echo and i not in echoed and e.finish_reason not in ("cancelled", "error"):
                    echoed.add(i)  # the prompt (scored in the prefill) before the first new token
                    c.entries = list(c.req.prompt_entries or [])
                    yield chunk(c, self._prompt_text(c.prompt))
                self._note(c, e)
                if e.finish_reason in ("cancelled", "error"):
                    yield data(shapes_error(self._failed(c)))
                    return
                text = splitters[i].push(e.text) if i in splitters else e.text
                if text or (c.entries and not e.finish_reason):
                    yield chunk(c, text)
                if e.finish_reason:
                    finish = e.finish_reason
                    if i in splitters:
                        rest, calls = splitters[i].finish(self.kind)
                        if rest:
                            yield chunk(c, rest)
                        if calls:
                            finish = "tool_calls" if finish == "stop" else finish
                            yield chunk(c, delta={"tool_calls": [{"index": k, **call} for k, call in enumerate(calls)]})
                    yield chunk(c, finish=finish, delta={})
                    pending -= 1
            if self.g.include_usage:
                use = shapes.usage(self.prompt_tokens, self.completion_tokens)
                yield data(shapes.chat_chunk(rid, name, created, {}, use=use) if chat
                           else shapes.completion_chunk(rid, name, created, "", use=use))
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # the client left (or a choice failed): free the slots at the next step


def shapes_error(err: ApiError) -> dict:
    return err.body()
