"""Where a token's time goes, unit by unit: bytes read, reading, waiting for reads, computing.

`layerpack run --stats` prints it, and scripts/bench_405b.py builds its projection on it: for a
model far larger than memory the question is whether a step is bound by the disk (read time not
hidden: wait > 0) or by compute, and for which units. Reads happen in the prefetch thread
(streaming.py) and overlap compute, so read_s and compute_s of one unit add up to more than its
share of the wall time; wait_s is the part of the read that was not hidden.
"""
from __future__ import annotations

import threading
import time

import torch


class UnitTimes:
    FIELDS = ("bytes", "read_s", "wait_s", "compute_s")

    def __init__(self) -> None:
        self.enabled = False  # compute timing costs a clock call per unit (two CUDA events on CUDA)
        self.device: torch.device | None = None
        self.rows: dict[str, list[float]] = {}
        self._lock = threading.Lock()  # the prefetch thread adds reads
        self._pending: list = []  # CUDA: (unit, start, end) events of computes not yet added

    def reset(self) -> None:
        self.settle()
        with self._lock:
            self.rows = {}

    def add(self, unit: str, nbytes: int = 0, read_s: float = 0.0, wait_s: float = 0.0, compute_s: float = 0.0) -> None:
        with self._lock:
            r = self.rows.setdefault(unit, [0, 0.0, 0.0, 0.0])
            r[0] += nbytes
            r[1] += read_s
            r[2] += wait_s
            r[3] += compute_s

    def start(self):
        """The clock before a unit's compute (None when timing is off). On CUDA an event recorded on
        the compute stream: no host sync inside a step (a sync would stall the copies that streaming
        overlaps with compute); the events are read by settle(), at the end."""
        if not self.enabled:
            return None
        if self._cuda():
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(self.device))
            return ev
        return time.perf_counter()

    def stop(self, unit: str, t0) -> None:
        if t0 is None:
            return
        if isinstance(t0, float):
            self.add(unit, compute_s=time.perf_counter() - t0)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        with self._lock:
            self._pending.append((unit, t0, end))
            done = []
            while len(self._pending) > 1 and self._pending[0][2].query():  # bound the list: add those done (no sync)
                done.append(self._pending.pop(0))
        for u, a, b in done:
            self.add(u, compute_s=a.elapsed_time(b) / 1e3)

    def settle(self) -> None:
        """Add the compute times still held as CUDA events (waits for them: call after a generation)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for u, a, b in pending:
            b.synchronize()
            self.add(u, compute_s=a.elapsed_time(b) / 1e3)

    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()

    def table(self, steps: int, placement: dict[str, str], max_rows: int = 12) -> str:
        """Per unit and per step (forward pass): MiB read, read / wait / compute ms. With more than
        max_rows units, the blocks are summed by placement (resident / streamed) with their mean.
        The label and placement columns are as wide as their longest entry (the numbers line up)."""
        self.settle()
        steps = max(1, steps)
        units = list(placement)
        rows = {u: self.rows.get(u, [0, 0.0, 0.0, 0.0]) for u in units}
        body: list[tuple[str, str, list[float], int]] = []   # (label, placement, sums, units summed)
        if len(units) <= max_rows:
            body = [(u, placement[u], rows[u], 1) for u in units]
        else:
            groups: dict[str, list[str]] = {}
            for u in units:
                key = u if not u.startswith("block.") else f"blocks {placement[u]}"
                groups.setdefault(key, []).append(u)
            for key, members in groups.items():
                total = [sum(rows[u][i] for u in members) for i in range(4)]
                label = key if len(members) == 1 else f"{len(members)} blocks (mean)"
                body.append((label, placement[members[0]], total, len(members)))
        body.append(("total", "", [sum(r[i] for r in rows.values()) for i in range(4)], 1))
        lw = max(len("unit"), *(len(b[0]) for b in body))
        pw = max(len("placement"), *(len(b[1]) for b in body))

        def line(label: str, where: str, r: list[float], n: int) -> str:
            return (f"{label:<{lw}} {where:<{pw}} {r[0] / 2**20 / steps / n:>9.1f} {1e3 * r[1] / steps / n:>9.1f} "
                    f"{1e3 * r[2] / steps / n:>9.1f} {1e3 * r[3] / steps / n:>11.1f}")
        head = f"{'unit':<{lw}} {'placement':<{pw}} {'MiB read':>9} {'read ms':>9} {'wait ms':>9} {'compute ms':>11}   (per step, {steps} steps)"
        return "\n".join([head, *(line(*b) for b in body)])
