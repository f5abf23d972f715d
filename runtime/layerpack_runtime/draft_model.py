"""Loading a draft pack for speculative decoding (speculative.py): resident, checked against the
target's tokenizer, and for `run --draft` counted inside the target's --max-memory. Apart from
speculative.py because it loads packs (loader imports text, which reaches speculative.py)."""
from __future__ import annotations

from .budget import fmt_size, parse_size
from .errors import LayerpackError
from .loader import load
from .speculative import check_draft


def open_draft(path, max_memory, device="cpu", dtype=None, threads=None, revision=None, token=None):
    """`run --draft`: load the draft pack resident and return it with what is left of `max_memory`
    for the target (the draft's weights, KV cache and activations are counted inside the budget;
    torch's working memory once, by the target's plan). No path: (None, max_memory)."""
    if not path:
        return None, max_memory
    draft = load(path, device=device, dtype=dtype, threads=threads, revision=revision, token=token)
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
