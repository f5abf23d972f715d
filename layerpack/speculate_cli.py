"""`run`'s speculative decoding options (--speculate, --draft, --draft-tokens) and what they set up,
apart from cli.py so that the command stays a thin parser (layerpack_runtime/speculative.py runs it)."""
from __future__ import annotations

from dataclasses import dataclass, field

import click

from layerpack_runtime.errors import LayerpackError

OPTIONS = (
    click.option("--speculate", type=click.Choice(["lookup"]), default=None,
                 help="Speculative decoding with candidates from prompt lookup (n-gram matches in the prompt and text so far): several tokens per pass, same output."),
    click.option("--draft", default=None, metavar="PACK_OR_REPO",
                 help="Speculative decoding with a small resident draft pack sharing the tokenizer (counted inside --max-memory)."),
    click.option("--draft-tokens", type=click.IntRange(0, 1024), default=None, metavar="N",
                 help="Candidate tokens (tree nodes) verified per pass [default: 16 with --draft, 10 with lookup]."),
)


def speculation_options(fn):
    for option in reversed(OPTIONS):
        fn = option(fn)
    return fn


@dataclass
class RunSpeculation:
    generate: dict = field(default_factory=dict)  # generate()'s keywords (empty: plain decoding)
    draft: object | None = None                   # the loaded draft model

    def echo_stats(self, model) -> None:
        if self.generate:
            click.echo(model.last_speculation.summary(), err=True)
        if self.draft is not None:
            from layerpack_runtime.draft_model import describe_draft
            click.echo(f"draft memory plan: {describe_draft(self.draft)}", err=True)


def speculation_run(spec: dict, stages: bool, max_memory, device, dtype, threads, token, prompt, chat: bool,
                    max_new_tokens: int):
    """-> (RunSpeculation, what --max-memory leaves the target, cache columns to plan beyond the
    prompt and new tokens). A draft is loaded first, resident, its workload declared from the
    run's (prompt + max_new_tokens + the tree's columns): the target plans with the rest."""
    speculate, draft, draft_tokens = spec.get("speculate"), spec.get("draft"), spec.get("draft_tokens")
    if not (speculate or draft):
        if draft_tokens is not None:
            raise LayerpackError("--draft-tokens needs --speculate lookup or --draft")
        return RunSpeculation(), max_memory, 0
    if stages:
        raise LayerpackError("--speculate is not supported with --stages yet")
    from layerpack_runtime.draft_model import open_draft
    from layerpack_runtime.drafts import draft_workload
    from layerpack_runtime.speculative import Speculation, tree_room
    from layerpack_runtime.threads import resolve_threads

    budget = Speculation(method=speculate or "draft", draft_tokens=draft_tokens).budget
    draft_model, max_memory = open_draft(draft, max_memory, lambda n: draft_workload(n + max_new_tokens, n, budget),
                                         prompt=prompt, chat=chat, device=device, dtype=dtype,
                                         threads=resolve_threads(threads, "--threads"), token=token)
    kwargs = dict(speculate=speculate, draft=draft_model, draft_tokens=draft_tokens)
    return RunSpeculation(kwargs, draft_model), max_memory, tree_room(speculate, draft_tokens)

