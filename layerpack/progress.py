"""Progress bars for long work (tqdm on stderr); `quiet` gives a silent stand-in with the same API."""
from __future__ import annotations

import contextlib


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, quiet: bool, unit: str = "B"):
    if quiet:
        yield _Silent()
        return
    from tqdm.auto import tqdm

    # disable=None: bars only on a terminal, so logs and pipes get clean output (and one-line errors).
    with tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024, dynamic_ncols=True, leave=False, disable=None) as bar:
        yield bar
