"""Pipeline stages: a pack split into S contiguous unit ranges, one per process, over torch.distributed.

Stage k (rank k) opens only its own units (a UnitRange, unitrange.py), holds them resident or
streams them under its own `max_memory`, and keeps the KV cache of its own blocks. Rank 0 holds
the embedding and the first blocks, and owns the tokenizer, sampling and output (a `Pipeline`,
which generates text like a LayeredModel); the hidden states of each step go from stage to stage
by point-to-point send/recv, and the last stage (which holds the head) sends the logits back to
rank 0. Batched prompts are split into micro-batches, each with its own KV caches, sent one after
the other so that all stages work at once (GPipe's fill: the bubble is (S-1)/(M+S-1) of a step).

Messages from stage k to k+1 (stage_link.py: the header, the send/recv, joining the group): every stage derives the rotary positions and masks from the same
header and mask, so no stage needs another's cache.

Backends: gloo on CPU; NCCL when every stage runs on CUDA (one GPU per process: device cuda:LOCAL_RANK);
gloo also carries CUDA tensors through host memory (e.g. S processes sharing one GPU). Faults:
every wait has a timeout, a peer that disappears breaks the connection, and the local launcher
(launch.py) stops every process when one fails.
"""
from __future__ import annotations

import os

import torch

from .cache import KVCache
from .errors import LayerpackError
from .generate import GenerationStats
from .stage_plan import (DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_STEP_TIMEOUT_S, StageOptions, balanced_split,  # noqa: F401 - re-exported
                         describe_range, open_stage_pack, parse_budgets, parse_split, plan_stages, stage_ranges)
from .text import TextGenerator
from .threads import apply_threads, resolve_threads
from .stage_link import (FLAG_LAST_ONLY, FLAG_MASK, HEADER_LEN, OP_CACHE, OP_DROP, OP_FORWARD, OP_PING, OP_STATS,  # noqa: F401
                         OP_STOP, StageLink, init_group, peak_rss, set_timeout, stage_device)
from .unitrange import UnitRange

STATS_FIELDS = ("busy_s", "peak_rss", "plan_bytes")  # per stage, collected by Pipeline.stage_stats()


class Stage:
    """One stage's units and the KV caches of its blocks, one per micro-batch."""

    def __init__(self, opts: StageOptions, rank: int, world: int, ranges: list[tuple[int, int]], backend: str,
                 local_rank: int = 0):
        self.rank, self.world = rank, world
        first, last = ranges[rank]
        budgets = parse_budgets(opts.max_memory, world)
        pack = open_stage_pack(opts.pack, first, last, tokenizer=rank == 0)
        self.units = UnitRange(pack, opts.run_options(budgets[rank], stage_device(opts.device, local_rank)), first=first, last=last)
        self.name = f"stage {rank} ({self.units.describe_units()})"
        self.link = StageLink(rank, world, self.units.device, backend)
        self.caches: dict[int, KVCache] = {}
        self.busy_s = 0.0  # time spent computing (for the pipeline bubble)

    def stats_row(self) -> list[float]:
        return [self.busy_s, float(peak_rss()), float(self.units.plan.total)]

    @property
    def hidden(self) -> int:
        return self.units.args.hidden_size

    def forward(self, x: torch.Tensor, mb: int, mask: torch.Tensor | None, last_only: bool) -> torch.Tensor:
        import time

        t0 = time.perf_counter()
        cache = self.caches[mb]
        B, T = x.shape[:2]
        steps = self.units.begin_step(cache, (B, T), mask)
        with torch.inference_mode():
            out = self.units.run(x, cache, steps, last_only)
        cache.commit(T, mask)
        if out.device.type == "cuda":
            torch.cuda.synchronize(out.device)
        self.busy_s += time.perf_counter() - t0
        return out

    def serve(self) -> None:
        """Rank > 0: answer the previous stage's messages until it says stop."""
        link, prev, nxt, last = self.link, self.rank - 1, self.rank + 1, self.rank == self.world - 1
        dev = self.units.device
        while True:
            op, mb, B, T, flags, a, b, _ = link.recv_header(prev)
            if op == OP_FORWARD:
                mask = link.recv((B, T), torch.long, prev).to(dev) if flags & FLAG_MASK else None
                h = link.recv_hidden((B, T, self.hidden), self.units.dtype, prev, dev)
                out = self.forward(h, mb, mask, bool(flags & FLAG_LAST_ONLY))
                if last:
                    link.send(out.float(), 0)
                else:
                    link.send_header(nxt, op, mb, B, T, flags, a, b)
                    if mask is not None:
                        link.send(mask, nxt)
                    link.send_hidden(out, nxt)
                continue
            if op in (OP_STATS, OP_PING):  # pass a table / payload on; the last stage returns it to rank 0
                t = link.recv((self.world, len(STATS_FIELDS)), torch.float64, prev) if op == OP_STATS else link.recv((a,), torch.uint8, prev)
                if op == OP_STATS:
                    t[self.rank] = torch.tensor(self.stats_row(), dtype=torch.float64)
                    if flags:
                        self.busy_s = 0.0
                if not last:
                    link.send_header(nxt, op, mb, B, T, flags, a, b)
                link.send(t, 0 if last else nxt)
                continue
            if op == OP_CACHE:
                self.caches[mb] = self.units.new_cache(B, a, step_tokens=b)
            elif op == OP_DROP:  # a = 1: only micro-batch mb's caches
                if a:
                    self.caches.pop(mb, None)
                else:
                    self.caches.clear()
            elif op != OP_STOP:
                raise LayerpackError(f"unexpected message {op} from stage {prev}")
            if not last:
                link.send_header(nxt, op, mb, B, T, flags, a, b)
            if op == OP_STOP:
                link.flush()
                return


class PipelineCache:
    """Rank 0's handle of one cache across the stages: the batch's rows in micro-batches, each with
    its own KV caches on every stage (parts: (rows, micro-batch id, stage 0's local cache))."""

    def __init__(self, parts: list[tuple[slice, int, KVCache]]):
        self.parts = parts
        self.batch = parts[-1][0].stop
        self.max_len = parts[0][2].max_len


class Pipeline(TextGenerator):
    """Rank 0 of a pipeline: the whole pack's forward and text generation across the stages (the
    same runner interface as LayeredModel: new_cache, forward, logits, reserve, bytes_read /
    io_wait_s; generation is TextGenerator's, over forward - no loop of its own). A forward sends
    every micro-batch before waiting for the first one's logits, so the stages work at once."""

    def __init__(self, stage: Stage, opts: StageOptions):
        self.stage, self.opts = stage, opts
        u = stage.units
        self.pack, self.manifest, self.args, self.device, self.dtype = u.pack, u.manifest, u.args, u.device, u.dtype
        self.world = stage.world
        self.last_stats = GenerationStats()
        self._next_mb = 0
        self.hop_bytes = self.hop_positions = 0  # hidden states sent by stage 0 (bytes, token positions)

    def __repr__(self) -> str:
        return f"Pipeline({os.path.basename(self.pack.path)!r}, {self.world} stages; {self.stage.name}: {self.stage.units.plan.describe()})"

    @property
    def plan(self):
        return self.stage.units.plan

    @property
    def workload(self):
        return self.stage.units.workload

    @property
    def max_memory(self):
        return self.stage.units.max_memory

    @property
    def bytes_read(self) -> int:
        return self.stage.units.bytes_read

    @property
    def io_wait_s(self) -> float:
        return self.stage.units.io_wait_s

    def reserve(self, workload) -> None:
        """Stage 0's part of the runner interface (each stage checks its own when a cache is made)."""
        self.stage.units.reserve(workload)

    def minimum_memory(self, workload=None) -> int:
        """Stage 0's minimum (each stage's own was checked by the launcher: stage_plan.plan_stages)."""
        return self.stage.units.minimum_memory(workload)

    def new_cache(self, batch: int = 1, max_len: int = 256, step_tokens: int | None = None, keep: bool = False) -> PipelineCache:
        """Caches for `batch` rows of up to `max_len` tokens on every stage, split into micro-batches.
        The pipeline holds one such cache at a time: a new one frees the earlier ones on every stage
        (keep=True: not, for forward()'s own short-lived cache)."""
        if not keep:
            self.drop_caches()
        step_tokens = batch * max_len if step_tokens is None else step_tokens
        parts = []
        for rows in self.micro_batches(batch):
            n = rows.stop - rows.start
            mb, self._next_mb = self._next_mb, self._next_mb + 1
            steps = max(1, -(-step_tokens * n // batch))  # this micro-batch's share of the prefill positions
            self.stage.caches[mb] = self.stage.units.new_cache(n, max_len, steps)
            if self.world > 1:
                self.stage.link.send_header(1, OP_CACHE, mb, n, 0, 0, max_len, steps)
            parts.append((rows, mb, self.stage.caches[mb]))
        return PipelineCache(parts)

    def drop_caches(self, cache: PipelineCache | None = None) -> None:
        """Free `cache`'s micro-batches (default: every cache) on every stage."""
        if cache is None:
            self.stage.caches.clear()
            self._next_mb = 0
            if self.world > 1:
                self.stage.link.send_header(1, OP_DROP)
            return
        for _, mb, _ in cache.parts:
            self.stage.caches.pop(mb, None)
            if self.world > 1:
                self.stage.link.send_header(1, OP_DROP, mb, 0, 0, 0, 1)

    def send_forward(self, ids: torch.Tensor, mb: int, mask: torch.Tensor | None, last_only: bool):
        """Run stage 0 on ids [B, T] of micro-batch `mb` and pass the hidden states on (returns at
        once); with one stage, returns the logits."""
        out = self.stage.forward(ids, mb, mask, last_only)
        if self.world == 1:
            return out
        B, T = ids.shape
        flags = (FLAG_LAST_ONLY if last_only else 0) | (FLAG_MASK if mask is not None else 0)
        link = self.stage.link
        link.send_header(1, OP_FORWARD, mb, B, T, flags)
        if mask is not None:
            link.send(mask.long(), 1)
        link.send_hidden(out, 1)
        self.hop_bytes += out.numel() * out.element_size()
        self.hop_positions += B * T
        return None

    def recv_logits(self, B: int, T: int) -> torch.Tensor:
        return self.stage.link.recv((B, T, self.args.vocab_size), torch.float32, self.world - 1).to(self.device)

    def forward(self, input_ids, cache: PipelineCache | None = None, attention_mask=None, last_only: bool = False) -> torch.Tensor:
        """Like LayeredModel.forward, through every stage: float32 logits [B, T or 1, vocab]."""
        ids = self.stage.units.check_ids(input_ids)
        B, T = ids.shape
        own_cache = cache is None
        if own_cache:
            cache = self.new_cache(B, T, keep=True)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=self.device).reshape(B, T)
        sent = [(rows, self.send_forward(ids[rows], mb, None if mask is None else mask[rows], last_only))
                for rows, mb, _ in cache.parts]
        logits = torch.cat([out.float() if out is not None else self.recv_logits(rows.stop - rows.start, 1 if last_only else T)
                            for rows, out in sent])
        if own_cache:  # a whole sequence: its caches are not needed any more, on any stage
            self.drop_caches(cache)
        return logits

    def logits(self, input_ids) -> torch.Tensor:
        return self.forward(input_ids)

    def micro_batches(self, batch: int) -> list[slice]:
        m = max(1, min(batch, self.opts.micro_batches or self.world))
        size, extra = divmod(batch, m)
        out, start = [], 0
        for k in range(m):
            n = size + (k < extra)
            out.append(slice(start, start + n))
            start += n
        return out

    def stage_stats(self, reset: bool = False) -> list[dict[str, float]]:
        """Every stage's compute time (busy_s, since the last reset), peak RSS and planned bytes."""
        table = torch.zeros(self.world, len(STATS_FIELDS), dtype=torch.float64)
        table[0] = torch.tensor(self.stage.stats_row(), dtype=torch.float64)
        if reset:
            self.stage.busy_s = 0.0
        if self.world > 1:
            link = self.stage.link
            link.send_header(1, OP_STATS, 0, 0, 0, int(reset))
            link.send(table, 1)
            table = link.recv(table.shape, torch.float64, self.world - 1)
        return [dict(zip(STATS_FIELDS, row)) for row in table.tolist()]

    def ping(self, nbytes: int) -> float:
        """Seconds for `nbytes` to go round every stage and back to rank 0 (S hops, no compute)."""
        import time

        if self.world == 1:
            return 0.0
        link = self.stage.link
        payload = torch.zeros(nbytes, dtype=torch.uint8)
        t0 = time.perf_counter()
        link.send_header(1, OP_PING, 0, 0, 0, 0, nbytes)
        link.send(payload, 1)
        link.recv((nbytes,), torch.uint8, self.world - 1)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Tell every stage to stop (they exit their loops) and leave the process group."""
        import torch.distributed as dist

        if self.world > 1:
            self.stage.link.send_header(1, OP_STOP)
            self.stage.link.flush()
        if dist.is_initialized():
            dist.destroy_process_group()


def join(opts: StageOptions, rank: int | None = None, world: int | None = None, on_name=None) -> Pipeline | None:
    """Join the pipeline as stage `rank` (default: torchrun's RANK / WORLD_SIZE). Rank 0 gets the
    Pipeline to generate with (call close() when done); every other rank serves until rank 0
    closes it, then returns None. on_name(0, name): told this stage's name (for error messages)."""
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", opts.stages)) if world is None else world
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world != opts.stages:
        raise LayerpackError(f"{world} processes were started for {opts.stages} stages")
    # the stages on one machine share its cores (default: an equal share each)
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    apply_threads(opts.threads if opts.threads or os.environ.get("LAYERPACK_THREADS") else max(1, resolve_threads() // per_machine))
    ranges = opts.ranges or plan_stages(opts, check_budgets=False)  # the local launcher computed them once
    if on_name is not None:
        on_name(0, f"stage {rank} ({describe_range(len(ranges) and ranges[-1][1] - 1, *ranges[rank])})")
    backend = init_group(opts, rank, world) if world > 1 else "gloo"
    # step timeout from here on: the longest a stage waits for its neighbour
    if world > 1:
        set_timeout(opts.step_timeout_s)
    stage = Stage(opts, rank, world, ranges, backend, local_rank)
    if world > 1:  # every stage has opened its units before rank 0 starts sending
        dist.barrier()
    if rank == 0:
        return Pipeline(stage, opts)
    try:
        stage.serve()
    finally:
        dist.destroy_process_group()
    return None

