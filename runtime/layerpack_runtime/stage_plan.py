"""How a pack is split into pipeline stages, decided once before any stage process starts: each
stage's unit range (given by --split, or balanced by bytes and budgets), each stage's minimum
memory for the declared workload, and the options every stage process gets (StageOptions).
The processes themselves, the messages between them and the Pipeline are in stages.py."""
from __future__ import annotations

from dataclasses import dataclass, field

from .budget import fmt_size, parse_size
from .errors import FormatError, LayerpackError
from .format import UNIT_EMBED, UNIT_HEAD
from .options import RunOptions, Workload
from .pack import Pack
from .unitrange import UnitRange, pack_units

DEFAULT_CONNECT_TIMEOUT_S = 120.0   # every stage must join within this (a missing peer is an error, not a hang)
DEFAULT_STEP_TIMEOUT_S = 600.0      # the longest a stage waits for its neighbour's next message


# -- the split ----------------------------------------------------------------------------------
def parse_split(spec: str, num_layers: int) -> list[tuple[int, int]]:
    """'0-9,10-21,22-31' (block ranges, one per stage, contiguous, covering every block) ->
    unit index ranges [(first, last)]: stage 0 also holds the embedding, the last stage the head."""
    ranges = []
    for part in spec.split(","):
        a, _, b = part.strip().partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise LayerpackError(f"cannot read --split {spec!r}: use block ranges per stage, e.g. 0-9,10-21,22-31") from None
        ranges.append((lo, hi))
    expect = 0
    for lo, hi in ranges:
        if lo != expect or hi < lo:
            raise LayerpackError(f"--split {spec!r}: stages must hold contiguous, non-empty block ranges starting at 0 "
                                 f"(expected a range starting at block {expect})")
        expect = hi + 1
    if expect != num_layers:
        raise LayerpackError(f"--split {spec!r} covers blocks 0-{expect - 1}, but the pack has blocks 0-{num_layers - 1}")
    n_units = num_layers + 2
    return [(0 if k == 0 else lo + 1, n_units - 1 if k == len(ranges) - 1 else hi + 1) for k, (lo, hi) in enumerate(ranges)]


def balanced_split(unit_bytes: list[int], stages: int, shares: list[float] | None = None) -> list[tuple[int, int]]:
    """Contiguous unit ranges [(first, last)] for `stages` stages with bytes in proportion to
    `shares` (e.g. each stage's memory budget; default equal). Units: embed, blocks.., head;
    every stage gets at least one block."""
    n = len(unit_bytes)
    blocks = n - 2
    if not 1 <= stages <= blocks:
        raise LayerpackError(f"--stages {stages}: the pack has {blocks} blocks; use 1 to {blocks} stages")
    shares = shares or [1.0] * stages
    total, cum = float(sum(unit_bytes)), [0]
    for b in unit_bytes:
        cum.append(cum[-1] + b)
    bounds, acc = [0], 0.0
    for k in range(1, stages):
        acc += shares[k - 1] / sum(shares)
        lo = bounds[-1] + (2 if k == 1 else 1)       # stage k-1 gets >= 1 block (stage 0: embed + a block)
        hi = n - 1 - (stages - k)                     # leave a block for every later stage (the last: + head)
        bounds.append(min(range(lo, hi + 1), key=lambda i: abs(cum[i] - acc * total)))
    bounds.append(n)
    return [(bounds[k], bounds[k + 1] - 1) for k in range(stages)]


def stage_ranges(pack: Pack, stages: int, split: str | None = None, budgets: list[int | None] | None = None) -> list[tuple[int, int]]:
    """The unit ranges of `stages` stages: given (`split`) or balanced by file bytes and budgets."""
    m = pack.manifest
    num_layers = len(m.layers) - 2
    if split:
        ranges = parse_split(split, num_layers)
        if stages and len(ranges) != stages:
            raise LayerpackError(f"--split names {len(ranges)} stages but --stages is {stages}")
        return ranges
    sizes = {f.path: f.size for f in m.files}
    unit_bytes = [sizes.get(l.file, 0) for l in m.layers]
    if m.architecture.get("tie_word_embeddings"):
        unit_bytes[-1] += unit_bytes[0]  # the last stage also holds the tied embedding (its head)
    shares = [float(b) for b in budgets] if budgets and all(b for b in budgets) else None
    return balanced_split(unit_bytes, stages, shares)


def plan_stages(opts: "StageOptions", check_budgets: bool = True) -> list[tuple[int, int]]:
    """Every stage's unit range, computed once (the launcher passes them on in opts.ranges), and -
    with check_budgets - each stage's minimum memory for the declared workload checked before any
    process starts: a budget below one of them is one error that lists them all, with the options
    that run (the named minimums suffice: the same split is chosen again)."""
    pack = Pack(opts.pack, check_files=False)
    try:
        budgets = parse_budgets(opts.max_memory, opts.stages)
        ranges = stage_ranges(pack, opts.stages, opts.split, budgets)
        num_layers = len(pack.manifest.layers) - 2
    finally:
        pack.close()
    if check_budgets and any(b is not None for b in budgets):
        minimums = []
        for k, (first, last) in enumerate(ranges):
            units = UnitRange(open_stage_pack(opts.pack, first, last, tokenizer=k == 0), opts.run_options(None, "cpu"),
                              first=first, last=last, plan_only=True)
            try:
                minimums.append(units.minimum_memory())
            finally:
                units.close()
                units.pack.close()
        low = [k for k, (b, m) in enumerate(zip(budgets, minimums)) if b is not None and b < m]
        if low:
            split = ",".join(f"{max(0, a - 1)}-{min(num_layers, b) - 1}" for a, b in ranges)
            each = "; ".join(f"stage {k} ({describe_range(num_layers, *ranges[k])}): {fmt_size(m, up=True)}"
                             + (f" (given {fmt_size(budgets[k])})" if k in low else "") for k, m in enumerate(minimums))
            raise LayerpackError(
                f"--max-memory is below the minimum of stage{'s' if len(low) > 1 else ''} {', '.join(map(str, low))} "
                f"for {opts.workload.describe()}; every stage's minimum: {each}. Runs with: "
                # one size for all keeps this split (equal shares); unequal budgets would move it
                + (f"--max-memory {fmt_size(max(minimums), up=True).replace(' ', '')}, or " if len(set(budgets)) == 1 else "")
                + f"--split {split} --max-memory " + ",".join(fmt_size(m, up=True).replace(" ", "") for m in minimums))
    opts.ranges = ranges
    return ranges


def parse_budgets(value, stages: int) -> list[int | None]:
    """--max-memory for stages: one size for every stage, or one per stage ('1GiB,2GiB,2GiB')."""
    if value is None or isinstance(value, (int, float)):
        return [parse_size(value)] * stages
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [p.strip() for p in str(value).split(",")]
    if len(parts) == 1:
        parts = parts * stages
    if len(parts) != stages:
        raise LayerpackError(f"--max-memory gives {len(parts)} budgets for {stages} stages (give one, or one per stage)")
    return [parse_size(p) for p in parts]


def describe_range(num_layers: int, first: int, last: int) -> str:
    units = pack_units(num_layers)
    return units[first] if first == last else f"{units[first]}..{units[last]}"


def open_stage_pack(path: str, first: int, last: int, tokenizer: bool) -> Pack:
    """The pack folder as one stage sees it: only its own layer files (with a tied embedding, the
    stage holding the head also needs the embedding's file) and, for rank 0, the tokenizer need
    be there - e.g. `layerpack pull --layers` of just those units."""
    pack = Pack(path, check_files=False)
    units = [l.name for l in pack.manifest.layers][first:last + 1]
    if units[-1] == UNIT_HEAD and pack.manifest.architecture.get("tie_word_embeddings"):
        units.append(UNIT_EMBED)
    own = {l.file for l in pack.manifest.layers if l.name in units}
    layer_files = {l.file for l in pack.manifest.layers}
    problems = pack.check_presence(only={f.path for f in pack.manifest.files
                                         if f.path in own or (tokenizer and f.path not in layer_files)})
    if problems:
        raise FormatError(f"{pack.path}: {problems[0]}" + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    return pack


@dataclass(kw_only=True)
class StageOptions:
    """What every stage process needs to know (picklable: the local launcher sends it to each)."""
    pack: str
    stages: int
    split: str | None = None
    max_memory: object = None        # one size for all stages, or one per stage
    device: str = "cpu"
    dtype: str | None = None
    workload: Workload = field(default_factory=lambda: Workload(declared=False))  # what rank 0 will run (per stage: its blocks' share)
    weight_form: str = "auto"
    prefetch_depth: int = 1
    page_cache: bool = True
    expert_reads: bool = True
    expert_cache: object = None
    threads: int | None = None       # default: $LAYERPACK_THREADS, else this machine's cores / its stages
    micro_batches: int | None = None  # default: min(batch, stages)
    backend: str | None = None        # default: nccl when every stage is on CUDA, else gloo
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    addr: str | None = None           # None: torchrun's environment (MASTER_ADDR, MASTER_PORT)
    port: int | None = None
    ranges: list | None = None        # every stage's unit range, once computed (plan_stages); None: computed at join
    on_start: object = None           # called with the rank in each local stage process first (tests inject faults with it)

    def run_options(self, budget, device: str) -> RunOptions:
        """One stage's RunOptions: its own budget and device, the shared rest."""
        return RunOptions(device=device, dtype=self.dtype, max_memory=budget, prefetch_depth=self.prefetch_depth,
                          page_cache=self.page_cache, expert_reads=self.expert_reads, expert_cache=self.expert_cache,
                          threads=self.threads, weight_form=self.weight_form, workload=self.workload)
