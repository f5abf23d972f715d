"""`load(pack)` -> a LayeredModel that runs a layerpack unit by unit and generates text.

A forward pass runs the embed unit, each block unit and the head unit in turn, and obtains each
unit's weights from `weights_for(unit)` just before running it. With `max_memory`, the planner
(budget.py) decides which units stay resident - in stored form, or dequantized when memory allows
the faster form - and the others stream from disk every step through a prefetching reader
(streaming.py) that reads unit i+1 while unit i computes. Without a budget everything is resident,
in the faster of the stored and dequantized forms on this machine (measured once, qweight.py).
Quantized weights that are not dequantized ahead are computed from their codes inside the linear
layer (qweight.py).
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterator, Sequence

import torch

from . import models
from .budget import UnitCost, minimum_budget, parse_size, plan
from .cache import KVCache
from .errors import FormatError, LayerpackError
from .experts import EXPERTS_KEY, ExpertStore
from .format import ST_DTYPES, UNIT_BLOCK, UNIT_EMBED, UNIT_HEAD, unit_name
from .generate import GenerationStats, SamplingParams, generate_tokens
from .pack import Pack, stored_names
from .qweight import CHUNK_ELEMS, compute_form, dequantized_form_faster
from .safetensors_io import itemsize
from .streaming import FileRows, StreamStats, UnitStreamer
from .threads import apply_threads
from .tokenizer import PackTokenizer, TextStream
from .unitstats import UnitTimes
from .validate import check_payload

DTYPE_ALIASES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}

Prompt = Any  # str | list[int] | list[dict] (a chat conversation)

# What a run holds besides the model's data, counted by the plan (Plan.runtime_bytes) so that the
# process's peak RSS above its import baseline stays within max_memory (tests/test_memory_budget.py):
# - `tokenizers` holds about 11-12x the size of tokenizer.json in native memory at its peak while
#   loading (measured: SmolLM2's 3.5 MB file -> 42 MB, Gemma 3's 33 MB -> 372 MB);
# - torch's first-use allocations on CPU (intra-op thread pool, kernel workspaces, allocator arenas
#   of the reader threads): 12-30 MB measured on the first forward (more with MoE routing and expert
#   reader threads), whatever the model size.
TOKENIZER_BYTES_PER_FILE_BYTE = 12
TORCH_WORKING_BYTES = 32 * 2**20


def _device(device: str | torch.device) -> torch.device:
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


def _dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype in DTYPE_ALIASES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPE_ALIASES:
        return DTYPE_ALIASES[dtype.lower()]
    raise LayerpackError(f"unsupported compute dtype {dtype!r} (use bf16, fp16 or fp32)")


class LayeredModel:
    """A pack, ready to run. See the module docstring for how weights are obtained."""

    def __init__(self, pack: Pack, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                 max_memory=None, context: int = 256, prefetch_depth: int = 1, page_cache: bool = True,
                 progress=None, expert_reads: bool = True, expert_cache=None, threads: int | None = None):
        self.threads = apply_threads(threads)  # torch's CPU threads (threads.py: explicit > $LAYERPACK_THREADS > physical cores)
        self.pack = pack
        self.manifest = pack.manifest
        arch = self.manifest.architecture
        self.family = models.module_for(arch.get("family"))
        self.args = self.family.ModelArgs.from_dict(arch)
        self.device = _device(device)
        self.dtype = _dtype(dtype, pack.dtype)
        self.block_units = [unit_name(UNIT_BLOCK, i) for i in range(self.args.num_layers)]
        self.units = [UNIT_EMBED, *self.block_units, UNIT_HEAD]
        names = [l.name for l in self.manifest.layers]
        if names != self.units:
            raise FormatError(f"pack units {names[:3]}...{names[-2:]} do not match the architecture's "
                              f"{self.args.num_layers} blocks (expected embed, block.000 .. block.{self.args.num_layers - 1:03d}, head)")
        self.inv_freq = self.family.rope_inv_freq(self.args, self.device)
        self._tokenizer: PackTokenizer | None = None
        self.last_stats = GenerationStats()
        self._layers = {l.name: l for l in self.manifest.layers}
        for layer in self.manifest.layers:
            self.family.check_unit(self.args, layer.kind, {t.name for t in layer.tensors})
        # Every layer file's header is validated now (and cross-checked with the manifest), before any run.
        self._files = {l.name: pack.layer_file(l) for l in self.manifest.layers}
        self.max_memory = parse_size(max_memory)
        # MoE packs: streamed blocks read only their selected experts (experts.py), cached within
        # `expert_cache` bytes reserved from the budget plus whatever the plan leaves unused.
        num_experts = getattr(self.args, "num_experts", 0)
        self.experts = ExpertStore(self._layers, self._files, num_experts, self.dtype, self.device, expert_reads, page_cache) \
            if num_experts else None
        self.expert_cache = parse_size(expert_cache) or 0
        self.prefetch_depth = prefetch_depth
        self.page_cache = page_cache
        self.progress = progress  # called with the bytes of each resident unit loaded (a progress bar's update)
        self._resident: dict[str, dict[str, object]] = {}
        self._deferred: dict[str, bool] = {}  # planned resident, file not here yet (remote pack) -> dequantize?
        self._embed_rows: dict[str, FileRows] | None = None
        self._row_stats = StreamStats()  # embedding rows read from the file
        self.unit_times = UnitTimes()  # per-unit I/O and compute (--stats); compute timed when .enabled
        self.unit_times.device = self.device
        self._forms: dict[str, bool] = {}
        self.streamer: UnitStreamer | None = None
        self.context = self.step_tokens = 0
        self.step_batch = 1
        self._scoring = False  # prefer_dequantized()
        self._apply_plan(max(1, int(context)), max(1, int(context)), 1)
        self.progress = None  # only the first load reports

    # -- planning --------------------------------------------------------------------------------
    def _unit_cost(self, name: str) -> UnitCost:
        layer, st = self._layers[name], self._files[name]
        item = torch.empty(0, dtype=self.dtype).element_size()
        stored = dequantized = 0
        for t in layer.tensors:
            n = 1
            for d in t.shape:
                n *= d
            dequantized += n * item
            if t.scheme == "none":
                stored += n * item
            else:  # codes + absmax (+ outliers), as held in memory (decompressed)
                stored += sum(_logical_bytes(st.tensors[k]) for k in stored_names(t))
        payload = st.file_size - st.data_start
        decompressed = sum(_logical_bytes(i) for i in st.tensors.values() if i.logical_dtype)
        if name == UNIT_EMBED and self._embed_rows_from_file():
            payload, decompressed = 0, 0  # not streamed whole: rows are read as needed (FileRows)
        streamed = payload + decompressed
        if self.experts is not None:  # a MoE block streams its dense part; experts are read one by one
            streamed = self.experts.streamed_bytes(name, streamed)
        return UnitCost(name, stored, dequantized, streamed)

    def _embed_rows_from_file(self) -> bool:
        """An untied, unquantized, uncompressed embedding can serve rows straight from its file."""
        if self.args.tie_word_embeddings:
            return False
        info = self._files[UNIT_EMBED].tensors.get("embed.weight")
        return info is not None and info.logical_dtype is None and len(info.shape) == 2

    def _kv_bytes(self, tokens: int) -> int:
        a = self.args
        return 2 * a.num_layers * a.num_kv_heads * a.head_dim * tokens * torch.empty(0, dtype=self.dtype).element_size()

    def _activation_bytes(self, tokens: int, batch: int = 1) -> int:
        """Peak working memory of one forward step over `tokens` positions in `batch` rows (the
        prefill), roughly: a few hidden-sized buffers and the MLP's intermediate ones per position,
        each row's attention scores, the last logits, and the largest weight dequantized on the fly
        (fp32 work buffer + result, in chunks of at most CHUNK_ELEMS)."""
        a = self.args
        t = max(1, tokens)
        seq = max(1, t // max(1, batch))
        work = t * (8 * a.hidden_size + 3 * a.intermediate_size) * 4 + a.num_heads * t * seq * 4 + batch * a.vocab_size * 4 * 2
        largest = min(max(a.vocab_size * a.hidden_size, a.intermediate_size * a.hidden_size), CHUNK_ELEMS)
        quantized = self.manifest.quantization.scheme != "none"
        experts = self.experts.working_bytes(t, self.args.top_k) if self.experts is not None else 0
        return work + experts + (largest * (4 + torch.empty(0, dtype=self.dtype).element_size()) if quantized else 0)

    def _runtime_bytes(self) -> int:
        """Memory a run takes besides the model's data: the pack's tokenizer once loaded, and torch's
        first-use working memory (see TORCH_WORKING_BYTES)."""
        size = next((f.size for f in self.manifest.files if f.path == "tokenizer.json"), 0)
        return size * TOKENIZER_BYTES_PER_FILE_BYTE + TORCH_WORKING_BYTES

    def _priority(self) -> list[str]:
        # The embedding is needed every step (and is the head when tied), then the head, then blocks;
        # an embedding that can serve rows from its file comes last: keeping it saves only a few reads.
        if self._embed_rows_from_file():
            return [UNIT_HEAD, *self.block_units, UNIT_EMBED]
        return [UNIT_EMBED, UNIT_HEAD, *self.block_units]

    def prefer_dequantized(self) -> None:
        """For scoring (perplexity, KL: every step a long prefill), dequantized weights and one GEMM
        beat computing from the codes: replan so that memory left over goes to dequantized forms,
        whatever the decode-speed measurement said."""
        if not self._scoring:
            self._scoring = True
            self._apply_plan(self.context, self.step_tokens, self.step_batch)

    def minimum_memory(self) -> int:
        """The smallest `max_memory` this pack runs with at the current context (what the error for
        too small a budget states)."""
        required = (UNIT_EMBED,) if self.args.tie_word_embeddings else ()
        reserve = self.expert_cache if self.experts is not None else 0
        return minimum_budget([self._unit_cost(n) for n in self.units], self._kv_bytes(self.context),
                              self._activation_bytes(self.step_tokens, self.step_batch), self.prefetch_depth, required, reserve,
                              self._runtime_bytes())

    def _apply_plan(self, context: int, step_tokens: int, batch: int) -> None:
        """(Re)plan for a KV cache of `context` token slots and forward steps of up to `step_tokens`
        positions (the prefill), and load/drop resident units to match."""
        costs = [self._unit_cost(n) for n in self.units]
        required = (UNIT_EMBED,) if self.args.tie_word_embeddings else ()  # a tied embedding is also the head
        reserve = self.expert_cache if self.experts is not None and self.max_memory else 0
        scheme = self.manifest.quantization.scheme
        deq_faster = scheme == "none" or self._scoring or dequantized_form_faster(scheme, self.dtype, self.device)
        new = plan(costs, self._priority(), self.max_memory, self._kv_bytes(context), self._activation_bytes(step_tokens, batch),
                   self.prefetch_depth, required, reserve, deq_faster, self._runtime_bytes())
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
        self.plan, self.context, self.step_tokens, self.step_batch = new, context, step_tokens, batch

    def _load_resident(self, name: str, deq: bool) -> None:
        stored = self.pack.read_layer(name)
        w = {k: v.to(self.device) for k, v in compute_form(self._layers[name], stored, self.dtype, deq).items()}
        fuse = getattr(self.family, "fuse_unit", None)  # e.g. one q/k/v matmul where that keeps the same bits
        self._resident[name] = fuse(self.args, w) if fuse is not None and self._layers[name].kind == UNIT_BLOCK else w
        self._forms[name] = deq
        if self.progress:
            self.progress(self._files[name].file_size)

    def ensure_context(self, tokens: int, step_tokens: int | None = None, batch: int = 1) -> None:
        """Make room for a KV cache of `tokens` slots (batch x length) and forward steps of
        `step_tokens` positions over `batch` rows, replanning (fewer resident units) if needed."""
        step_tokens = tokens if step_tokens is None else step_tokens
        if (tokens > self.context or self._activation_bytes(step_tokens, batch)
                > self._activation_bytes(self.step_tokens, self.step_batch)):
            self._apply_plan(max(tokens, self.context), step_tokens, batch)

    def __repr__(self) -> str:
        a = self.args
        return (f"LayeredModel({os.path.basename(self.pack.path)!r}, family={a.family}, layers={a.num_layers}, "
                f"hidden={a.hidden_size}, scheme={self.manifest.quantization.scheme}, dtype={self.dtype}, device={self.device}; "
                f"{self.plan.describe()})")

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
            raise LayerpackError(f"no layer unit {unit!r} in this pack")
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
        """A KV cache for `batch` rows of up to `max_len` tokens; `step_tokens`: the most positions one
        forward will process (the prefill: batch x prompt length), for the memory plan."""
        a = self.args
        self.ensure_context(batch * max_len, step_tokens, batch)
        return KVCache(a.num_layers, batch, a.num_kv_heads, max_len, a.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, input_ids, cache: KVCache | None = None, attention_mask=None, last_only: bool = False) -> torch.Tensor:
        """Run new tokens [B, T] (or [T]) through every unit; returns float32 logits [B, T or 1, vocab].

        With a cache, the tokens continue the cached sequence (their keys/values are appended);
        without one, they are a whole sequence. attention_mask [B, T] (1 = token, 0 = left
        padding) is needed only for padded prompts."""
        fam, args = self.family, self.args
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.numel() == 0:
            raise LayerpackError(f"input_ids must be a non-empty [batch, tokens] array, got shape {tuple(ids.shape)}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= args.vocab_size:
            raise LayerpackError(f"token id {lo if lo < 0 else hi} is outside the vocabulary (0..{args.vocab_size - 1})")
        B, T = ids.shape
        if cache is None:
            cache = self.new_cache(B, T)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=self.device).reshape(B, T)
        start, positions = cache.reserve(ids, mask)
        steps = fam.prepare_steps(args, self.inv_freq, positions, start, cache.kv_valid(start + T), cache.positions, self.dtype)
        times = self.unit_times
        w = self.weights_for(UNIT_EMBED)
        t0 = times.start()
        h = fam.embed_forward(args, w, ids)
        times.stop(UNIT_EMBED, t0)
        for i, unit in enumerate(self.block_units):
            w = self.weights_for(unit)
            t0 = times.start()
            h = fam.block_forward(args, w, h, steps[i], cache.layers[i])
            times.stop(unit, t0)
        if last_only:
            h = h[:, -1:]
        w = self.weights_for(UNIT_HEAD)
        t0 = times.start()
        logits = fam.head_forward(args, w, h)
        times.stop(UNIT_HEAD, t0)
        del w
        cache.commit(T, mask)
        return logits.float()

    def logits(self, input_ids) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of a whole sequence, without a persistent cache."""
        return self.forward(input_ids)

    # -- text ------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> PackTokenizer:
        if self._tokenizer is None:
            self._tokenizer = PackTokenizer(self.pack.path, self.manifest.architecture)
        return self._tokenizer

    @property
    def eos_ids(self) -> list[int]:
        if self._tokenizer is None and not os.path.isfile(os.path.join(self.pack.path, "tokenizer.json")):
            return list(self.args.eos_token_ids)
        return self.tokenizer.eos_ids

    def encode_prompt(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """One prompt -> token ids: a string (chat=True wraps it as a user message), a chat
        conversation (list of {"role", "content"} dicts), or token ids (used as they are)."""
        if isinstance(prompt, str):
            if chat:
                return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(list(prompt))
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.reshape(-1).tolist()
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise LayerpackError(f"a prompt is a string, a list of token ids or a chat (list of message dicts), not {type(prompt).__name__}")

    def _prompts(self, prompt_or_prompts, chat: bool) -> tuple[list[list[int]], bool]:
        p = prompt_or_prompts
        single = (isinstance(p, str) or isinstance(p, torch.Tensor) and p.dim() <= 1
                  or isinstance(p, (list, tuple)) and (not p or all(isinstance(x, (int, dict)) for x in p)))
        if single:
            return [self.encode_prompt(p, chat)], True
        if isinstance(p, torch.Tensor):
            p = list(p)
        return [self.encode_prompt(x, chat) for x in p], False

    def _pad_id(self) -> int:
        if self.args.pad_token_id is not None:
            return int(self.args.pad_token_id)
        eos = self.eos_ids
        return int(eos[0]) if eos else 0

    def _generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.device).manual_seed(int(seed))

    def generate_ids(self, prompt_or_prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int | None = None, chat: bool = False) -> list[int] | list[list[int]]:
        """Like generate, but returns the new token ids (generation ends at an EOS token, which is
        not included)."""
        prompts, single = self._prompts(prompt_or_prompts, chat)
        eos = set(self.eos_ids)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        self.last_stats = GenerationStats()
        for tok in generate_tokens(self, prompts, max_new_tokens, SamplingParams(temperature, top_k, top_p),
                                   self._pad_id(), self._generator(seed), self.last_stats):
            for b, t in enumerate(tok.tolist()):
                if not done[b]:
                    if t in eos:
                        done[b] = True
                    else:
                        out[b].append(t)
            if all(done):
                break
        return out[0] if single else out

    def generate(self, prompt_or_prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, stop: str | Sequence[str] | None = None, stream: bool = False, chat: bool = False,
                 seed: int | None = None):
        """Generate a continuation of a prompt (or of each prompt of a list, batched).

        prompt: a string, token ids, or a chat conversation (list of {"role", "content"} dicts);
        chat=True renders strings through the pack's chat template (needs jinja2).
        temperature 0 is greedy; > 0 samples, optionally restricted by top_k / top_p; seed makes
        sampling reproducible. Generation ends at an EOS token, at a `stop` string (not included
        in the text), or after max_new_tokens. Returns the new text (a list for a list of
        prompts); with stream=True (one prompt only), an iterator of text pieces as they become
        final. Timings of the last call: `last_stats`."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        prompts, single = self._prompts(prompt_or_prompts, chat)
        events = self._text_events(prompts, max_new_tokens, SamplingParams(temperature, top_k, top_p), stops, seed)
        if stream:
            if not single:
                raise LayerpackError("stream=True takes a single prompt")
            return (piece for _, piece in events)
        texts = [""] * len(prompts)
        for b, piece in events:
            texts[b] += piece
        return texts[0] if single else texts

    def _text_events(self, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                     stops: list[str], seed: int | None) -> Iterator[tuple[int, str]]:
        params.check()  # before any work, also for lazily consumed streams
        tokenizer = self.tokenizer
        streams = [TextStream(tokenizer, stops) for _ in prompts]
        eos = set(tokenizer.eos_ids)
        pad = self._pad_id()
        generator = self._generator(seed)

        def run():
            done = [False] * len(prompts)
            self.last_stats = stats = GenerationStats()
            for tok in generate_tokens(self, prompts, max_new_tokens, params, pad, generator, stats):
                for b, t in enumerate(tok.tolist()):
                    if done[b]:
                        continue
                    if t in eos:
                        done[b], piece = True, streams[b].finish()
                    else:
                        piece = streams[b].push(t)
                        done[b] = streams[b].stopped
                    if piece:
                        yield b, piece
                if all(done):
                    break
            for b, s in enumerate(streams):
                if not done[b] and (piece := s.finish()):
                    yield b, piece

        return run()


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         max_memory=None, context: int = 256, prefetch_depth: int = 1, verify: bool = False,
         page_cache: bool = True, progress=None, expert_reads: bool = True, expert_cache=None,
         revision: str | None = None, token=None, threads: int | None = None) -> LayeredModel:
    """Open the pack at `path` and prepare it to run on `device` in `dtype` (default: the pack's dtype).

    path: a pack folder, or a Hub repo id "owner/name" (needs huggingface_hub): the manifest and
    tokenizer are fetched, then the layer files download in execution order while the model runs,
    into the HF cache (remote.py). revision / token: for a repo id (token default: HF_TOKEN or the
    saved login).
    max_memory: budget for the model's data ("2GiB", "110MB", bytes; None: hold everything). Units
    that do not fit stream from disk every step, prefetched `prefetch_depth` units ahead.
    context: KV cache slots (batch x tokens) planned for at load; a generation that needs more replans
    (keeping fewer units resident), or fails with the budget it would need.
    verify: check every file's sha256 first (sizes and headers are always checked; a remote pack
    always hashes the files it downloads, and with verify also those it finds in the cache).
    page_cache: False drops streamed units from the OS page cache after each read (for streams
    larger than RAM: they would evict everything else, and could not stay cached anyway).
    progress: called with a byte count as each resident unit is loaded (e.g. a tqdm's update).
    expert_reads (MoE packs): streamed blocks read only the experts their tokens select (False:
    stream whole layer files, the dense-read baseline). expert_cache: bytes of the budget reserved
    for the LRU cache of streamed experts (default 0; the cache also gets what the plan leaves).
    threads: torch's CPU threads for this process (default: $LAYERPACK_THREADS, else the physical
    cores this process may use; threads.py). On a machine busy with other work, 1 can be much faster."""
    from .remote import is_repo_id, no_such_pack, open_remote

    apply_threads(threads)  # a bad value fails before any file is opened

    if is_repo_id(path):
        pack: Pack = open_remote(os.fspath(path), revision=revision, token=token, verify=verify)
    elif not os.path.exists(path):
        raise no_such_pack(path)
    else:
        pack = Pack(path)
        if verify:
            problems = pack.verify()
            if problems:
                raise FormatError(f"{pack.path}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    try:
        return LayeredModel(pack, device=device, dtype=dtype, max_memory=max_memory, context=context,
                            prefetch_depth=prefetch_depth, page_cache=page_cache, progress=progress,
                            expert_reads=expert_reads, expert_cache=expert_cache, threads=threads)
    except BaseException:
        pack.close()
        raise


def _logical_bytes(info) -> int:
    """Bytes of a stored tensor once in memory (after zstd decompression, if compressed)."""
    return math.prod(info.out_shape) * itemsize(info.out_dtype)
