"""Progress of long work on stderr, the one place for it: a tqdm bar on a terminal; periodic plain
lines when stderr is a pipe or a log file (a bar would be garbage there, and minutes of silence
look like a hang); nothing when `quiet`. All three have the same API (update, set_description).

The lines come at most every LAYERPACK_PROGRESS_INTERVAL seconds (default 10), from update()
calls, so a run shorter than that prints none: quick commands keep their clean output."""
from __future__ import annotations

import contextlib
import os
import sys
import time

INTERVAL_ENV = "LAYERPACK_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass


def _amount(n: float, unit: str) -> str:
    if unit != "B":
        return f"{n:.0f} {unit}"
    for u in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s} s" if s < 120 else f"{s // 60} min {s % 60:02d} s"


class LineProgress:
    """Plain progress lines for a non-terminal stderr: `desc: done/total unit (pct), elapsed, ~left`,
    at most every `interval` seconds, and a closing line when any was printed."""

    def __init__(self, total: int | None, desc: str, unit: str, interval: float, stream=None, clock=time.monotonic):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.detail = ""          # set_description: what is being worked on (convert: the unit)
        self.done = 0
        self.printed = 0
        self.start = self.last = clock()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.interval and not (self.total and self.done >= self.total):  # the end: close()'s line
            self.last = now
            self._line(now)

    def set_description(self, desc: str) -> None:
        self.detail = desc

    def close(self) -> None:
        if self.printed:
            self._line(self.clock(), final=True)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = now - self.start
        what = f"{self.desc} {self.detail}" if self.detail and self.detail != self.desc and not final else self.desc
        if self.total and self.unit != "B":
            parts = [f"{self.done}/{self.total} {self.unit} ({100 * min(1.0, self.done / self.total):.0f}%)"]
        elif self.total:
            parts = [f"{_amount(self.done, 'B')} of {_amount(self.total, 'B')} ({100 * min(1.0, self.done / self.total):.0f}%)"]
        else:
            parts = [_amount(self.done, self.unit)]
        parts.append(f"{_duration(elapsed)} elapsed")
        if self.total and not final and 0 < self.done < self.total:
            parts.append(f"~{_duration(elapsed * (self.total - self.done) / self.done)} left")
        print(f"{what}: {'done, ' if final else ''}{', '.join(parts)}", file=self.stream, flush=True)
        self.printed += 1


def _interval() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, quiet: bool, unit: str = "B"):
    """`unit` "B" counts bytes (shown in KiB/MiB/GiB); any other unit (tok, unit) counts items."""
    if quiet:
        yield _Silent()
        return
    if not sys.stderr.isatty():
        lines = LineProgress(total, desc, unit, _interval())
        yield lines
        lines.close()  # not reached when the work raised: no "done" line before an error
        return
    from tqdm.auto import tqdm

    divisor = 1024 if unit == "B" else 1000
    with tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=divisor, dynamic_ncols=True, leave=False) as bar:
        yield bar
