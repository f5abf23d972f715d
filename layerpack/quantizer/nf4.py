"""The converter's NF4 encoder: the nearest NF4 code of values already scaled into [-1, 1], exactly
as bitsandbytes.functional.quantize_4bit(quant_type="nf4") picks it - the code whose interval (split
at the fp32 midpoints of the sorted code book) holds the value, ties going down as torch.bucketize
does - by a 64K-entry table lookup instead of a binary search (what makes >= 200 MB/s of bf16
input possible on 2 cores). The code book itself is the format's (layerpack_runtime.format.NF4_CODE)."""
from __future__ import annotations

import numpy as np

from layerpack_runtime.format import NF4_CODE

NF4_VALUES = np.asarray(NF4_CODE, dtype=np.float32)   # code -> value (the runtime's dequantization table)
NF4_ZERO_CODE = np.uint8(NF4_CODE.index(0.0))          # what bitsandbytes pads an odd count with


class Nf4Encoder:
    """Exact nearest-NF4-code search by table lookup. [-1, 1] is cut into 2^16 - 1 equal cells,
    indexed by a uint16 (no clamping pass: 1.0 lands in the last cell); a cell (or its neighbour)
    that contains one of the 15 decision boundaries is marked 255 and its values are resolved by an
    exact searchsorted; every other cell maps to one code. Marking neighbours too makes the result
    exact even if float rounding puts a value into the adjacent cell."""

    CELLS = (1 << 16) - 1

    def __init__(self):
        code = NF4_VALUES
        self.bounds = (code[:-1] + code[1:]) / np.float32(2)  # fp32 midpoints, as bitsandbytes computes them
        b64 = self.bounds.astype(np.float64)
        edges = -1.0 + np.arange(self.CELLS + 2, dtype=np.float64) * (2.0 / self.CELLS)
        below_lo = np.searchsorted(b64, edges[:-1], side="left")   # boundaries < cell start
        below_hi = np.searchsorted(b64, edges[1:], side="left")    # boundaries < cell end
        straddle = below_hi != below_lo
        marked = straddle | np.roll(straddle, 1) | np.roll(straddle, -1)
        self.table = np.where(marked, 255, below_lo).astype(np.uint8)  # CELLS + 1 entries: x = 1.0 has its own
        # cell -> code value (NaN: a marked cell), for values() - one lookup where codes() + NF4_VALUES take two
        self.value_table = np.where(marked, np.float32(np.nan), code[np.minimum(below_lo, code.size - 1)]).astype(np.float32)
        self.scale = np.float32(self.CELLS / 2)

    def codes(self, scaled: np.ndarray) -> np.ndarray:
        """scaled: float32 in [-1, 1] -> uint8 codes, identical to bucketize(scaled, bounds, right=False)."""
        cell = ((scaled + np.float32(1.0)) * self.scale).astype(np.uint16)
        q = np.take(self.table, cell)
        hard = np.flatnonzero(q == 255)
        if hard.size:
            q[hard] = np.searchsorted(self.bounds, scaled[hard], side="left")
        return q

    def values(self, scaled: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """scaled: float32 in [-1, 1] -> the code values NF4_VALUES[codes(scaled)], by one lookup (the
        calibrated scale search encodes several times and needs only the values until it is done;
        codes() of these values then gives their codes: a code value lies in no marked cell).
        out: a float32 array of scaled's size to write them into (not scaled itself)."""
        out = np.empty_like(scaled) if out is None else out
        np.multiply(np.add(scaled, np.float32(1.0), out=out), self.scale, out=out)  # (scaled + 1) * scale, as codes()
        np.take(self.value_table, out.astype(np.uint16), out=out, mode="clip")  # indices are in range: no bounds pass
        hard = np.flatnonzero(np.isnan(out))
        if hard.size:
            out[hard] = NF4_VALUES[np.searchsorted(self.bounds, scaled[hard], side="left")]
        return out


NF4_ENCODER = Nf4Encoder()  # read-only tables (64 KB of codes, 256 KB of values), shared by every thread
