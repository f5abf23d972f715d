"""Structured output for `layerpack serve` (response_format json_object / json_schema, tool_choice
"required" or a named function): constrained decoding with llguidance.

Why llguidance (2026-12-04, all three install from PyPI on CPU with `pip download --no-deps`):
llguidance 1.9.1 is one 3 MB abi3 wheel with no Python dependencies, builds its token trie straight
from the pack's tokenizer.json, takes JSON schemas and Lark grammars (forced tool calls) directly,
and computes each step's mask lazily. xgrammar 0.2.9 requires transformers, triton and
apache-tvm-ffi. outlines-core 0.2.14 is dependency-free too but compiles a regex index over the
whole vocabulary per schema before the first token. Measured on SmolLM2's 49k vocabulary (2 cores,
load 11): outlines-core index 0.03 s for a small enum/boolean schema but 18.8 s for json_object's
{"type": "object"}; llguidance 1.4 s for the tokenizer once per server (0.4 s on a quiet machine),
then <= 10 ms per request for matcher + first mask and ~11 us per later mask. It is the optional
`structured` extra; without it such requests get a clear 400.

A Grammar object is the runtime's request_sampling.Constraint: `allowed` is the mask of the next
tokens (EOS only once the text is complete), `advance` feeds the chosen token to the matcher.
"""
from __future__ import annotations

import json
import threading

import torch

from layerpack_runtime.errors import LayerpackError

MAX_SCHEMA_BYTES = 64 * 1024
# JSON as json.dumps writes it: without this, any run of whitespace is valid JSON, and a weak model
# can spend its whole max_tokens on newlines inside the object.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredUnavailable(LayerpackError):
    """llguidance is not installed."""


def _llguidance():
    try:
        import llguidance  # (not llguidance.torch: its torch.compile decorator costs seconds at import)
    except ImportError:
        raise StructuredUnavailable("structured output (response_format json_object / json_schema, tool_choice "
                                    "'required' or a named function) needs llguidance: pip install 'layerpack-llm[structured]'") from None
    return llguidance


class GrammarFactory:
    """One per served model: the llguidance tokenizer (built once, ~1 s for a large vocabulary) and
    a matcher per request."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int]):
        self.path, self.vocab_size, self.eos_ids = tokenizer_json, vocab_size, list(eos_ids)
        self._tok = None
        self._lock = threading.Lock()

    def _tokenizer(self):
        llg = _llguidance()
        with self._lock:
            if self._tok is None:
                with open(self.path, encoding="utf-8") as f:
                    text = f.read()
                self._tok = llg.LLTokenizer(text, n_vocab=self.vocab_size, eos_token=self.eos_ids or None)
            return self._tok

    def json_object(self) -> "Grammar":
        return self.json_schema({"type": "object"})

    def json_schema(self, schema: dict) -> "Grammar":
        if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
            raise LayerpackError(f"the JSON schema exceeds {MAX_SCHEMA_BYTES} bytes")
        try:
            grammar = _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
        except (ValueError, TypeError) as e:
            raise LayerpackError(f"invalid JSON schema: {e}") from None
        return self._make(grammar)

    def lark(self, source: str) -> "Grammar":
        return self._make(_llguidance().LLMatcher.grammar_from_lark(source))

    def _make(self, grammar: str) -> "Grammar":
        llg = _llguidance()
        tok = self._tokenizer()
        error = llg.LLMatcher.validate_grammar(grammar, tok)
        if error:
            raise LayerpackError(f"cannot use this schema for constrained decoding: {error}")
        return Grammar(llg.LLMatcher(tok, grammar, log_level=0), self.vocab_size)


class Grammar:
    """A request's matcher (see the module docstring)."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)  # one bit per token
        self._shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self, vocab_size: int) -> torch.Tensor:
        if self.matcher.is_error():
            raise LayerpackError(f"constrained decoding failed: {self.matcher.get_error()}")
        self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        bits = (self._bits[:, None] >> self._shifts) & 1  # [words, 32]: bit j of word w is token 32 w + j
        mask = bits.reshape(-1)[:vocab_size].bool()
        if mask.shape[0] < vocab_size:  # a model vocabulary padded beyond the tokenizer's
            mask = torch.cat([mask, torch.zeros(vocab_size - mask.shape[0], dtype=torch.bool)])
        return mask

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise LayerpackError(f"constrained decoding failed: {self.matcher.get_error() or 'token refused'}")
