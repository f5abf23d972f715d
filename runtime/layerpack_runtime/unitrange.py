"""A contiguous range of a pack's units - their weights and the forward pass over them.

`UnitRange` is the piece the single-process model (loader.LayeredModel: the whole pack, embed ..
head) and a pipeline stage (stages.py: some of the units, on its own process or machine) share.
It opens only its own units' files, plans which of them stay resident within its own
`max_memory` (budget.py) - in stored form, or dequantized when memory allows the faster form -
streams the others from disk every step through a prefetching reader (streaming.py) that reads
unit i+1 while unit i computes, and holds the KV cache of its own blocks only. Without a budget
everything is resident, in the form qweight.choose_form's rule picks (a rule, never a timing).
Quantized weights that are not dequantized ahead are computed from their codes inside the linear
layer (qweight.py). What each unit, the cache and a step cost in memory: unit_costs.py.

A range's forward takes token ids when it starts with the embedding (else hidden states
[B, T, hidden]) and returns logits when it ends with the head (else hidden states).
"""
from __future__ import annotations

import os

import torch

from . import models
from .budget import Plan, UnitCost, fmt_size, minimum_budget, parse_size, plan
from .cache import KVCache
from .errors import FormatError, LayerpackError
from .experts import EXPERTS_KEY, ExpertStore
from .format import ST_DTYPES, UNIT_BLOCK, UNIT_EMBED, UNIT_HEAD, unit_name
from .pack import Pack
from .options import RunOptions, Workload, run_options
from .qweight import choose_form, compute_form
from .unit_costs import RangeCosts
from .unitstats import UnitTimes
from .streaming import FileRows, StreamStats, UnitStreamer
from .validate import check_payload
from .decode_step import static_length, wants_static

DTYPE_ALIASES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}



def resolve_device(device: str | torch.device) -> torch.device:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise LayerpackError(f"invalid device {device!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise LayerpackError(f"device {device!r} requested but CUDA is not available in this torch build / machine")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise LayerpackError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise LayerpackError("device 'mps' requested but MPS is not available")
    return d


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype in DTYPE_ALIASES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_ALIASES:
        return DTYPE_ALIASES[dtype.lower()]
    raise LayerpackError(f"unsupported compute dtype {dtype!r} (use bf16, fp16 or fp32)")


def pack_units(num_layers: int) -> list[str]:
    """Every unit of a pack with `num_layers` blocks, in execution order."""
    return [UNIT_EMBED, *(unit_name(UNIT_BLOCK, i) for i in range(num_layers)), UNIT_HEAD]


class UnitRange(RangeCosts):
    """Units [first, last] (indices into embed, block.000 .., head) of a pack, ready to run."""

    def __init__(self, pack: Pack, options: RunOptions | None = None, *, first: int = 0, last: int | None = None,
                 progress=None, plan_only: bool = False, **fields):
        """options (or RunOptions fields by keyword): how to run; the plan is made here, once, for
        options.workload. plan_only: compute costs and the minimum without loading any weights."""
        opts = self.options = run_options(options, **fields)
        device, dtype, max_memory = opts.device, opts.dtype, opts.max_memory
        self.pack = pack
        self.manifest = pack.manifest
        arch = self.manifest.architecture
        self.family = models.module_for(arch.get("family"))
        self.args = self.family.ModelArgs.from_dict(arch)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, pack.dtype)
        every = pack_units(self.args.num_layers)
        names = [l.name for l in self.manifest.layers]
        if names != every:
            raise FormatError(f"pack units {names[:3]}...{names[-2:]} do not match the architecture's "
                              f"{self.args.num_layers} blocks (expected embed, block.000 .. block.{self.args.num_layers - 1:03d}, head)")
        last = len(every) - 1 if last is None else last
        if not 0 <= first <= last < len(every):
            raise LayerpackError(f"unit range {first}..{last} is outside the pack's {len(every)} units")
        self.first, self.last = first, last
        own = every[first:last + 1]
        self.has_embed, self.has_head = own[0] == UNIT_EMBED, own[-1] == UNIT_HEAD
        self.block_units = [u for u in own if u not in (UNIT_EMBED, UNIT_HEAD)]
        self.first_block = first - 1 if not self.has_embed else 0  # global index of this range's first block
        # A tied embedding is also the output projection: a range ending with the head opens it too.
        self.tied_head = self.has_head and not self.has_embed and self.args.tie_word_embeddings
        self.units = own + [UNIT_EMBED] if self.tied_head else own  # the units this range opens, plans and holds
        self.inv_freq = self.family.rope_inv_freq(self.args, self.device)
        self._layers = {l.name: l for l in self.manifest.layers if l.name in self.units}
        for layer in self._layers.values():
            self.family.check_unit(self.args, layer.kind, {t.name for t in layer.tensors})
        # Every own layer file's header is validated now (and cross-checked with the manifest), before any run.
        self._files = {name: pack.layer_file(layer) for name, layer in self._layers.items()}
        self.max_memory = parse_size(max_memory)
        # MoE packs: streamed blocks read only their selected experts (experts.py), cached within
        # `expert_cache` bytes reserved from the budget plus whatever the plan leaves unused.
        num_experts = getattr(self.args, "num_experts", 0)
        self.experts = ExpertStore(self._layers, self._files, num_experts, self.dtype, self.device, opts.expert_reads,
                                   opts.page_cache) if num_experts else None
        self.expert_cache = parse_size(opts.expert_cache) or 0
        self.prefetch_depth = opts.prefetch_depth or 1  # None (auto): chosen per plan, _apply_plan
        self.page_cache = opts.page_cache
        # Stored or dequantized resident forms: a rule of the scheme, device and installed kernels
        # (qweight.choose_form), so the same inputs give the same plan and bits under any load.
        self.dequantize, self.weight_form = choose_form(self.manifest.quantization.scheme, self.device, opts.weight_form)
        self.progress = progress  # called with the bytes of each resident unit loaded (a progress bar's update)
        self._resident: dict[str, dict[str, object]] = {}
        self._deferred: dict[str, bool] = {}  # planned resident, file not here yet (remote pack) -> dequantize?
        self._embed_rows: dict[str, FileRows] | None = None
        self._row_stats = StreamStats()  # embedding rows read from the file
        self.unit_times = UnitTimes()  # per-unit I/O and compute (--stats); compute timed when .enabled
        self.unit_times.device = self.device
        self._forms: dict[str, bool] = {}
        self.streamer: UnitStreamer | None = None
        self.workload = opts.workload
        self._scoring = False  # prefer_dequantized()
        self.plan: Plan | None = None
        # Decode steps of fixed shape (and CUDA graphs of them): a rule of the options, device and
        # family (decode_step.py), decided before the plan, which counts the static cache's columns.
        self.static_decode = wants_static(self, opts.decode)
        if not plan_only:
            self._apply_plan(self.workload)
        self.progress = None  # only the first load reports

    def describe_units(self) -> str:
        own = [u for u in self.units if u != UNIT_EMBED or self.has_embed]
        return own[0] if len(own) == 1 else f"{own[0]}..{own[-1]}"

    # -- planning --------------------------------------------------------------------------------
    def prefer_dequantized(self) -> None:
        """For scoring (perplexity, KL: every step a long prefill), dequantized weights and one GEMM
        beat computing from the codes: replan so that memory left over goes to dequantized forms,
        whatever the decode-speed measurement said."""
        if not self._scoring:
            self._scoring = True
            self._apply_plan(self.workload, (self.plan.kv_bytes, self.plan.activation_bytes))

    def _apply_plan(self, workload: Workload, sizes: tuple[int, int] | None = None) -> None:
        """Plan for `workload` (cache, prefill and decode steps; `sizes`: its (KV, activation) bytes
        when given) and load/drop resident units to match."""
        costs = [self._unit_cost(n) for n in self.units]
        reserve = self.expert_cache if self.experts is not None and self.max_memory else 0
        kv, act = sizes or self.workload_bytes(workload)
        self.prefetch_depth = self._auto_depth(costs, kv, act, reserve)
        new = plan(costs, self._priority(), self.max_memory, kv, act, self.prefetch_depth, self._required(), reserve,
                   self.dequantize or self._scoring, self.runtime_bytes(), what=workload.describe())
        for name in list(self._resident):
            if new.resident.get(name) != self._forms.get(name):
                del self._resident[name]
                self._forms.pop(name, None)
        self._deferred = {}
        for name, deq in new.resident.items():
            if name not in self._resident:
                if self.pack.is_local(name):
                    self._load_resident(name, deq)
                else:  # a remote pack's file still downloading: loaded when the forward pass first needs it
                    self._deferred[name] = deq
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None
        self._embed_rows = None
        streamed = list(new.streamed)
        if UNIT_EMBED in streamed and self._embed_rows_from_file():
            streamed.remove(UNIT_EMBED)
            st = self._files[UNIT_EMBED]
            info = st.tensors["embed.weight"]
            self._embed_rows = {"embed.weight": FileRows(st.path, info.start, info.shape, ST_DTYPES[info.dtype], self.dtype,
                                                         self._row_stats, st.ready, self.unit_times, UNIT_EMBED)}
        if streamed:
            buf = max(c.streamed for c in costs if c.name in streamed)
            files = {n: self.experts.stream_view(n, self._files[n]) if self.experts else self._files[n] for n in streamed}
            self.streamer = UnitStreamer(files, streamed, buf, self.device, self.prefetch_depth, self.page_cache,
                                         check=lambda n, t: check_payload(self._layers[n].tensors, t, self._layers[n].file),
                                         times=self.unit_times)
        if self.experts is not None and self.max_memory:
            # the reserved share plus what the plan left unused, but never more than the streamed experts
            spare = self.max_memory - new.total + new.reserved_bytes
            self.experts.set_capacity(min(spare, self.experts.total_expert_bytes(streamed)))
        self.plan, self.workload = new, workload

    def _auto_depth(self, costs: list[UnitCost], kv: int, act: int, reserve: int) -> int:
        """Units read ahead: the option when given; else 2 on CUDA when the budget holds a third
        stream slot (a copy to the GPU and a read from disk then both run while a unit computes:
        the link stays busy), 1 on CPU or when it does not."""
        if self.options.prefetch_depth is not None:
            return self.options.prefetch_depth
        if self.device.type != "cuda":
            return 1
        if self.max_memory is None:
            return 2
        need = minimum_budget(costs, kv, act, 2, self._required(), reserve, self.runtime_bytes())
        return 2 if need <= self.max_memory else 1

    def stream_stats(self) -> StreamStats | None:
        """The streamer's read and copy statistics, every copy so far timed (waits for the copies in
        flight: call after a generation, not inside one); None when nothing streams."""
        return self.streamer.settled_stats() if self.streamer is not None else None

    def _load_resident(self, name: str, deq: bool) -> None:
        stored = self.pack.read_layer(name)
        w = {k: v.to(self.device) for k, v in compute_form(self._layers[name], stored, self.dtype, deq).items()}
        fuse = getattr(self.family, "fuse_unit", None)  # e.g. one q/k/v matmul where that keeps the same bits
        self._resident[name] = fuse(self.args, w) if fuse is not None and self._layers[name].kind == UNIT_BLOCK else w
        self._forms[name] = deq
        if self.progress:
            self.progress(self._files[name].file_size)

    def reserve(self, workload: Workload) -> None:
        """Make sure the plan holds `workload` (a cache and the steps a call is about to run). Within
        the planned bytes: nothing to do - the plan was made once, at load. Beyond them: an
        undeclared workload (Python API default) or an unlimited budget replans; a declared one
        under a budget is refused with what it would need, rather than dropping units just read."""
        kv, act = self.workload_bytes(workload)
        if kv <= self.plan.kv_bytes and act <= self.plan.activation_bytes:
            return
        bigger = self.workload.union(workload)
        if self.workload.declared and self.max_memory is not None:
            raise LayerpackError(
                f"this call needs {workload.describe()}, beyond the workload declared at load ({self.workload.describe()}); "
                f"declare it when loading (e.g. load(..., context={bigger.context}) or a Workload); "
                f"its minimum is {fmt_size(self.minimum_memory(bigger), up=True)}")
        self._apply_plan(bigger, (max(kv, self.plan.kv_bytes), max(act, self.plan.activation_bytes)))

    # -- weights ---------------------------------------------------------------------------------
    def weights_for(self, unit: str) -> dict[str, object]:
        """Canonical tensors of one unit for the model code, on the compute device: plain tensors in
        the compute dtype and quantized weights (QuantWeight, dequantized at use). The head unit of a
        tied model includes the embedding as `head.weight`. A streamed unit's tensors are valid until
        the next call."""
        if unit in self._deferred:
            self._load_resident(unit, self._deferred.pop(unit))
        if unit in self._resident:
            w = self._resident[unit]
        elif unit == UNIT_EMBED and self._embed_rows is not None:
            w = self._embed_rows
        elif self.streamer is not None and unit in self._layers:
            if self.experts is not None and self.experts.selective_for(unit):
                w = compute_form(self.experts.dense_layer(unit), self.streamer.get(unit), self.dtype, dequantize=False)
                w[EXPERTS_KEY] = self.experts.provider(unit)
            else:
                w = compute_form(self._layers[unit], self.streamer.get(unit), self.dtype, dequantize=False)
        else:
            raise LayerpackError(f"no layer unit {unit!r} in this " + ("pack" if self.first == 0 and self.has_head else "stage"))
        if unit == UNIT_HEAD and self.args.tie_word_embeddings:  # the embedding doubles as the output projection
            w = {**w, "head.weight": self.weights_for(UNIT_EMBED)["embed.weight"]}
        return w

    def placement(self) -> dict[str, str]:
        """unit -> where its weights live under the current plan (the --stats table's column)."""
        out = {}
        for u in self.units:
            if u in self._resident or u in self._deferred:
                out[u] = "resident" + (" (dequantized)" if self.plan.resident.get(u) else "")
            elif u == UNIT_EMBED and self._embed_rows is not None:
                out[u] = "rows from file"
            else:
                out[u] = "streamed"
        return out

    @property
    def bytes_read(self) -> int:
        return ((self.streamer.stats.bytes_read if self.streamer else 0) + self._row_stats.bytes_read
                + (self.experts.stats.bytes_read if self.experts is not None else 0))

    @property
    def io_wait_s(self) -> float:
        return ((self.streamer.stats.wait_s if self.streamer else 0.0)
                + (self.experts.stats.wait_s if self.experts is not None else 0.0))

    # -- forward ---------------------------------------------------------------------------------
    def new_cache(self, batch: int = 1, max_len: int = 256, step_tokens: int | None = None) -> KVCache:
        """A KV cache of this range's blocks for `batch` rows of up to `max_len` tokens; `step_tokens`:
        the most positions one forward will process (the prefill: batch x prompt length), for the plan."""
        a = self.args
        self.reserve(Workload(context=max(1, int(max_len)), batch=max(1, int(batch)),
                              prefill_tokens=max(1, int(step_tokens if step_tokens is not None else batch * max_len)),
                              prefill_batch=max(1, int(batch))))
        if self.static_decode:  # fixed-shape steps attend over an aligned number of columns (decode_step.py)
            max_len = static_length(max(1, int(max_len)))
        return KVCache(len(self.block_units), batch, a.num_kv_heads, max_len, a.head_dim, self.dtype, self.device)

    def check_ids(self, input_ids) -> torch.Tensor:
        """Token ids [B, T] (or [T]) as a long tensor on the device, every id inside the vocabulary."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.numel() == 0:
            raise LayerpackError(f"input_ids must be a non-empty [batch, tokens] array, got shape {tuple(ids.shape)}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.args.vocab_size:
            raise LayerpackError(f"token id {lo if lo < 0 else hi} is outside the vocabulary (0..{self.args.vocab_size - 1})")
        return ids

    def begin_step(self, cache: KVCache, shape: tuple[int, int], mask: torch.Tensor | None) -> list:
        """Claim cache columns for new tokens of `shape` [B, T] (mask [B, T]: 1 = token, 0 = left
        padding) and return every block's Step (rotary tables, attention masks); after the forward,
        `cache.commit(T, mask)`."""
        start, positions = cache.reserve(torch.empty(shape, device="meta"), mask)
        return self.family.prepare_steps(self.args, self.inv_freq, positions, start, cache.kv_valid(start + shape[1]),
                                         cache.positions, self.dtype)

    def run(self, x: torch.Tensor, cache: KVCache, steps: list, last_only: bool = False) -> torch.Tensor:
        """This range's units over x: token ids [B, T] if it starts with the embedding, else hidden
        states [B, T, hidden]. Returns logits [B, T or 1, vocab] (compute dtype) if it ends with the
        head, else hidden states [B, T, hidden]."""
        return self.run_hidden(self.embed(x) if self.has_embed else x, cache, steps, last_only)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding unit: token ids [B, T] -> hidden states [B, T, hidden]."""
        t0 = self.unit_times.start()
        h = self.family.embed_forward(self.args, self.weights_for(UNIT_EMBED), ids)
        self.unit_times.stop(UNIT_EMBED, t0)
        return h

    def run_hidden(self, h: torch.Tensor, cache, steps: list, last_only: bool = False) -> torch.Tensor:
        """This range's blocks (and head) over hidden states h [B, T, hidden]: run() after the embedding."""
        fam, args, times = self.family, self.args, self.unit_times
        for j, unit in enumerate(self.block_units):
            w = self.weights_for(unit)
            t0 = times.start()
            h = fam.block_forward(args, w, h, steps[self.first_block + j], cache.layers[j])
            times.stop(unit, t0)
        if not self.has_head:
            return h
        if last_only:
            h = h[:, -1:]
        w = self.weights_for(UNIT_HEAD)
        t0 = times.start()
        h = fam.head_forward(args, w, h)
        times.stop(UNIT_HEAD, t0)
        return h

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None
        if self.experts is not None:
            self.experts.close()

    def __repr__(self) -> str:
        a = self.args
        return (f"{type(self).__name__}({os.path.basename(self.pack.path)!r}, {self.describe_units()}, family={a.family}, "
                f"layers={a.num_layers}, hidden={a.hidden_size}, scheme={self.manifest.quantization.scheme}, dtype={self.dtype}, "
                f"device={self.device}; {self.plan.describe()})")

