"""How many CPU threads torch computes with, and how idle OpenMP threads wait: the one place the
runtime sets either.

Thread count, in order of precedence: an explicit `threads` (`load(threads=N)`, `--threads N`), then
the LAYERPACK_THREADS environment variable, then the number of physical cores this process may run
on (hyper-threads share a core's vector units and cache, and only slow a memory-bound decode down).
The count never follows the machine's load: outputs are not bit-identical across thread counts in
every dtype (scripts/bench_threads.py --bits: fp32 decode logits differ at 1 vs 2 threads), and the
runtime promises the same bits for the same input whatever else runs.

Wait policy: every parallel operation ends at a barrier that waits for its slowest thread. OpenMP's
default keeps finished threads spinning (GOMP_SPINCOUNT=300000), which is fastest on an idle
machine but collapses when other processes want the cores: a spinning thread burns the time slice
the descheduled one needs (measured: 2 threads 3-10x slower than 1 for decode on 2 busy cores). The
command-line entry points (the `layerpack` command; the stage launcher, `python -m
layerpack_runtime.launch`) therefore set OMP_WAIT_POLICY=PASSIVE (idle threads sleep at once) with
configure_openmp() - before torch loads OpenMP, which reads it once - unless the environment already
sets OMP_WAIT_POLICY or GOMP_SPINCOUNT; stage processes inherit it. Importing layerpack_runtime
writes no environment variable (a library leaves its caller's environment alone): a Python program
that wants the same sets OMP_WAIT_POLICY itself, or calls configure_openmp() before importing torch.
BENCHMARKS.md ("Threads and OpenMP spinning") has the numbers:
on a quiet machine PASSIVE gives up part of the second thread's gain; under load it does not
collapse. `OMP_WAIT_POLICY=ACTIVE` restores OpenMP's spinning for a dedicated machine. The wait
policy changes how idle threads wait, not how work is split, so it changes speed only.
"""
from __future__ import annotations

import os
import sys

from .errors import LayerpackError

ENV = "LAYERPACK_THREADS"
WAIT_POLICY = "PASSIVE"        # the runtime's default OMP_WAIT_POLICY (see the module's docstring)
_wait_policy_note: str | None = None   # what configure_openmp found/did, for describe_threads()
_warned_counts: set[int] = set()       # --threads values already warned about (one line per process)


def configure_openmp(exec_follows: bool = False) -> None:
    """Set OMP_WAIT_POLICY=PASSIVE for this process and its children unless the environment chose a
    policy or spin count, and only while torch (and so OpenMP) is not loaded yet - or, with
    exec_follows, when the caller is about to replace itself with a fresh process, which reads it at
    its start. Called by the command-line entry points only (never at import: the module docstring)."""
    global _wait_policy_note
    chosen = _chosen_by_environment()
    if chosen:
        _wait_policy_note = chosen
    elif "torch" in sys.modules and not exec_follows:
        _wait_policy_note = "OpenMP's default spin (torch was loaded before configure_openmp)"
    else:
        os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
        _wait_policy_note = f"OMP_WAIT_POLICY={WAIT_POLICY} (layerpack's default; OMP_WAIT_POLICY=ACTIVE to spin)"


def describe_threads(n: int | None = None) -> str:
    """For --stats: the thread count, where it came from, and the OpenMP wait policy."""
    import torch

    n = torch.get_num_threads() if n is None else n
    policy = _wait_policy_note or _chosen_by_environment() or "OpenMP's default spin (configure_openmp not called)"
    return f"{n} ({physical_cores()} physical cores); wait policy: {policy}"


def _chosen_by_environment() -> str | None:
    chosen = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if os.environ.get(k)}
    return " ".join(f"{k}={v}" for k, v in chosen.items()) + " (from the environment)" if chosen else None


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
        n, source = _parse(threads, what), what
    elif (os.environ.get(ENV) or "").strip():
        n, source = _parse(os.environ[ENV], ENV), f"${ENV}"
    else:
        return physical_cores()
    _warn_oversubscribed(n, source)
    return n


def _warn_oversubscribed(n: int, what: str) -> None:
    cores = physical_cores()
    if n > cores and n not in _warned_counts:
        _warned_counts.add(n)
        print(f"warning: {what} {n} is more than the {cores} physical cores this process may use: threads will wait "
              f"for each other at every operation", file=sys.stderr)


def apply_threads(threads=None) -> int:
    """Set torch's intra-op thread count (see resolve_threads) and return it. Inter-op threads are
    left alone: the runtime runs no inter-op parallel work, and torch allows setting them only once,
    before any is started."""
    import torch

    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
