"""Quantization guided by activation statistics (convert --calibrate; the statistics come from
activation_stats.py): which entries the outlier table keeps, and which scale each block stores.

The error that matters for a linear y = W x is not ||W - Q(W)||^2 but E||(W - Q(W)) x||^2, which
(columns taken as uncorrelated, the imatrix / AWQ approximation) is sum_ij (W_ij - Q_ij)^2 E[x_j^2]:
every entry's error counts with its input column's activation energy. Three uses, each on or off:

(a) WEIGHTED outliers: the outlier budget goes, in equal shares per output row as the `row` rule
    does, to the entries with the largest W_ij^2 E[x_j^2] (their expected share of the output),
    instead of the largest |W_ij|.
(b) FEATURE columns (LLM.int8()): input columns whose activations reach FEATURE_THRESHOLD in
    magnitude are kept exactly, all their entries, as ordinary outlier-table entries - at most
    FEATURE_SHARE of the outlier budget, the columns with the largest E[x_j^2] first.
(c) SCALE search: each block's stored scale (the `absmax` field; bitsandbytes multiplies the code
    values by it, so any positive scale dequantizes correctly) minimizes the block's weighted error
    sum_j E[x_j^2] (x_j - s q_j(s))^2 instead of being the block's max |x|: Lloyd iterations from
    s = max |x| (nearest codes for s; then the weighted least-squares s for those codes), keeping
    a block's new scale only when its weighted error, measured with the exact encoding, is lower.
    Values beyond the scale clip to the extreme code; that is part of the error it minimizes.

Every decision is per output row (a, b: given the column statistics) or per block (c), so the
code works on row chunks of a weight as well as on whole tensors. Outlier positions stay zeroed
before quantization, so they keep the NF4 zero code / int8 0 the validator expects.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import INT8_QMAX, SCHEME_NF4

from . import windows
from .nf4 import NF4_ENCODER
from .outliers import select_outliers_by, select_outliers_stream, top_k_streamed
from .ranking import row_candidates, row_share, take_ranked

METHODS = ("weighted", "features", "scales")   # (a), (b), (c): the names --calibrate-methods takes
FEATURE_THRESHOLD = 6.0      # LLM.int8()'s outlier-feature magnitude
FEATURE_SHARE = 0.5          # at most this share of a weight's outlier budget goes to whole columns
SCALE_ITERS = 2              # Lloyd iterations of the scale search (measured: a third changes little)
IMPORTANCE_FLOOR = 0.01      # of the mean E[x^2]: columns the text never excites still count a little



@dataclass
class Calibrated:
    """What the quantizer needs from calibration for one weight [rows, cols] (flattened row-major):
    its input columns' statistics and which of the three uses are on."""
    sq_mean: torch.Tensor        # float32 [cols]: E[x_j^2]
    abs_max: torch.Tensor        # float32 [cols]: max |x_j|
    methods: tuple[str, ...] = METHODS

    def __post_init__(self):
        s = self.sq_mean.double()
        self.importance = (s + IMPORTANCE_FLOOR * s.mean().clamp(min=1e-30)).float()

    @property
    def cols(self) -> int:
        return self.sq_mean.numel()

    def element_importance(self, s: int, e: int) -> torch.Tensor:
        """E[x^2] (with the floor) of the input column of each flat position in [s, e)."""
        return self.importance[torch.arange(s, e) % self.cols]

    def block_importance(self, s: int, e: int, block_size: int) -> torch.Tensor:
        """element_importance(s, e) as [blocks, block_size] (or [1, e - s] for a short tail block).
        When blocks tile the rows (cols a multiple of block_size, s a block start), block i holds the
        importance of column group (s / block_size + i) mod (cols / block_size): rows of a
        [groups, block_size] view are gathered, block_size times fewer indices than one per element."""
        cols = self.cols
        if cols % block_size or s % block_size or (e - s) % block_size:
            n = e - s
            return self.element_importance(s, e).view(-1, block_size if n % block_size == 0 else n)
        groups = cols // block_size
        rows = torch.arange(s // block_size, e // block_size) % groups
        return self.importance.view(groups, block_size).index_select(0, rows)


def feature_columns(cal: Calibrated, rows: int, k: int) -> torch.Tensor:
    """(b): ascending input columns kept whole: activations reaching FEATURE_THRESHOLD, the
    largest E[x^2] first, as many as FEATURE_SHARE of the budget k pays for."""
    limit = int(FEATURE_SHARE * k) // max(rows, 1)
    hot = torch.nonzero(cal.abs_max >= FEATURE_THRESHOLD).view(-1)
    if limit <= 0 or hot.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    order = torch.argsort(cal.sq_mean[hot], descending=True, stable=True)
    return torch.sort(hot[order[:limit]]).values


def select_stream(src, k: int, cal: Calibrated, rule: str, block_size: int) -> torch.Tensor:
    """select() on a 2-D weight read window by window (whole rows per window), for tensors larger
    than one window: the same set. Every choice is per row given the column statistics, so each
    window's row candidates, ranked in ranking.rank_order's one order, give the k the whole tensor
    gives (tests/test_convert_scale.py); memory is one window plus O(k) candidates."""
    rows, cols = src.shape[0], src.shape[1]
    n = rows * cols
    if n <= windows.WINDOW_ELEMS:  # that very function on the whole tensor
        return select(src.read(0, n).reshape(rows, cols), k, cal, lambda w_, k_: select_outliers_by(rule, w_, k_, block_size))
    feat = feature_columns(cal, rows, k) if "features" in cal.methods else torch.empty(0, dtype=torch.long)
    taken = (torch.arange(rows)[:, None] * cols + feat[None, :]).reshape(-1)
    rest = k - taken.numel()
    if rest <= 0:
        return torch.sort(taken).values
    weighted = "weighted" in cal.methods
    if not weighted and not feat.numel():
        more = select_outliers_stream(rule, src, rest, block_size)
    else:
        r = row_share(rest, rows, cols)
        per = max(1, windows.WINDOW_ELEMS // cols)
        pieces = [(s * cols, min(s + per, rows) * cols) for s in range(0, rows, per)]

        def candidates(s: int, w: torch.Tensor):
            w2 = w.view(-1, cols).float()
            score = w2.square() * cal.importance[None, :] if weighted else w2.abs()
            if feat.numel():
                score[:, feat] = -1.0
            primary, val, idx = row_candidates(score, r, s // cols)
            ok = val >= 0
            return primary[ok], val[ok], idx[ok]

        more = top_k_streamed(src, pieces, candidates, rest)
    return torch.sort(torch.cat([taken, more])).values


def select(w: torch.Tensor, k: int, cal: Calibrated, fallback) -> torch.Tensor:
    """Ascending flat indices of the k entries of w [rows, cols] kept exactly: feature columns (b)
    if on, then the rest of the budget by activation-weighted magnitude (a) or by `fallback(w, k)`
    (the converter's uncalibrated rule)."""
    rows = w.shape[0]
    w2 = w.reshape(rows, -1)
    cols = torch.empty(0, dtype=torch.long)
    if "features" in cal.methods:
        cols = feature_columns(cal, rows, k)
    taken = (torch.arange(rows)[:, None] * w2.shape[1] + cols[None, :]).reshape(-1)
    rest = k - taken.numel()
    if rest <= 0:
        return torch.sort(taken).values
    if "weighted" in cal.methods:
        score = w2.float().square() * cal.importance[None, :]
    else:
        score = None
    if cols.numel():  # the rest is chosen among the other columns
        masked = (score if score is not None else w2.float().abs()).clone()
        masked[:, cols] = -1.0
        score = masked
    if score is None:
        more = fallback(w, rest)
    else:
        more = _select_row_scores(score, rest)
    return torch.sort(torch.cat([taken, more])).values


def _select_row_scores(score: torch.Tensor, k: int) -> torch.Tensor:
    """The row rule (outliers.OUTLIER_ROW) on scores (>= 0; taken entries -1) instead of |w|:
    every row's best entry first (best of those first), then every row's second, ..."""
    rows, cols = score.shape
    primary, val, idx = row_candidates(score, row_share(k, rows, cols))
    ok = val >= 0
    return take_ranked(primary[ok], val[ok], idx[ok], k)


# -- (c) scale search ---------------------------------------------------------------------------

def encode(scaled: torch.Tensor, scheme: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """scaled [blocks, b] fp32 in [-1, 1] -> the code values (in [-1, 1]) the pack stores for them:
    NF4 by the converter's exact encoder (nf4.py), int8 rounded to 1/INT8_QMAX steps. out: a
    contiguous fp32 tensor of scaled's shape to write them into (not scaled)."""
    out = torch.empty_like(scaled) if out is None else out
    if scheme == SCHEME_NF4:
        NF4_ENCODER.values(scaled.reshape(-1).numpy(), out.view(-1).numpy())
        return out
    return torch.mul(scaled, INT8_QMAX, out=out).round_().div_(INT8_QMAX)


def stored_codes(values: torch.Tensor, scheme: str):
    """Code values (encode()'s) -> what the pack stores: NF4 code indices (numpy uint8, one per
    value, not yet two per byte), int8 codes (torch int8). Exact: a code value maps to its own code."""
    if scheme == SCHEME_NF4:
        return NF4_ENCODER.codes(values.reshape(-1).numpy())
    return torch.round(values * INT8_QMAX).to(torch.int8)


def scale_into_range(x: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [blocks, b] / scale [blocks], clamped to [-1, 1]: what is encoded (blocks.block_stats' formula)."""
    return torch.mul(x, (1.0 / scale.clamp(min=1e-38)).view(-1, 1), out=out).clamp_(-1, 1)


def code_values(x: torch.Tensor, scale: torch.Tensor, scheme: str) -> torch.Tensor:
    """x [blocks, b] fp32, scale [blocks]: the code values (in [-1, 1]) the pack stores for x with
    that scale - the same encoding as blocks.quantize_chunk; times the scale, what the runtime
    reconstructs."""
    return encode(scale_into_range(x, scale), scheme)


def choose_scales(x: torch.Tensor, absmax: torch.Tensor, scaled: torch.Tensor, wts: torch.Tensor, scheme: str) -> tuple:
    """(c) for some whole blocks (or one short tail block): x fp32 [blocks, b] (outliers zeroed),
    absmax [blocks], scaled = scale_into_range(x, absmax) (block_stats computed it already), wts
    [blocks, b] per-element importance -> (scales [blocks], stored codes (stored_codes), code values
    [blocks, b]): the codes are those of encoding x / scales afresh (the same arithmetic per element),
    so the caller stores them without encoding again.

    Cost (the search is most of what --calibrate adds to a conversion): SCALE_ITERS encodings beyond
    the one at absmax (values only: the stored codes are looked up once, at the end), each with its
    error. Every temporary lives in two buffers reused by every step (fresh multi-MB temporaries
    per operation cost more than the arithmetic); the caller passes a few thousand blocks at a time,
    so they stay in cache. Each operation is the one the formulas above name, in that order: the
    same bits as the plain expressions (tests/convert/test_calibrate.py)."""
    buf = torch.empty_like(x)
    wx = wts * x
    c = encode(scaled, scheme)
    c_new = torch.empty_like(x)
    best = absmax
    best_err = _error(x, wts, c, best, buf)
    for _ in range(SCALE_ITERS):
        num = torch.mul(wx, c, out=buf).sum(1)                # sum w x c
        den = torch.mul(wts, c, out=buf).mul_(c).sum(1)       # sum w c c
        cand = torch.where(den > 0, num / den.clamp(min=1e-38), best)
        cand = torch.where(cand > 0, cand, best)
        encode(scale_into_range(x, cand, out=buf), scheme, out=c_new)
        err = _error(x, wts, c_new, cand, buf)
        better = err < best_err
        best = torch.where(better, cand, best)
        best_err = torch.where(better, err, best_err)
        worse = torch.nonzero(~better).view(-1)  # the few blocks that keep their codes (most improve)
        if worse.numel():
            c_new.index_copy_(0, worse, c.index_select(0, worse))
        c, c_new = c_new, c
    return best, stored_codes(c, scheme), c


def _error(x: torch.Tensor, wts: torch.Tensor, c: torch.Tensor, scale: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """Per block: sum w (x - scale c)^2, the error the search minimizes, of the exact encoding (buf: workspace)."""
    torch.mul(c, scale.view(-1, 1), out=buf)
    return torch.sub(x, buf, out=buf).square_().mul_(wts).sum(1)


def parse_methods(spec: str | None) -> tuple[str, ...]:
    """'weighted,features,scales' (any subset, any order) -> the canonical tuple."""
    if spec is None:
        return METHODS
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise LayerpackError(f"--calibrate-methods takes a comma-separated subset of {', '.join(METHODS)}" + (f" (not {bad[0]!r})" if bad else ""))
    return tuple(m for m in METHODS if m in names)

