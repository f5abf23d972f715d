"""Starting pipeline stages (stages.py): on one machine by `launch_local` (torch.multiprocessing's
start_processes: S processes on free 127.0.0.1 ports, watched; when one fails or the user presses
Ctrl-C, all of them are stopped and one line says which stage failed and why), across machines
by torchrun running this module on each machine:

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m layerpack_runtime.launch PACK "prompt" --stages 2

Both run `stage_entry`: join the process group, open this stage's units, then rank 0 runs the job
(e.g. `GenerateJob`: generate and print) while the others serve until it is done.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .errors import LayerpackError
from .stages import StageOptions, join
from .threads import configure_openmp

STOP_GRACE_S = 5.0
# torch's C++ warnings (c10d's socket timeouts, ...) would print lines of their own next to our one
# `error:` line: stage processes start with only errors shown.
CPP_LOG_ENV = "TORCH_CPP_LOG_LEVEL"  # after a failure or Ctrl-C: SIGTERM, then SIGKILL after this long


class StageError(LayerpackError):
    """A stage failed; str(e) names it."""


def _comm_error(e: BaseException) -> bool:
    """An error about the connection to another stage (a consequence, rarely the cause)."""
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(w in text for w in ("gloo", "connection", "timed out", "nccl", "socket"))


def describe_error(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, LayerpackError):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.filename}: {e.strerror or e}" if e.filename else (e.strerror or str(e))
    first = (str(e).strip().splitlines() or [""])[0]
    if _comm_error(e):
        return f"lost contact with another stage ({first[:200]})"
    return f"internal error ({type(e).__name__}: {first[:300]})"


def stage_entry(rank: int, opts: StageOptions, job, error_dir: str | None = None, local: bool = True) -> None:
    """One stage process: join, then run `job(pipeline)` on rank 0 or serve on the others. A failure
    is recorded in error_dir (the local launcher reads it) or printed as one `error:` line."""
    if local:  # Ctrl-C reaches every process of the terminal's group: the launcher stops them all
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _die_with_parent()
    if opts.on_start is not None:  # e.g. a test's fault injection (tests/support/stage_faults.py), run in this process
        opts.on_start(rank)
    name = [f"stage {rank}"]
    try:
        pipe = join(opts, rank, opts.stages if local else None, on_name=name.__setitem__)
        if pipe is not None:
            try:
                job(pipe)
            finally:
                pipe.close()
    except BaseException as e:  # noqa: BLE001 - every failure becomes one line naming the stage
        msg = f"{name[0]}: {describe_error(e)}"
        if error_dir is not None:
            with open(os.path.join(error_dir, f"{rank}.json"), "w") as f:
                json.dump({"rank": rank, "time": time.time(), "message": msg, "comm": _comm_error(e)}, f)
        else:
            from .remote import scrub

            print(f"error: {scrub(msg)}", file=sys.stderr, flush=True)
        os._exit(130 if isinstance(e, KeyboardInterrupt) else 1)


def _die_with_parent() -> None:
    """Linux: a stage whose launcher is gone (killed with SIGKILL, say) is killed too - never an orphan."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the launcher died before we got here
            os._exit(1)
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _root_cause(error_dir: str, procs, failed: int | None, names: list[str]) -> str:
    """The message of the stage that failed first: its own error (not a lost connection, which
    is what its neighbours report), else the one that died, else the earliest report."""
    reports = []
    for fn in os.listdir(error_dir):
        with open(os.path.join(error_dir, fn)) as f:
            reports.append(json.load(f))
    reports.sort(key=lambda r: r["time"])
    own = [r for r in reports if not r["comm"]]
    if own:
        return own[0]["message"]
    reported = {r["rank"] for r in reports}
    dead = [i for i, p in enumerate(procs) if i not in reported and p.exitcode not in (0, None, -signal.SIGTERM, -signal.SIGKILL)]
    if failed is not None and failed not in reported:
        dead.insert(0, failed)
    for i in dead:
        code = procs[i].exitcode
        how = f"signal {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return f"{names[i]}: the process died ({how})"
    if reports:
        return reports[0]["message"]
    return "a stage failed"


def _stop(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


def launch_local(opts: StageOptions, job, start_method: str = "spawn") -> None:
    """Run opts.stages stage processes on this machine; rank 0 runs job(pipeline). Returns when
    all have finished; raises StageError (naming the stage) if any failed, after stopping the
    others; KeyboardInterrupt after stopping all of them."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    from .pack import Pack
    from .stages import describe_range, plan_stages

    # A bad pack, split or budget: one error here, before any process starts. The ranges are computed
    # once, here, and travel to every stage in opts.ranges.
    ranges = plan_stages(opts)
    pack = Pack(opts.pack, check_files=False)
    names = [f"stage {k} ({describe_range(len(pack.manifest.layers) - 2, *r)})" for k, r in enumerate(ranges)]
    pack.close()
    opts.addr, opts.port = "127.0.0.1", free_port()
    error_dir = tempfile.mkdtemp(prefix="layerpack-stages-")
    # The stage processes inherit the environment at start: torch's C++ warnings off there, without
    # changing the caller's environment or logging for longer than the start itself.
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    saved_env, saved_level = os.environ.get(CPP_LOG_ENV), spawn_log.level
    os.environ.setdefault(CPP_LOG_ENV, "ERROR")
    spawn_log.setLevel(logging.ERROR)  # its warnings are not our one line
    try:
        ctx = mp.start_processes(stage_entry, args=(opts, job, error_dir, True), nprocs=opts.stages, join=False,
                                 start_method=start_method)
    except BaseException:
        spawn_log.setLevel(saved_level)
        raise
    finally:
        if saved_env is None:
            os.environ.pop(CPP_LOG_ENV, None)
    try:
        while True:
            try:
                if ctx.join(timeout=0.2, grace_period=1.0):
                    return
            except ProcessException as e:
                _stop(ctx.processes)
                raise StageError(_root_cause(error_dir, ctx.processes, e.error_index, names)) from None
    except KeyboardInterrupt:
        _stop(ctx.processes)
        raise
    finally:
        _stop(ctx.processes)
        shutil.rmtree(error_dir, ignore_errors=True)
        spawn_log.setLevel(saved_level)


def declare_generation(opts: StageOptions, prompt, max_new_tokens: int, chat: bool = False) -> list[int]:
    """Tokenize `prompt` with the pack's tokenizer and declare the generation's workload in opts
    (prompt + max_new_tokens), so that every stage plans once, for exactly that. Returns the ids."""
    from .options import Workload
    from .pack import Pack
    from .text import encode_prompt
    from .tokenizer import PackTokenizer

    pack = Pack(opts.pack, check_files=False)
    try:
        ids = encode_prompt(lambda: PackTokenizer(pack.path, pack.manifest.architecture), prompt, chat)
    finally:
        pack.close()
    if not ids:
        raise LayerpackError("the prompt encodes to no tokens; give some text")
    opts.workload = Workload.for_generation([len(ids)], max_new_tokens)
    return ids


@dataclass
class GenerateJob:
    """Rank 0's job for `layerpack run --stages`: generate from one prompt (text, or token ids from
    declare_generation), streaming the text to stdout."""
    prompt: object
    gen: dict = field(default_factory=dict)   # generate() keyword arguments
    stats: bool = False

    def __call__(self, pipe) -> None:
        t0 = time.perf_counter()
        for piece in pipe.generate(self.prompt, stream=True, **self.gen):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if self.stats:
            s = pipe.last_stats
            print(f"stages: {pipe.world}; {s.summary()}", file=sys.stderr)
            per_token = pipe.hop_bytes / max(1, s.steps * s.batch)
            print(f"hops: {pipe.hop_bytes / 2**20:.2f} MiB sent by stage 0 ({per_token / 1024:.1f} KiB per token); "
                  f"{pipe.stage.name} memory plan: {pipe.stage.units.plan.describe()}; total {time.perf_counter() - t0:.2f} s",
                  file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """`python -m layerpack_runtime.launch PACK PROMPT --stages S ...` under torchrun (one process per stage)."""
    import argparse

    if CPP_LOG_ENV not in os.environ:  # read once, when torch loads: start again with it set
        os.environ[CPP_LOG_ENV] = "ERROR"
        configure_openmp(exec_follows=True)  # OMP_WAIT_POLICY too is read once, when torch loads OpenMP
        os.execv(sys.executable, [sys.executable, "-m", "layerpack_runtime.launch", *(sys.argv[1:] if argv is None else argv)])
    p = argparse.ArgumentParser(prog="python -m layerpack_runtime.launch", description="One pipeline stage (start with torchrun).")
    p.add_argument("pack")
    p.add_argument("prompt")
    p.add_argument("--stages", type=int, default=None, help="number of stages [default: torchrun's WORLD_SIZE]")
    p.add_argument("--split", default=None, help="block ranges per stage, e.g. 0-9,10-21,22-31")
    p.add_argument("--max-memory", default=None, help="budget of each stage: one size, or one per stage (1GiB,2GiB)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (each process takes GPU LOCAL_RANK)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--micro-batches", type=int, default=None)
    p.add_argument("--connect-timeout", type=float, default=None, help="seconds every stage has to join")
    p.add_argument("--step-timeout", type=float, default=None, help="seconds a stage waits for its neighbour")
    p.add_argument("--stats", action="store_true")
    a = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", a.stages or 1))
    opts = StageOptions(pack=a.pack, stages=a.stages or world, split=a.split, max_memory=a.max_memory, device=a.device,
                        dtype=a.dtype, threads=a.threads,
                        micro_batches=a.micro_batches)
    if a.connect_timeout:
        opts.connect_timeout_s = a.connect_timeout
    if a.step_timeout:
        opts.step_timeout_s = a.step_timeout
    ids = declare_generation(opts, a.prompt, a.max_new_tokens, a.chat)
    job = GenerateJob(ids, dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                                top_p=a.top_p, seed=a.seed), a.stats)
    stage_entry(int(os.environ.get("RANK", 0)), opts, job, local=False)


if __name__ == "__main__":
    main()
