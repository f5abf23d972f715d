"""The one order in which outlier candidates are ranked, and the candidates of the row and
block-gain rules. Every selection - whole tensor, window by window, activation-weighted - ranks
(primary, secondary, flat index) triples the same way: primary descending, then secondary
descending, then lowest index (stable sorts, least significant key first), so the choice is
deterministic and the windowed selection keeps exactly the set the whole-tensor one does."""
from __future__ import annotations

import torch

BLOCK_GAIN_DEPTH = 4    # candidates per quantization block under block-gain (more if k needs them)


def rank_order(primary: torch.Tensor, secondary: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts the candidates best first."""
    order = torch.argsort(idx, stable=True)
    order = order[torch.argsort(secondary[order], descending=True, stable=True)]
    return order[torch.argsort(primary[order], descending=True, stable=True)]


def take_ranked(primary: torch.Tensor, secondary: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending flat indices of the k best candidates."""
    return torch.sort(idx[rank_order(primary, secondary, idx)[:k]]).values


def row_share(k: int, rows: int, cols: int) -> int:
    """Candidates per row under the row rule: every row's equal share of k (at most its length)."""
    return min(cols, -(-k // rows))


def row_candidates(scores: torch.Tensor, r: int, first_row: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [rows, cols] (|w|, or activation-weighted scores) of rows first_row.. -> the r best of
    every row as (primary, secondary, flat index): primary -rank within the row (every row's best
    first, then every row's second, ...: rows get equal shares), secondary the score."""
    val, col = torch.topk(scores, r, dim=1, sorted=True)
    rank = torch.arange(r).expand_as(val)
    idx = (torch.arange(first_row, first_row + val.shape[0])[:, None] * scores.shape[1] + col).reshape(-1)
    return -rank.reshape(-1).float(), val.reshape(-1), idx


def block_gain_depth(k: int, n: int, block_size: int) -> int:
    """Candidates per block under block-gain: BLOCK_GAIN_DEPTH, deeper only when k needs it."""
    nb = -(-n // block_size)
    return min(block_size - 1, max(BLOCK_GAIN_DEPTH, -(-k // nb) + 1))


def block_gain_candidates(flat: torch.Tensor, block_size: int, depth: int, offset: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates of whole blocks of `flat` (elements offset.. of the tensor; a short last block is
    padded with zeros) under block-gain, greedy on the error saved. A block's quantization error
    scales with its absmax squared (every code is a fraction of it), so taking out its j largest
    entries saves about block_size * (m0^2 - m_j^2) (m: the block's sorted magnitudes). Each block's
    top `depth` entries are valued by the average saving of the prefix they complete, made
    non-increasing along the block (a deeper entry is only worth taking after the ones above it).
    Returns (value, |w|, flat index)."""
    m = flat.numel()
    nb = -(-m // block_size)
    mag = torch.zeros(nb * block_size)
    mag[:m] = flat.float().abs()
    top, pos = torch.topk(mag.view(nb, block_size), depth + 1, dim=1, sorted=True)
    sq = top.double() ** 2
    saved = (sq[:, :1] - sq[:, 1:]) / torch.arange(1, depth + 1, dtype=torch.float64)  # average saving of prefix j
    value = torch.cummin(saved, dim=1).values.reshape(-1)
    idx = (torch.arange(nb)[:, None] * block_size + pos[:, :depth]).reshape(-1)
    ok = idx < m
    return value[ok], top[:, :depth].reshape(-1)[ok], idx[ok] + offset
