"""How many CPU threads torch computes with: the one place the runtime sets it.

Order of precedence: an explicit `threads` (`load(threads=N)`, `--threads N`), then the
LAYERPACK_THREADS environment variable, then the number of physical cores this process may run on
(hyper-threads share a core's vector units and cache, and only slow a memory-bound decode down).

On a machine shared with other work, fewer threads can be much faster: every parallel operation
ends at a barrier that waits for its slowest thread, and a thread the OS has descheduled for
another process's time slice stalls the whole step (measured: 2 threads 10x slower than 1 for
decode on 2 busy cores). `--threads 1` (or LAYERPACK_THREADS=1) avoids that, and so does a short
OpenMP spin: GOMP_SPINCOUNT=1000 or OMP_WAIT_POLICY=PASSIVE in the environment before torch loads
(scripts/bench_threads.py: on a busy machine 2x faster than the default spin; on a quiet one
10-30% slower, which is why the runtime does not set it for you).
"""
from __future__ import annotations

import os

from .errors import LayerpackError

ENV = "LAYERPACK_THREADS"


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (sched_getaffinity; sibling
    hyper-threads count once, from /sys topology), or os.cpu_count() where that is unknown."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        base = f"/sys/devices/system/cpu/cpu{c}/topology/"
        try:
            with open(base + "physical_package_id") as f:
                pkg = f.read().strip()
            with open(base + "core_id") as f:
                core = f.read().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((pkg, core))
    return max(1, len(cores))


def _parse(value, what: str) -> int:
    if isinstance(value, bool):
        raise LayerpackError(f"{what} must be a whole number >= 1, not {value!r}")
    try:
        n = int(str(value).strip()) if isinstance(value, str) else int(value)
        if isinstance(value, float) and value != n:
            raise ValueError
    except (TypeError, ValueError):
        raise LayerpackError(f"{what} must be a whole number >= 1, not {value!r}") from None
    if n < 1:
        raise LayerpackError(f"{what} must be a whole number >= 1, not {value!r}")
    return n


def resolve_threads(threads=None, what: str = "threads") -> int:
    """The thread count to use: `threads` if given, else $LAYERPACK_THREADS if set, else
    physical_cores(). `what` names `threads` in the error for a bad value (e.g. "--threads")."""
    if threads is not None:
        return _parse(threads, what)
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        return _parse(env, ENV)
    return physical_cores()


def apply_threads(threads=None) -> int:
    """Set torch's intra-op thread count (see resolve_threads) and return it. Inter-op threads are
    left alone: the runtime runs no inter-op parallel work, and torch allows setting them only once,
    before any is started."""
    import torch

    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
