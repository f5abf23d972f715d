"""Fault injection for the pipeline-stage tests, from the test side (no hook in the library reads
the environment): `python tests/support/stage_faults.py RANK:exit|RANK:kill:N layerpack-args...` runs the
real `layerpack` CLI with a StageFault passed to every stage process through StageOptions.on_start.

RANK:exit   stage RANK exits (code 3) at start-up, before joining;
RANK:kill:N stage RANK SIGKILLs itself at its (N+1)-th forward - a stage that dies, deterministically."""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass


@dataclass
class StageFault:
    rank: int
    action: str
    after: int = 0

    @classmethod
    def parse(cls, spec: str) -> "StageFault":
        parts = spec.split(":")
        return cls(int(parts[0]), parts[1], int(parts[2]) if len(parts) > 2 else 0)

    def __call__(self, rank: int) -> None:  # in the stage process, before it joins
        if rank != self.rank:
            return
        if self.action == "exit":
            os._exit(3)
        from layerpack_runtime import stages

        left, forward = [self.after], stages.Stage.forward

        def dying_forward(stage, *a, **k):
            left[0] -= 1
            if left[0] < 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return forward(stage, *a, **k)

        stages.Stage.forward = dying_forward


def main() -> None:
    fault = StageFault.parse(sys.argv[1])
    import layerpack_runtime.launch as launch
    from layerpack.cli import main as cli

    real = launch.launch_local

    def launch_with_fault(opts, job, *a, **k):
        opts.on_start = fault
        return real(opts, job, *a, **k)

    launch.launch_local = launch_with_fault
    cli(sys.argv[2:], prog_name="layerpack")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # spawned stages unpickle StageFault from here
    from support.stage_faults import main as _main  # the importable module, not __main__: its classes pickle by name

    _main()
