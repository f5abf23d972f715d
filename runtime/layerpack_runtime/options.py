"""What a run is asked to do, declared once: the run options (device, dtype, budget, streaming) and
the workload (how many tokens, rows and positions per forward the run will need).

The memory plan is made once, from both, when a model (or a pipeline stage) is opened: a
generation or a server that stays within its declared workload never replans, so units read at
load are never dropped and the minimum named in a "below this pack's minimum" error is the one
for the whole workload - giving that budget runs. Built by keyword only, so no caller can swap two
options by position; the CLI builds one RunOptions and it travels unchanged to the planner.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import LayerpackError

DEFAULT_CONTEXT = 256  # an undeclared workload's first plan (Python API; the CLI always declares)
WEIGHT_FORMS = ("auto", "stored", "dequantized")  # qweight.choose_form
DECODE_STEPS = ("auto", "dynamic", "static", "graph")  # decode_step.py


@dataclass(frozen=True, kw_only=True)
class Workload:
    """The most a run will ask of the model at once.

    context: most tokens of one sequence (prompt + new tokens; a server slot's length).
    batch: sequences decoded together (batched prompts, server slots).
    prefill_tokens: most positions of one forward (default: batch x context); prefill_batch: the
    rows they are spread over (1 for a server's admitted prompts, `batch` for a batched prompt).
    extra_kv_tokens: cache beyond batch x context (a server's prefill cache beside its slots).
    declared: False for the Python API's default (no workload given): then a call that needs more
    replans, as a convenience; a declared workload is a promise, and a call beyond it with a memory
    budget is refused with the workload and minimum it would need."""
    context: int = DEFAULT_CONTEXT
    batch: int = 1
    prefill_tokens: int | None = None
    prefill_batch: int | None = None
    extra_kv_tokens: int = 0
    declared: bool = True

    def __post_init__(self):
        for name in ("context", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LayerpackError(f"workload {name} must be a whole number >= 1, not {v!r}")
        if self.prefill_tokens is not None and (not isinstance(self.prefill_tokens, int) or self.prefill_tokens < 1):
            raise LayerpackError(f"workload prefill_tokens must be a whole number >= 1, not {self.prefill_tokens!r}")

    @classmethod
    def for_generation(cls, prompt_lengths: list[int], max_new_tokens: int) -> "Workload":
        """A generate call: the prompts, left-padded to the longest, then max_new_tokens each."""
        L, B = max(prompt_lengths, default=1), max(1, len(prompt_lengths))
        return cls(context=max(1, L + max(0, int(max_new_tokens))), batch=B, prefill_tokens=max(1, B * L), prefill_batch=B)

    @property
    def kv_tokens(self) -> int:
        return self.batch * self.context + self.extra_kv_tokens

    @property
    def step_tokens(self) -> int:
        return self.prefill_tokens if self.prefill_tokens is not None else self.batch * self.context

    @property
    def step_batch(self) -> int:
        return self.prefill_batch if self.prefill_batch is not None else self.batch

    def covers(self, other: "Workload") -> bool:
        """Whether a plan made for self also holds `other` (cache and both kinds of step)."""
        return (other.kv_tokens <= self.kv_tokens and other.batch <= self.batch and other.context <= self.context
                and other.step_tokens <= self.step_tokens and other.step_batch <= self.step_batch)

    def union(self, other: "Workload") -> "Workload":
        return Workload(context=max(self.context, other.context), batch=max(self.batch, other.batch),
                        prefill_tokens=max(self.step_tokens, other.step_tokens),
                        prefill_batch=max(self.step_batch, other.step_batch),
                        extra_kv_tokens=max(self.extra_kv_tokens, other.extra_kv_tokens), declared=self.declared)

    def describe(self) -> str:
        return (f"context {self.context} x batch {self.batch}"
                + (f" (+{self.extra_kv_tokens} cache tokens)" if self.extra_kv_tokens else "")
                + f", forwards of up to {self.step_tokens} positions")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How to run a pack (load(), LayeredModel, UnitRange, stages and serve all take this one object).

    max_memory: budget for the model's data ("2GiB", "110MB", bytes; None: hold everything).
    prefetch_depth: streamed units read ahead (None: 2 on CUDA when the budget allows, else 1). page_cache: False drops streamed units from the OS
    page cache after each read. expert_reads / expert_cache: MoE packs (see experts.py).
    threads: torch's CPU threads (threads.py). weight_form: auto | stored | dequantized (qweight.choose_form).
    decode: how decode steps run - dynamic, static (fixed shapes) or graph (static, captured as a CUDA
    graph and replayed); auto: graph on CUDA where the model allows it, dynamic on CPU (decode_step.py).
    workload: what the run will ask (Workload); the plan is made once for it."""
    device: str = "cpu"
    dtype: object = None
    max_memory: object = None
    prefetch_depth: int | None = None
    page_cache: bool = True
    expert_reads: bool = True
    expert_cache: object = None
    threads: int | None = None
    weight_form: str = "auto"
    decode: str = "auto"
    workload: Workload = field(default_factory=lambda: Workload(declared=False))

    def __post_init__(self):
        if self.weight_form not in WEIGHT_FORMS:
            raise LayerpackError(f"weight_form must be one of {', '.join(WEIGHT_FORMS)}, not {self.weight_form!r}")
        if self.prefetch_depth is not None and (isinstance(self.prefetch_depth, bool) or not isinstance(self.prefetch_depth, int)
                                                or self.prefetch_depth < 1):
            raise LayerpackError(f"prefetch_depth must be a whole number >= 1 (or None: automatic), not {self.prefetch_depth!r}")
        if self.decode not in DECODE_STEPS:
            raise LayerpackError(f"decode must be one of {', '.join(DECODE_STEPS)}, not {self.decode!r}")
        if not isinstance(self.workload, Workload):
            raise LayerpackError(f"workload must be a Workload, not {type(self.workload).__name__}")

    def with_(self, **changes) -> "RunOptions":
        return replace(self, **changes)


def run_options(options: RunOptions | None = None, context: int | None = None, **fields) -> RunOptions:
    """RunOptions from an options object and/or keyword fields (the Python API's `load(path,
    max_memory=..., context=...)`): `context` alone declares Workload(context=context)."""
    opts = options if options is not None else RunOptions()
    unknown = set(fields) - set(RunOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown run option(s): {', '.join(sorted(unknown))}")
    if fields:
        opts = replace(opts, **fields)
    if context is not None:
        opts = replace(opts, workload=Workload(context=int(context)))
    return opts
