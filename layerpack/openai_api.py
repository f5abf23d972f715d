"""The OpenAI API's request checks, for `layerpack serve` (serve.py); response shapes are in
openai_shapes.py.

Pure functions over parsed JSON: no web framework here. A bad request raises ApiError with the
HTTP status, and the body follows OpenAI's error format ({"error": {"message", "type", "param",
"code"}}), so clients show the message as they would OpenAI's. Every parameter a request may send
is listed below and does what OpenAI (or vLLM, for its extensions) says it does; any other is a 400,
as OpenAI answers "Unrecognized request argument" - a client never gets a 200 that ignored it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

# Named limits of one request (the body itself is capped by serve.MAX_BODY_BYTES).
MAX_STOP_STRINGS = 4            # as OpenAI
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
MAX_TEMPERATURE = 2.0           # as OpenAI
MAX_SEED = 2**63 - 1
MAX_N = 128                     # as OpenAI
MAX_PROMPTS = 256               # prompts in one /v1/completions request
MAX_LOGIT_BIAS = 1024           # entries
MAX_TOOLS = 128                 # as OpenAI
MAX_TOP_LOGPROBS = 20           # as OpenAI (chat); /v1/completions' logprobs takes the same range, as vLLM
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # as OpenAI
ROLES = {"system", "developer", "user", "assistant", "tool"}

COMMON_KEYS = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
               "stream", "stream_options", "presence_penalty", "frequency_penalty", "logit_bias",
               "user",  # user: an end-user id for the provider's abuse monitoring; nothing to do locally
               "speculate"}  # layerpack's extension: false opts this request out of speculative decoding
CHAT_KEYS = COMMON_KEYS | {"messages", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
                           "parallel_tool_calls"}
COMPLETION_KEYS = COMMON_KEYS | {"prompt", "echo", "logprobs", "best_of", "suffix"}


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
    """What the engine needs from a chat or completion request (prompts still as text / messages)."""
    messages: list[dict] | None = None     # chat, in the chat template's form
    prompts: list[str | list[int]] = field(default_factory=list)  # completions: one or more
    n: int = 1                             # choices per prompt
    max_tokens: int | None = None          # None: up to the context
    temperature: float = 1.0               # OpenAI's default
    top_p: float = 1.0
    top_k: int = 0                         # vLLM's extension; 0 (or -1): off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None            # None: off; k: the chosen token's and the k most likely
    echo: bool = False                     # completions: the prompt before the completion
    json_schema: dict | None = None        # response_format json_object ({"type": "object"}) / json_schema
    tools: list[dict] | None = None        # passed to the chat template (tool_choice "none": None)
    tool_choice: str | dict = "auto"       # "auto" | "required" | {"name": ...}
    parallel_tool_calls: bool = True
    speculate: bool = True                 # false: this request never verifies token trees (serve --speculate/--draft)


def _check_keys(body: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]!r} ({where} takes: "
                            f"{', '.join(sorted(allowed))})", param=unknown[0])


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


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
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


def _logit_bias(body: dict) -> dict[int, float]:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids -> bias",
                       param="logit_bias")
    out = {}
    for k, b in v.items():
        if not (isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 9):
            raise ApiError(400, f"'logit_bias' keys are token ids, not {k[:40]!r}", param="logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise ApiError(400, f"'logit_bias' values must be numbers in [-100, 100], not {b!r}", param="logit_bias")
        out[int(k)] = float(b)
    return out


def _common(body: Any, served_model: str, context: int, keys: set[str], where: str) -> GenerationRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (see GET /v1/models)", param="model")
    if model != served_model:
        raise ApiError(404, f"The model '{model[:200]}' does not exist; this server serves '{served_model}'",
                       param="model", code="model_not_found")
    _check_keys(body, keys, where)
    r = GenerationRequest()
    r.n = _int(body, "n", 1, MAX_N) or 1
    limit = body.get("max_completion_tokens")
    r.max_tokens = _int(body, "max_completion_tokens" if limit is not None else "max_tokens", 1, context)
    r.temperature = _number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
    r.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", -1, 1 << 31)
    r.top_k = 0 if top_k in (None, -1) else top_k
    r.presence_penalty = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    r.frequency_penalty = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    r.logit_bias = _logit_bias(body)
    r.stop = _stop(body)
    r.seed = _int(body, "seed", -MAX_SEED, MAX_SEED)
    r.stream = _bool(body, "stream")
    r.speculate = _bool(body, "speculate", True)
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "'user' must be a string", param="user")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        _check_keys(opts, {"include_usage"}, "stream_options")
        r.include_usage = _bool(opts, "include_usage")
    return r


# -- chat -------------------------------------------------------------------------------------

def _text_content(content: Any, where: str) -> str:
    if isinstance(content, list):  # content parts: only text is understood
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{where}: only text parts are supported", param=where)
        return "".join(p["text"] for p in content)
    if content is None:
        return ""
    if not isinstance(content, str):
        raise ApiError(400, f"{where} must be a string", param=where)
    return content


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """An assistant message's tool_calls -> the chat template's form (arguments as a dict, as
    transformers' templates expect; a string that is not JSON stays a string)."""
    import json
    if not isinstance(calls, list):
        raise ApiError(400, f"{where} must be a list", param=where)
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments", ""), str):
            raise ApiError(400, f"{where}[{j}] must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}",
                           param=f"{where}[{j}]")
        try:
            args = json.loads(f.get("arguments") or "{}")
        except ValueError:
            args = f.get("arguments")
        out.append({"id": c.get("id") if isinstance(c.get("id"), str) else f"call_{j}", "type": "function",
                    "function": {"name": f["name"], "arguments": args}})
    return out


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"at most {MAX_MESSAGES} messages", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"{where} must be an object with a 'role'", param=where)
        role = m["role"]
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(sorted(ROLES))}, not {role[:40]!r}",
                           param=f"{where}.role")
        msg = {"role": "system" if role == "developer" else role,  # developer: OpenAI's new name for system
               "content": _text_content(m.get("content"), f"{where}.content")}
        for name in ("name", "tool_call_id"):
            if m.get(name) is not None:
                if not isinstance(m[name], str):
                    raise ApiError(400, f"{where}.{name} must be a string", param=f"{where}.{name}")
                msg[name] = m[name]
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise ApiError(400, f"{where}: only assistant messages carry tool_calls", param=f"{where}.tool_calls")
            msg["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
        out.append(msg)
    return out


def _response_format(body: dict) -> dict | None:
    v = body.get("response_format")
    if v is None:
        return None
    kind = v.get("type") if isinstance(v, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = v.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name", ""), str):
            raise ApiError(400, "'response_format.json_schema' must be an object with 'name' and 'schema'",
                           param="response_format")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema object",
                           param="response_format")
        return schema
    raise ApiError(400, "'response_format.type' must be 'text', 'json_object' or 'json_schema'", param="response_format")


def _tools(body: dict, r: GenerationRequest) -> None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return
    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise ApiError(400, f"'tools' must be a list of 1 to {MAX_TOOLS} tools", param="tools")
    names = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not TOOL_NAME.fullmatch(f["name"]):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name' (a-z, A-Z, 0-9, _ and -, "
                                f"at most 64), 'description', 'parameters'}}}}", param=f"tools[{i}]")
        if not isinstance(f.get("parameters", {}), dict) or not isinstance(f.get("description", ""), str):
            raise ApiError(400, f"tools[{i}].function: 'parameters' must be a JSON schema object, 'description' a string",
                           param=f"tools[{i}]")
        names.append(f["name"])
    r.parallel_tool_calls = _bool(body, "parallel_tool_calls", True)
    if choice is None or choice == "auto":
        r.tool_choice = "auto"
    elif choice == "none":
        return  # the model is not told about the tools and nothing is parsed as a call
    elif choice == "required":
        r.tool_choice = "required"
    elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
          and choice["function"].get("name") in names):
        r.tool_choice = {"name": choice["function"]["name"]}
    else:
        raise ApiError(400, "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                            "{'name': one of the tools}}", param="tool_choice")
    r.tools = [{"type": "function", "function": t["function"]} for t in tools]


def parse_chat(body: Any, served_model: str, context: int) -> GenerationRequest:
    r = _common(body, served_model, context, CHAT_KEYS, "/v1/chat/completions")
    r.messages = _messages(body)
    if _bool(body, "logprobs"):
        r.logprobs = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    elif body.get("top_logprobs") is not None:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    r.json_schema = _response_format(body)
    _tools(body, r)
    if r.json_schema is not None and r.tools is not None and r.tool_choice != "auto":
        raise ApiError(400, "'response_format' and a forced 'tool_choice' both constrain the output; send one",
                       param="response_format")
    return r


# -- completions ------------------------------------------------------------------------------

def _is_ids(p: Any) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def parse_completion(body: Any, served_model: str, context: int) -> GenerationRequest:
    r = _common(body, served_model, context, COMPLETION_KEYS, "/v1/completions")
    p = body.get("prompt")
    if isinstance(p, str) or _is_ids(p):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or _is_ids(x) for x in p):
        prompts = p
    else:
        prompts = None
    if not prompts or any(x == "" for x in prompts):
        raise ApiError(400, "'prompt' must be a non-empty string, a list of token ids, or a list of either", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts in one request", param="prompt")
    r.prompts = [x if isinstance(x, str) else list(x) for x in prompts]
    r.logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    r.echo = _bool(body, "echo")
    best_of = _int(body, "best_of", 1, MAX_N)
    if best_of not in (None, r.n):
        raise ApiError(400, "'best_of' other than n is not supported (it would rank candidates by logprob: ask for "
                            "n choices with logprobs and rank them yourself)", param="best_of")
    if body.get("suffix"):
        raise ApiError(400, "'suffix' (insertion) is not supported: the served model has no fill-in-the-middle mode",
                       param="suffix")
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        r.max_tokens = min(16, context)  # OpenAI's default for completions
    return r
