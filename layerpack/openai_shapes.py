"""The OpenAI API's response shapes for `layerpack serve`: completions and chat, whole or as
stream chunks, with logprobs in each endpoint's own format. Pure functions, no web framework."""
from __future__ import annotations

import math
import time
import uuid

# JSON has no -Infinity: a token the model gives no probability is reported as OpenAI does.
MIN_LOGPROB = -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _lp(x: float) -> float:
    return x if math.isfinite(x) and x > MIN_LOGPROB else MIN_LOGPROB


class TokenText:
    """Token id -> its text and bytes, as logprobs report them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        t = self._cache.get(token)
        if t is None:
            t = self._cache[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return t


def chat_logprobs(entries: list[tuple[int, float, list]], text: TokenText) -> dict:
    """entries: (token, logprob, [(alternative, logprob)]) -> chat's {"content": [...]}."""
    def one(tok, lp):
        s = text(tok)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8", "replace"))}
    return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in top]} for t, lp, top in entries],
            "refusal": None}


def completion_logprobs(entries: list[tuple[int, float | None, list]], text: TokenText, offset: int = 0) -> dict:
    """entries -> completions' {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; `offset`:
    characters of text before the first token."""
    tokens, offsets = [], []
    for t, _, _ in entries:
        s = text(t)
        tokens.append(s)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": [None if lp is None else _lp(lp) for _, lp, _ in entries],
            "top_logprobs": [None if lp is None else {text(a): _lp(alp) for a, alp in top} for _, lp, top in entries],
            "text_offset": offsets}


def chat_choice(index: int, message: dict, finish: str, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", **message}, "logprobs": logprobs, "finish_reason": finish}


def chat_response(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish: str | None = None, use: dict | None = None,
               index: int = 0, logprobs: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [] if use is not None else [{"index": index, "delta": delta, "logprobs": logprobs,
                                                     "finish_reason": finish}]}
    if use is not None:
        chunk["usage"] = use
    return chunk


def completion_choice(index: int, text: str, finish: str, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_response(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(rid: str, model: str, created: int, text: str, finish: str | None = None, use: dict | None = None,
                     index: int = 0, logprobs: dict | None = None) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [] if use is not None else [{"index": index, "text": text, "logprobs": logprobs,
                                                     "finish_reason": finish}]}
    if use is not None:
        chunk["usage"] = use
    return chunk


def model_card(model: str, created: int, context: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "layerpack", "max_model_len": context}


def models_list(model: str, created: int, context: int) -> dict:
    return {"object": "list", "data": [model_card(model, created, context)]}
