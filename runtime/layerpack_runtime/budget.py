"""The memory budget planner: which layer units stay resident and which stream from disk.

Everything the runtime holds is counted against `max_memory`: resident units (in the form they
are kept: stored bytes, or dequantized bytes when memory allows and that form is the faster one
on this machine - with the native kernels, the stored form usually is), the streaming
buffers (prefetch depth + 1 units in flight), the KV cache and the activations of a forward
step, and the tokenizer and torch's working memory (Plan.runtime_bytes). The Python interpreter and the imported libraries
(torch, tokenizers: ~200-300 MB) are not: the budget bounds the process's memory above that baseline. Units are kept resident in this order - embedding (gathered every step; when tied
also the head), head, then blocks from the first - because every block costs the same to stream.

On CUDA the budget is GPU memory: resident units, KV cache and activations live there, and each of
the (depth + 1) stream slots is a device twin (counted) plus a pinned host buffer of the same size
(host RAM, not counted: the host is rarely the scarce memory next to a GPU, and pinned pages are
what lets the copies run at the link's speed; `run --stats` shows them). The tokenizer and torch's
working memory are counted as on CPU (a small, conservative share).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import LayerpackError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(value) -> int | None:
    """'110MB', '2GiB', '1.5 GB', 123456 -> bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB).
    None / 'auto' -> None (no limit). A string without a unit is bytes, which scripts pass; below 1 MiB
    it is refused as a forgotten unit (`--max-memory 150` meant 150MB: no model runs in 150 bytes)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "none")):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise LayerpackError(f"memory size must be positive, not {value}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise LayerpackError(f"cannot read memory size {value!r} (examples: 110MB, 2GiB, 1.5GB, 800MiB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise LayerpackError(f"memory size must be positive, not {value!r}")
    if not m.group(2) and n < 2**20:
        raise LayerpackError(f"memory size {str(value).strip()!r} has no unit, so it reads as {n} bytes: "
                             f"give a unit, e.g. {m.group(1)}MB or {m.group(1)}MiB (or {m.group(1)}B for bytes)")
    return n


def fmt_size(n: float, up: bool = False) -> str:
    """Bytes for people (1 decimal in KiB..TiB). up=True rounds up instead of to nearest: a minimum
    named this way, given back as a budget, is never a hair below the real one."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            if unit == "B":
                return f"{math.ceil(n) if up else round(n)} B"
            return f"{math.ceil(n * 10) / 10 if up else n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@dataclass
class UnitCost:
    name: str
    stored: int        # bytes in memory in the stored (possibly quantized) form
    dequantized: int   # bytes once every quantized weight is dequantized to the compute dtype
    streamed: int      # bytes of buffer needed to stream it (file payload, + decompressed size if zstd)


@dataclass
class Plan:
    resident: dict[str, bool] = field(default_factory=dict)   # unit -> keep dequantized?
    streamed: list[str] = field(default_factory=list)         # in execution order
    weights_bytes: int = 0
    buffer_bytes: int = 0
    kv_bytes: int = 0
    activation_bytes: int = 0
    budget: int | None = None
    reserved_bytes: int = 0    # set aside for a cache the caller manages (MoE experts)
    # Memory the run needs besides the model's data (the tokenizer, held by `tokenizers` in native
    # memory, and torch's first-use working memory; loader.TORCH_WORKING_BYTES): it counts against the
    # budget like the rest, so that the process's peak above its import baseline stays within
    # max_memory (tests/runtime/test_memory_budget.py).
    runtime_bytes: int = 0

    @property
    def total(self) -> int:
        return (self.weights_bytes + self.buffer_bytes + self.kv_bytes + self.activation_bytes + self.reserved_bytes
                + self.runtime_bytes)

    def describe(self) -> str:
        deq = sum(self.resident.values())
        return (f"{len(self.resident)} resident ({deq} dequantized), {len(self.streamed)} streamed; "
                f"weights {fmt_size(self.weights_bytes)} + stream buffers {fmt_size(self.buffer_bytes)} + KV {fmt_size(self.kv_bytes)} "
                f"+ activations {fmt_size(self.activation_bytes)}"
                + (f" + runtime {fmt_size(self.runtime_bytes)}" if self.runtime_bytes else "")
                + (f" + expert cache {fmt_size(self.reserved_bytes)}" if self.reserved_bytes else "")
                + f" = {fmt_size(self.total)}"
                + (f" of {fmt_size(self.budget)}" if self.budget else ""))


def minimum_budget(units: list[UnitCost], kv_bytes: int, activation_bytes: int, prefetch_depth: int = 1,
                   required: tuple[str, ...] = (), reserved: int = 0, runtime: int = 0) -> int:
    """Fewest bytes a pack can run with: the required units resident, (depth + 1) stream buffers of
    the largest other unit, the KV cache, activations, the reserve and the runtime's own memory."""
    by_name = {u.name: u for u in units}
    others = [u.streamed for u in units if u.name not in required]
    return (kv_bytes + activation_bytes + reserved + runtime + sum(by_name[n].stored for n in required)
            + (prefetch_depth + 1) * max(others, default=0))


def plan(units: list[UnitCost], priority: list[str], budget: int | None, kv_bytes: int, activation_bytes: int,
         prefetch_depth: int = 1, required: tuple[str, ...] = (), reserved: int = 0, dequantize_faster: bool = True,
         runtime: int = 0, what: str = "") -> Plan:
    """Resident set and forms under `budget` (None: everything resident, in the faster form). `required`
    units must be resident (e.g. a tied embedding, which is also the head). `reserved` bytes of the
    budget are kept free for the caller (the MoE expert cache); `runtime` bytes are what the run
    needs besides the model (Plan.runtime_bytes). `dequantize_faster`: whether a dequantized weight
    is the form to spend leftover memory on (a rule of the scheme, device and kernels:
    qweight.choose_form); if not, it is not spent on dequantized copies, which would make a larger
    budget slower than a smaller one. `what`: the workload, named in the error for too small a budget."""
    by_name = {u.name: u for u in units}
    if budget is None:
        size = lambda u: u.dequantized if dequantize_faster else u.stored  # noqa: E731
        return Plan({u.name: dequantize_faster for u in units}, [], sum(size(u) for u in units), 0, kv_bytes, activation_bytes, None,
                    runtime_bytes=runtime)
    fixed = kv_bytes + activation_bytes + reserved + runtime
    minimum = minimum_budget(units, kv_bytes, activation_bytes, prefetch_depth, required, reserved, runtime)
    if budget < minimum:
        raise LayerpackError(
            f"max_memory {fmt_size(budget)} is below this pack's minimum of {fmt_size(minimum, up=True)}"
            + (f" for {what}" if what else "") + " "
            f"({prefetch_depth + 1} stream buffers of the largest layer + KV cache {fmt_size(kv_bytes)} + activations {fmt_size(activation_bytes)}"
            + (f" + expert cache {fmt_size(reserved)}" if reserved else "")
            + (f" + runtime (tokenizer, torch) {fmt_size(runtime)}" if runtime else "")
            + (f" + resident {', '.join(required)}" if required else "") + ")"
        )
    resident: dict[str, bool] = {n: False for n in required}
    order = [by_name[n] for n in priority if n not in required]

    def cost(res: dict[str, bool]) -> tuple[int, int]:
        weights = sum(by_name[n].dequantized if d else by_name[n].stored for n, d in res.items())
        streamed = [u.streamed for u in units if u.name not in res]
        buffers = (prefetch_depth + 1) * max(streamed) if streamed else 0
        return weights, buffers

    # 1) everything resident in stored form if it fits (no stream buffers at all), else as many units
    #    as fit, in priority order
    everything = {**resident, **{u.name: False for u in order}}
    if sum(cost(everything)) + fixed <= budget:
        resident = everything
    for u in order:
        trial = {**resident, u.name: False}
        if sum(cost(trial)) + fixed <= budget:
            resident = trial
    # 2) with what is left, the dequantized form where it is the faster one, same order
    for u in [by_name[n] for n in priority] if dequantize_faster else []:
        if u.name in resident:
            trial = {**resident, u.name: True}
            if sum(cost(trial)) + fixed <= budget:
                resident = trial
    weights, buffers = cost(resident)
    streamed = [u.name for u in units if u.name not in resident]
    return Plan(resident, streamed, weights, buffers, kv_bytes, activation_bytes, budget, reserved, runtime)
