"""The OpenAI API's request checks and response shapes, for `layerpack serve` (serve.py).

Pure functions over parsed JSON: no web framework here. A bad request raises ApiError with the
HTTP status, and the body follows OpenAI's error format ({"error": {"message", "type", "param",
"code"}}), so clients show the message as they would OpenAI's.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

# Named limits of one request (the body itself is capped by serve.MAX_BODY_BYTES).
MAX_STOP_STRINGS = 4            # as OpenAI
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
MAX_TEMPERATURE = 2.0           # as OpenAI
MAX_SEED = 2**63 - 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class GenerationRequest:
    """What the engine needs from a chat or completion request (prompt still as text / messages)."""
    messages: list[dict] | None = None   # chat
    prompt: str | list[int] | None = None  # completion
    max_tokens: int | None = None        # None: up to the context
    temperature: float = 1.0             # OpenAI's default
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(400, f"'{name}' must be a number", param=name)
    if v > hi or v < lo or (lo_open and v == lo):
        raise ApiError(400, f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], not {v}", param=name)
    return float(v)


def _int(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{name}' must be an integer", param=name)
    if not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], not {v}", param=name)
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"'{name}' must be true or false", param=name)
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters",
                       param="stop")
    return [s for s in stops if s]


def _common(body: Any, served_model: str, context: int) -> GenerationRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (see GET /v1/models)", param="model")
    if model != served_model:
        raise ApiError(404, f"The model '{model[:200]}' does not exist; this server serves '{served_model}'",
                       param="model", code="model_not_found")
    n = _int(body, "n", 1, 1 << 30)
    if n not in (None, 1):
        raise ApiError(400, "'n' > 1 is not supported (send separate requests: they are batched together)", param="n")
    for name in ("logprobs", "top_logprobs", "echo", "tools", "functions", "best_of", "suffix"):
        v = body.get(name)
        if v and not (name == "best_of" and v == 1):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name)
    r = GenerationRequest()
    limit = body.get("max_completion_tokens")
    r.max_tokens = _int(body, "max_completion_tokens" if limit is not None else "max_tokens", 1, context)
    r.temperature = _number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
    r.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    r.stop = _stop(body)
    r.seed = _int(body, "seed", -MAX_SEED, MAX_SEED)
    r.stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        r.include_usage = _bool(opts, "include_usage")
    return r


def parse_chat(body: Any, served_model: str, context: int) -> GenerationRequest:
    r = _common(body, served_model, context)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"at most {MAX_MESSAGES} messages", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    r.messages = out
    return r


def parse_completion(body: Any, served_model: str, context: int) -> GenerationRequest:
    r = _common(body, served_model, context)
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str) and p:
        r.prompt = p
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        r.prompt = list(p)
    else:
        raise ApiError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)",
                       param="prompt")
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        r.max_tokens = min(16, context)  # OpenAI's default for completions
    return r


# -- responses -----------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None, use: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [] if use is not None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        chunk["usage"] = use
    return chunk


def completion_response(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None = None, use: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [] if use is not None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        chunk["usage"] = use
    return chunk


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "layerpack"}]}
