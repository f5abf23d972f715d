"""Loading a draft pack for speculative decoding (speculative.py): resident, checked against the
target's tokenizer, its workload declared at load (drafts.draft_workload: planned once, for the
run's prompt + new tokens + tree, or a server slot), and for `run --draft` / `serve --draft`
counted inside the target's --max-memory. Apart from speculative.py because it loads packs
(loader imports text, which reaches speculative.py)."""
from __future__ import annotations

from typing import Callable

from .budget import fmt_size, parse_size
from .errors import LayerpackError
from .loader import LayeredModel, load, open_pack
from .options import Workload, run_options
from .speculative import check_draft
from .text import encode_prompt
from .tokenizer import PackTokenizer


def open_draft(path, max_memory, workload: Workload | Callable[[int], Workload], *, prompt=None, chat: bool = False,
               device="cpu", dtype=None, threads=None, revision=None, token=None):
    """`run --draft` / `serve --draft`: load the draft pack resident, its memory planned once for
    `workload` (or, with `prompt`, for `workload(prompt's token count)`: the prompt is tokenized with
    the draft's tokenizer, which check_draft later requires to be the target's), and return it with
    what is left of `max_memory` for the target (the draft's weights, KV cache and activations are
    counted inside the budget; torch's working memory once, by the target's plan). No path:
    (None, max_memory)."""
    if not path:
        return None, max_memory
    opts = run_options(device=device, dtype=dtype, threads=threads)
    pack = open_pack(path, revision=revision, token=token)
    try:
        if prompt is not None:
            ids = encode_prompt(lambda: PackTokenizer(pack.path, pack.manifest.architecture), prompt, chat)
            workload = workload(max(1, len(ids)))
        draft = LayeredModel(pack, opts.with_(workload=workload))
    except BaseException:
        pack.close()
        raise
    budget = parse_size(max_memory)
    if budget is None:
        return draft, None
    own = draft.plan.total - draft.plan.runtime_bytes
    if own >= budget:
        draft.close()
        raise LayerpackError(f"the draft takes {fmt_size(own)}, all of --max-memory {fmt_size(budget)}; give more memory or a smaller draft")
    return draft, budget - own


def load_draft(path, target, device=None, dtype=None, **kwargs):
    """Load a draft pack resident (on the target's device) and check it against the target."""
    draft = load(path, device=device or target.device, dtype=dtype, **kwargs)
    try:
        check_draft(target, draft)
    except BaseException:
        draft.close()
        raise
    return draft


def describe_draft(draft) -> str:
    """The draft's part of the memory plan, for --stats and serve's banner."""
    own = draft.plan.total - draft.plan.runtime_bytes
    return f"{fmt_size(own)} resident inside --max-memory ({draft.plan.describe()}; workload: {draft.workload.describe()})"
