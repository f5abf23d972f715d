"""Text generation on top of a model's forward pass: prompts -> token ids (tokenizer, chat
template), the generation loop's tokens -> text (EOS, stop strings, streaming), for one prompt or
a batch.

`TextGenerator` is mixed into anything that runs a whole pack - loader.LayeredModel in one
process, stages.Pipeline across stage processes. What it needs from them (the runner interface,
shared with engine.Engine): `pack`, `args`, `device`, `new_cache(batch, max_len, step_tokens)`,
`forward(ids, cache=, attention_mask=, last_only=)` returning float32 logits, and optionally
`bytes_read` / `io_wait_s` for the statistics; the generation loop itself is generate.generate_tokens.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import torch

from .errors import LayerpackError
from .generate import GenerationStats, SamplingParams, generate_tokens
from .tokenizer import PackTokenizer, TextStream

Prompt = Any  # str | list[int] | list[dict] (a chat conversation)


class TextGenerator:
    _tokenizer: PackTokenizer | None = None
    last_stats: GenerationStats  # timings of the last generation

    def _token_loop(self, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams, pad_id: int,
                    generator: torch.Generator | None, stats: GenerationStats) -> Iterator[torch.Tensor]:
        return generate_tokens(self, prompts, max_new_tokens, params, pad_id, generator, stats)

    def _tokens(self, prompts, max_new_tokens, params, pad_id, generator, stats, spec) -> Iterator[torch.Tensor]:
        """_token_loop, or with `spec` (speculative.Speculation) the speculative loop."""
        if spec is None:
            return self._token_loop(prompts, max_new_tokens, params, pad_id, generator, stats)
        from .speculative import SpeculationStats, speculative_tokens

        self.last_speculation = SpeculationStats()
        return speculative_tokens(self, prompts, max_new_tokens, params, generator, stats, spec, self.last_speculation)

    @property
    def tokenizer(self) -> PackTokenizer:
        if self._tokenizer is None:
            self._tokenizer = PackTokenizer(self.pack.path, self.pack.manifest.architecture)
        return self._tokenizer

    @property
    def eos_ids(self) -> list[int]:
        if self._tokenizer is None and not os.path.isfile(os.path.join(self.pack.path, "tokenizer.json")):
            return list(self.args.eos_token_ids)
        return self.tokenizer.eos_ids

    def encode_prompt(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """One prompt -> token ids (see the module function encode_prompt)."""
        return encode_prompt(lambda: self.tokenizer, prompt, chat)

    def _prompts(self, prompt_or_prompts, chat: bool) -> tuple[list[list[int]], bool]:
        p = prompt_or_prompts
        single = (isinstance(p, str) or isinstance(p, torch.Tensor) and p.dim() <= 1
                  or isinstance(p, (list, tuple)) and (not p or all(isinstance(x, (int, dict)) for x in p)))
        if single:
            return [self.encode_prompt(p, chat)], True
        if isinstance(p, torch.Tensor):
            p = list(p)
        return [self.encode_prompt(x, chat) for x in p], False

    def pad_id(self) -> int:
        """The id that pads batched prompts: the pack's pad token, else its first EOS, else 0."""
        if self.args.pad_token_id is not None:
            return int(self.args.pad_token_id)
        eos = self.eos_ids
        return int(eos[0]) if eos else 0

    def _generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.device).manual_seed(int(seed))

    def generate_ids(self, prompt_or_prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int | None = None, chat: bool = False, speculate: str | None = None,
                     draft=None, draft_tokens: int | None = None) -> list[int] | list[list[int]]:
        """Like generate, but returns the new token ids (generation ends at an EOS token, which is
        not included)."""
        from .speculative import speculation

        spec = speculation(self, speculate, draft, draft_tokens)
        prompts, single = self._prompts(prompt_or_prompts, chat)
        eos = set(self.eos_ids)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        self.last_stats = GenerationStats()
        for tok in self._tokens(prompts, max_new_tokens, SamplingParams(temperature, top_k, top_p),
                                self.pad_id(), self._generator(seed), self.last_stats, spec):
            for b, t in enumerate(tok.tolist()):
                if not done[b]:
                    if t in eos:
                        done[b] = True
                    else:
                        out[b].append(t)
            if all(done):
                break
        return out[0] if single else out

    def generate(self, prompt_or_prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, stop: str | Sequence[str] | None = None, stream: bool = False, chat: bool = False,
                 seed: int | None = None, speculate: str | None = None, draft=None, draft_tokens: int | None = None):
        """Generate a continuation of a prompt (or of each prompt of a list, batched).

        prompt: a string, token ids, or a chat conversation (list of {"role", "content"} dicts);
        chat=True renders strings through the pack's chat template (needs jinja2).
        temperature 0 is greedy; > 0 samples, optionally restricted by top_k / top_p; seed makes
        sampling reproducible. Generation ends at an EOS token, at a `stop` string (not included
        in the text), or after max_new_tokens. Returns the new text (a list for a list of
        prompts); with stream=True (one prompt only), an iterator of text pieces as they become
        final. Timings of the last call: `last_stats`.
        speculate="lookup" (prompt lookup) or draft=PACK_OR_MODEL (a small pack sharing the
        tokenizer): speculative decoding, several tokens per pass of this model, same output
        distribution (speculative.py); draft_tokens: candidates per pass; `last_speculation`."""
        from .speculative import speculation

        spec = speculation(self, speculate, draft, draft_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        prompts, single = self._prompts(prompt_or_prompts, chat)
        events = self._text_events(prompts, max_new_tokens, SamplingParams(temperature, top_k, top_p), stops, seed, spec)
        if stream:
            if not single:
                raise LayerpackError("stream=True takes a single prompt")
            return (piece for _, piece in events)
        texts = [""] * len(prompts)
        for b, piece in events:
            texts[b] += piece
        return texts[0] if single else texts

    def _text_events(self, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                     stops: list[str], seed: int | None, spec=None) -> Iterator[tuple[int, str]]:
        params.check()  # before any work, also for lazily consumed streams
        tokenizer = self.tokenizer
        streams = [TextStream(tokenizer, stops) for _ in prompts]
        eos = set(tokenizer.eos_ids)
        pad = self.pad_id()
        generator = self._generator(seed)

        def run():
            done = [False] * len(prompts)
            self.last_stats = stats = GenerationStats()
            for tok in self._tokens(prompts, max_new_tokens, params, pad, generator, stats, spec):
                for b, t in enumerate(tok.tolist()):
                    if done[b]:
                        continue
                    if t in eos:
                        done[b], piece = True, streams[b].finish()
                    else:
                        piece = streams[b].push(t)
                        done[b] = streams[b].stopped
                    if piece:
                        yield b, piece
                if all(done):
                    break
            for b, s in enumerate(streams):
                if not done[b] and (piece := s.finish()):
                    yield b, piece

        return run()


def encode_prompt(tokenizer, prompt: Prompt, chat: bool = False) -> list[int]:
    """One prompt -> token ids: a string (chat=True wraps it as a user message), a chat
    conversation (list of {"role", "content"} dicts), or token ids (used as they are; no tokenizer
    needed). tokenizer: a PackTokenizer, or a function returning one (called only for text)."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.reshape(-1).tolist()
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    tok = tokenizer() if callable(tokenizer) else tokenizer
    if isinstance(prompt, str):
        if chat:
            return tok.encode_chat([{"role": "user", "content": prompt}])
        return tok.encode(prompt)
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        return tok.encode_chat(list(prompt))
    raise LayerpackError(f"a prompt is a string, a list of token ids or a chat (list of message dicts), not {type(prompt).__name__}")
