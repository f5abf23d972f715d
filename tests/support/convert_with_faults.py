"""Test-only: the `layerpack` CLI with a conversion fault installed, for the resume tests' real kill -9.

    python tests/support/convert_with_faults.py units|windows N convert SRC OUT [options]

SIGKILLs this process once N units are recorded (`units`) or N windows of source values are
quantized (`windows`, i.e. in the middle of a unit), deterministically. The fault is an object
passed to layerpack.convert.convert (conversion/faults.py); the library reads no setting for it."""
from __future__ import annotations

import os
import signal
import sys

import layerpack.convert
from layerpack.conversion.faults import ConvertFaults


class KillAfter(ConvertFaults):
    def __init__(self, point: str, n: int):
        assert point in ("units", "windows") and n > 0, (point, n)
        self.point, self.n, self.windows = point, n, 0

    def window_done(self) -> None:
        self.windows += 1
        if self.point == "windows" and self.windows >= self.n:
            os.kill(os.getpid(), signal.SIGKILL)

    def unit_recorded(self, units_done: int) -> None:
        if self.point == "units" and units_done >= self.n:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    point, n, *args = sys.argv[1:]
    faults = KillAfter(point, int(n))
    convert = layerpack.convert.convert
    # The CLI's convert command looks layerpack.convert.convert up when it runs: hand it the faults.
    layerpack.convert.convert = lambda src, out, opts=None: convert(src, out, opts, faults=faults)
    from layerpack.cli import main as cli

    cli(args, prog_name="layerpack")


if __name__ == "__main__":
    main()
