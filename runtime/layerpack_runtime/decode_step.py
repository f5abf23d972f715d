"""Fixed-shape decode steps, and on CUDA the step captured once as a CUDA graph and replayed.

A dynamic decode step attends over the cache columns filled so far, so its shapes grow by one every
token: nothing can be captured, and on CUDA scaled-dot-product attention picked cuDNN, which built a
new plan for every length (7.8 ms of CPU per call on an H200, 86% of a step's CPU time, while the
GPU worked ~1.6 ms of a 41 ms token). A *static* step has the same shapes every time: the new token's
hidden state, its rotary position, the cache column it is written to and the attention mask (which
columns hold tokens) are small device buffers filled before each step, the keys/values are written
at that column (index_copy_) and attention runs over the cache's whole length with the mask. Such a
step can be captured as a CUDA graph once per generation and replayed: one launch per token instead
of ~15 per block, no host work inside the step (issue 24).

Modes (RunOptions.decode): dynamic; static (fixed shapes, run eagerly: every device, and how the
static logic is tested on CPU); graph (static, captured; CUDA only); auto: graph on CUDA where the
model allows it (else static on CUDA), dynamic on CPU, where per-step shapes cost nothing and the
dynamic step attends over fewer columns. The embedding runs eagerly before the step (a quantized
embedding gathers only the rows it needs: a data-dependent shape); the graph covers the blocks and
the head. Greedy output of a graph step is bit-identical to the same step run eagerly (the same
kernels replayed; tests/...::test_graph_equals_static), and the static step equals the dynamic
one to rounding (attention over masked extra columns sums the same terms in another order).
"""
from __future__ import annotations

import contextlib

import torch

from .cache import KVCache, LayerKV
from .errors import LayerpackError

# A static cache holds a multiple of this many columns: the memory-efficient SDPA kernel wants mask
# rows aligned to 16 elements (else it pads a copy of the mask every call).
CACHE_ALIGN = 16
# Eager runs before capture: the first compiles/initialises kernels (Triton, cuBLAS workspaces), the
# second runs them as the capture will (warm allocator); capturing needs both done outside the graph.
WARMUP_RUNS = 2


def static_ineligible(model) -> str | None:
    """Why `model` (a LayeredModel) cannot run fixed-shape decode steps; None when it can."""
    if not hasattr(model.family, "static_steps"):
        return f"the {model.args.family} runtime module has no fixed-shape decode step (data-dependent routing or windows)"
    if getattr(model.args, "sliding_window", None) is not None:
        return "sliding-window attention"
    if getattr(model, "experts", None) is not None:
        return "mixture-of-experts routing"
    if not (model.has_embed and model.has_head):
        return "a pipeline stage (a decode step needs the whole model)"
    return None


def graph_ineligible(model) -> str | None:
    """Why `model`'s static decode step cannot be captured as a CUDA graph; None when it can."""
    why = static_ineligible(model)
    if why:
        return why
    if model.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    streamed = [u for u in model.units if u != "embed" and u not in model._resident]
    if streamed:
        return f"{len(streamed)} unit(s) stream from disk (a graph replays fixed weights)"
    return None


def wants_static(model, asked: str) -> bool:
    """Whether `model` (a UnitRange being built) runs its decode steps at fixed shapes, for
    RunOptions.decode `asked`; a mode asked for that this model cannot run is an error."""
    if asked == "dynamic":
        return False
    why = static_ineligible(model)
    if asked in ("static", "graph"):
        if why:
            raise LayerpackError(f"--decode {asked} is not available for this model: {why}")
        if asked == "graph" and model.device.type != "cuda":
            raise LayerpackError("--decode graph needs a CUDA device (--decode static runs the same fixed-shape step eagerly)")
        return True
    return model.device.type == "cuda" and why is None


def describe(model, asked: str) -> str:
    """How decode steps run, and why (the --stats line)."""
    if not model.static_decode:
        return "dynamic" + ("" if asked == "dynamic" or model.device.type != "cuda" else f" ({static_ineligible(model)})")
    why = graph_ineligible(model) if asked != "static" else "asked for static"
    if why is None:
        return "CUDA graph of a fixed-shape step (per-unit compute times cover the prefill only)"
    return f"fixed-shape steps, eager ({why})"


def attention_backends(device: torch.device):
    """On CUDA, the fused SDPA kernels that need no per-shape plan (flash, memory-efficient) and the
    math fallback - not cuDNN's, which builds a plan for every new key length (a decode step's
    length grows every token). Elsewhere: nothing to choose."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def static_length(max_len: int) -> int:
    return -(-max_len // CACHE_ALIGN) * CACHE_ALIGN


_WARMUP_STREAMS: dict[str, "torch.cuda.Stream"] = {}


def _warmup_stream(device: torch.device) -> "torch.cuda.Stream":
    """One side stream per device for the eager runs before a capture: cuBLAS keeps a workspace
    (32 MiB on an H200) for every stream it has run on, so a new stream per generation would leave
    one more workspace allocated each time (the CUDA streaming test caught the first one)."""
    key = str(device)
    if key not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[key] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[key]


class StaticLayerKV:
    """One block's cache for static steps: the new keys/values go to the column held in a device
    buffer, and attention sees every column (the mask says which hold tokens)."""

    def __init__(self, layer: LayerKV, column: torch.Tensor):
        self.layer, self.column = layer, column

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.layer.k.index_copy_(2, self.column, k)  # `start` is the capture's, not this step's: the buffer decides
        self.layer.v.index_copy_(2, self.column, v)
        return self.layer.k, self.layer.v


class _StaticView:
    """What UnitRange.run reads of a cache (its layers), for static steps."""

    def __init__(self, layers: list[StaticLayerKV]):
        self.layers = layers


class StaticDecoder:
    """The decode steps of one generation (one KVCache) at fixed shapes; `graph`: captured on CUDA."""

    def __init__(self, model, cache: KVCache, graph: bool):
        B, L, dev = cache.batch, cache.max_len, model.device
        self.model = model  # not the cache: it holds this decoder (a cycle would keep a generation's GPU memory until gc)
        self.hidden = torch.zeros(B, 1, model.args.hidden_size, dtype=model.dtype, device=dev)
        self.positions = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.column = torch.zeros(1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=dev)
        self.columns = torch.arange(L, device=dev)
        self.view = _StaticView([StaticLayerKV(layer, self.column) for layer in cache.layers])
        self.use_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None   # the graph's output buffer
        self.note = ""                            # why a requested graph fell back to eager steps

    def _body(self) -> torch.Tensor:
        m = self.model
        steps = m.family.static_steps(m.args, m.inv_freq, self.positions, self.mask, m.dtype)
        return m.run_hidden(self.hidden, self.view, steps, last_only=True)

    def _capture(self) -> None:
        dev, times = self.model.device, self.model.unit_times
        timing, times.enabled = times.enabled, False  # per-unit timing syncs with the host: not inside a graph
        try:
            self._capture_untimed(dev)
        finally:
            times.enabled = timing

    def _capture_untimed(self, dev: torch.device) -> None:
        side = _warmup_stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):  # writes this step's keys/values at its column: the same each time
                self._body()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._body()
        self.graph = graph

    def step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per row (ids [B, 1]) of `cache`'s generation (the one this decoder was made
        for); returns logits [B, 1, vocab] in the compute dtype (the graph's buffer: read it before
        the next step)."""
        m = self.model
        start, positions = cache.reserve(torch.empty(ids.shape, device="meta"), None)
        self.hidden.copy_(m.embed(ids))
        self.positions.copy_(positions)
        self.column.fill_(start)
        allowed = self.columns <= start
        self.mask.copy_((allowed[None] & cache.valid)[:, None, None] if cache.padded else allowed.expand_as(self.mask))
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except Exception as e:  # noqa: BLE001 - e.g. a kernel that syncs with the host: run the same step eagerly
                self.use_graph, self.graph = False, None
                self.note = f"graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); eager static steps"
                torch.cuda.synchronize(m.device)
        if self.graph is not None:
            self.graph.replay()
            out = self.logits
        else:
            out = self._body()
        cache.commit(1, None)
        return out
