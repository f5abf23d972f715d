"""Quality of a pack: perplexity on a text, and agreement with a reference model (mean KL divergence
of the next-token distributions, top-1 agreement). Pure torch over LayeredModel.forward, so
`layerpack-llm-runtime` users get it without the toolkit.

Sliding window, fixed stride (the Hugging Face "perplexity of fixed-length models" recipe): the
token ids are cut into windows of `window` tokens starting every `stride` tokens; each window is
one cache-free forward, and only the tokens no earlier window scored are scored in it, so every
token from the second one on is scored exactly once, the first window's with the context the
window gives them, the later ones with at least `window - stride` tokens of context. The first
token has no context and is never scored. KL and top-1 are taken at exactly the scored positions
(the distribution that predicts each scored token), so the three figures cover the same tokens.

    perplexity = exp(sum of -log p(token | context) / scored tokens)
    KL         = mean over scored positions of sum_v p_ref(v) (log p_ref(v) - log p(v))   [nats]
    top-1      = fraction of scored positions where argmax p == argmax p_ref
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .errors import LayerpackError

DEFAULT_WINDOW = 512
DEFAULT_STRIDE = 256
DEFAULT_MAX_TOKENS = 4096
# The default text: the documentation topics that ship with every CPython (pydoc_data.topics), keys
# sorted, joined by blank lines, the first DEFAULT_TEXT_CHARS characters. No download, same bytes
# for the same Python minor version (the id records it).
DEFAULT_TEXT_CHARS = 20_000


def default_text(chars: int = DEFAULT_TEXT_CHARS) -> tuple[str, str]:
    """(text, id) of the default evaluation text."""
    import platform

    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[:chars]
    py = ".".join(platform.python_version_tuple()[:2])
    return text, f"pydoc_data.topics (Python {py}; sorted keys joined by blank lines; first {chars} characters)"


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target) of each window over n token ids: the forward sees ids
    [begin, end) and scores targets [first, end), each predicted by the logits one position before."""
    # stride < window: each window then starts before the first token it scores, so that token's
    # prediction (one position earlier) is inside the window and no token is skipped.
    if window < 2 or not 1 <= stride < window:
        raise LayerpackError(f"need window >= 2 and 1 <= stride < window (got window {window}, stride {stride})")
    out, prev_end, begin = [], 1, 0
    while prev_end < n:
        end = min(begin + window, n)
        out.append((begin, end, prev_end))
        prev_end, begin = end, begin + stride
    return out


@dataclass
class EvalResult:
    tokens: int                     # scored tokens
    window: int
    stride: int
    nll: float                      # mean negative log-likelihood (nats/token)
    perplexity: float
    kl: float | None = None         # mean KL(reference || model), nats
    top1_agreement: float | None = None
    reference_perplexity: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _window_logprobs(model, ids: torch.Tensor, first: int, begin: int, end: int) -> torch.Tensor:
    """float32 log-probabilities [end - first, vocab] of the distributions predicting targets [first, end)."""
    logits = model.forward(ids[begin:end][None])[0]
    return torch.log_softmax(logits[first - 1 - begin: end - 1 - begin].float(), dim=-1)


@torch.inference_mode()
def evaluate(model, ids, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE, reference=None,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    """Perplexity of `model` (a LayeredModel, or anything with the same `forward`) on token ids, and
    with `reference` (same vocabulary), the KL divergence and top-1 agreement against it.
    progress: called with the number of tokens scored after each window."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1).cpu()
    if ids.numel() < 2:
        raise LayerpackError(f"the evaluation text has {ids.numel()} token(s); at least 2 are needed")
    limit = getattr(getattr(model, "args", None), "max_position_embeddings", 0)
    if limit and window > limit:
        raise LayerpackError(f"window {window} is longer than the model's context ({limit} positions)")
    vocab = getattr(getattr(model, "args", None), "vocab_size", None)
    if reference is not None and vocab is not None and getattr(reference.args, "vocab_size", vocab) != vocab:
        raise LayerpackError(f"the reference's vocabulary ({reference.args.vocab_size}) differs from the model's ({vocab}); "
                             "compare packs of the same model")
    for m in (model, reference):  # scoring is all prefill: dequantized forms where memory allows
        if hasattr(m, "prefer_dequantized"):
            m.prefer_dequantized()
    nll = ref_nll = kl = 0.0
    agree = count = 0
    for begin, end, first in windows(ids.numel(), window, stride):
        target = ids[first:end].to(getattr(model, "device", "cpu"))
        lp = _window_logprobs(model, ids, first, begin, end)
        nll -= lp.gather(1, target[:, None]).sum().item()
        if reference is not None:
            rp = _window_logprobs(reference, ids, first, begin, end).to(lp.device)
            ref_nll -= rp.gather(1, target[:, None]).sum().item()
            # float64 accumulation per window: the per-position KLs are tiny positive numbers.
            kl += (rp.exp() * (rp - lp)).sum(dim=-1).double().sum().item()
            agree += int((rp.argmax(-1) == lp.argmax(-1)).sum())
            del rp
        count += end - first
        del lp
        if progress:
            progress(end - first)
    res = EvalResult(tokens=count, window=window, stride=stride, nll=nll / count, perplexity=math.exp(nll / count))
    if reference is not None:
        res.kl = max(kl / count, 0.0)  # rounding can leave -1e-9 for identical models
        res.top1_agreement = agree / count
        res.reference_perplexity = math.exp(ref_nll / count)
    return res


def encode_text(model, text: str, max_tokens: int | None = DEFAULT_MAX_TOKENS) -> list[int]:
    """The pack's tokenizer on `text` (with its special tokens, e.g. BOS), cut to max_tokens."""
    ids = model.tokenizer.encode(text)
    return ids[:max_tokens] if max_tokens else ids
