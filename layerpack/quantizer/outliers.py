"""Which entries of a weight the outlier table keeps exactly (convert --outliers, --outlier-rule):
k flat indices, ascending, chosen by one of OUTLIER_RULES - on a tensor in memory, or window by
window on a tensor of any size, which selects the same set (tests/convert/test_convert_scale.py)."""
from __future__ import annotations

import math

import torch

from layerpack_runtime.errors import LayerpackError

from . import parallel, windows
from .ranking import (BLOCK_GAIN_DEPTH, block_gain_candidates, block_gain_depth, rank_order, row_candidates, row_share,
                      take_ranked)
from .windows import TensorSource

# The rules' names live in the torch-free layerpack/choices.py (the CLI's --outlier-rule choices).
from ..choices import OUTLIER_BLOCK_GAIN, OUTLIER_MAGNITUDE, OUTLIER_ROW, OUTLIER_RULES  # noqa: E402, F401
SAMPLE_ELEMS = 1 << 20  # sample size for the outlier threshold estimate

__all__ = ["BLOCK_GAIN_DEPTH", "OUTLIER_BLOCK_GAIN", "OUTLIER_MAGNITUDE", "OUTLIER_ROW", "OUTLIER_RULES",
           "count", "select_outliers", "select_outliers_by", "select_outliers_stream", "top_k_streamed"]


def count(fraction: float, n: int) -> int:
    """How many of n entries an outlier fraction keeps."""
    return int(round(fraction * n)) if fraction else 0


def select_outliers(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending flat indices of the k largest |w| (ties at the threshold: lowest indices first, so
    the choice is deterministic - rank_order's order with |w| as primary key). A strided sample
    estimates a threshold that about 2k entries pass; the exact top-k is then found among those
    candidates only, not by sorting the whole tensor."""
    n = flat.numel()
    stride = max(1, n // SAMPLE_ELEMS)
    sample = flat[::stride].float().abs()
    want = min(sample.numel(), math.ceil(2 * k * sample.numel() / n) + 16)
    thr = torch.topk(sample, want, sorted=True).values[-1].item() if want < sample.numel() else 0.0
    while True:
        chunks = windows.spans(n, parallel.CHUNK_ELEMS)
        parts = list(parallel.chunk_pool().map(lambda se: _above(flat, se[0], se[1], thr), chunks))
        idx = torch.cat([p[0] for p in parts])
        mag = torch.cat([p[1] for p in parts])
        if idx.numel() >= k or thr == 0.0:
            break
        thr /= 2  # the sample under-estimated the tail (rare): widen and retry
    kth = torch.topk(mag, k, sorted=False).values.min()
    above = idx[mag > kth]
    equal = idx[mag == kth][: k - above.numel()]
    return torch.sort(torch.cat([above, equal])).values


def _above(flat: torch.Tensor, s: int, e: int, thr: float) -> tuple[torch.Tensor, torch.Tensor]:
    mag = flat[s:e].float().abs()
    hit = torch.nonzero(mag >= thr).view(-1)
    return hit + s, mag[hit]


def select_outliers_by(rule: str, w: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """Ascending flat indices of the k entries of w (in memory) kept exactly, by `rule`."""
    if rule == OUTLIER_MAGNITUDE:
        return select_outliers(w.reshape(-1), k)
    if rule == OUTLIER_ROW:
        # Per output row (dim 0; a 1-D weight is one row): rows get equal shares, so no row's scale
        # is left to one huge entry while another row keeps several.
        rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
        return take_ranked(*row_candidates(rows.float().abs(), row_share(k, *rows.shape)), k)
    if rule == OUTLIER_BLOCK_GAIN:
        flat = w.reshape(-1)
        return take_ranked(*block_gain_candidates(flat, block_size, block_gain_depth(k, flat.numel(), block_size)), k)
    raise LayerpackError(f"unknown outlier rule {rule!r} (one of {', '.join(OUTLIER_RULES)})")


def select_outliers_stream(rule: str, src: TensorSource, k: int, block_size: int) -> torch.Tensor:
    """select_outliers_by on a tensor read window by window: on a tensor that fits one window it is
    that very function; on a larger one each window's candidates are collected and the top k kept
    in rank_order's order, which selects the same set."""
    shape = list(src.shape)
    n = math.prod(shape)
    if n <= windows.WINDOW_ELEMS:
        return select_outliers_by(rule, src.read(0, n).reshape(shape), k, block_size)
    if rule == OUTLIER_ROW:
        rows = shape[0] if len(shape) > 1 else 1
        cols = n // rows
        r = row_share(k, rows, cols)
        per = max(1, windows.WINDOW_ELEMS // cols)
        pieces = [(s * cols, min(s + per, rows) * cols) for s in range(0, rows, per)]

        def candidates(s: int, w: torch.Tensor):
            return row_candidates(w.view(-1, cols).float().abs(), r, s // cols)
    elif rule == OUTLIER_MAGNITUDE:
        pieces = windows.spans(n, windows.WINDOW_ELEMS)

        def candidates(s: int, w: torch.Tensor):
            mag = w.float().abs()
            if mag.numel() > k:  # only this window's k largest (and ties) can be among the k overall
                hit = torch.nonzero(mag >= torch.topk(mag, k, sorted=False).values.min()).view(-1)
                return mag[hit], mag[hit], hit + s
            return mag, mag, torch.arange(s, s + w.numel())
    elif rule == OUTLIER_BLOCK_GAIN:
        depth = block_gain_depth(k, n, block_size)
        pieces = windows.spans(n, windows.WINDOW_ELEMS // block_size * block_size)

        def candidates(s: int, w: torch.Tensor):
            return block_gain_candidates(w, block_size, depth, s)
    else:
        raise LayerpackError(f"unknown outlier rule {rule!r} (one of {', '.join(OUTLIER_RULES)})")
    return top_k_streamed(src, pieces, candidates, k)


def top_k_streamed(src: TensorSource, pieces, candidates, k: int) -> torch.Tensor:
    """The k best candidates over all windows in rank_order's order. Candidates below the current
    k-th primary are dropped as they come, and the kept set is cut back to k whenever it exceeds
    4k, so memory is O(k + window)."""
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    total, floor = 0, None
    for s, _, w in windows.read_windows(src, pieces):
        p, sec, idx = candidates(s, w)
        if floor is not None:
            keep = p >= floor  # ties with the k-th are kept: the final order decides among them
            p, sec, idx = p[keep], sec[keep], idx[keep]
        kept.append((p, sec, idx))
        total += idx.numel()
        if total > 4 * k:
            kept = [_best(kept, k)]
            total = kept[0][2].numel()
            floor = kept[0][0].min() if total >= k else None
    p, sec, idx = _best(kept, k)
    return torch.sort(idx).values


def _best(parts, k: int):
    """The k best of the concatenated candidates, best first (float64 keys: parts mix fp32 and fp64)."""
    p = torch.cat([x[0].to(torch.float64) for x in parts])
    sec = torch.cat([x[1].to(torch.float64) for x in parts])
    idx = torch.cat([x[2] for x in parts])
    order = rank_order(p, sec, idx)[:k]
    return p[order], sec[order], idx[order]
