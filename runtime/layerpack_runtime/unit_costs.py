"""What a unit range costs in memory: per unit (stored, dequantized and streamed bytes), the KV
cache, a step's activations, the runtime's own memory, and the minimum budget for a workload - the
numbers budget.plan() turns into a plan. A mixin of UnitRange (unitrange.py), which holds the pack,
its units and the options these read.
"""
from __future__ import annotations

import math

import torch

from .budget import UnitCost, minimum_budget
from .decode_step import static_length
from .format import UNIT_EMBED, UNIT_HEAD
from .options import Workload
from .pack import stored_names
from .qweight import CHUNK_ELEMS
from .safetensors_io import itemsize
from .streaming import slot_bytes

# What a run holds besides the model's data, counted by the plan (Plan.runtime_bytes) so that the
# process's peak RSS above its import baseline stays within max_memory (tests/runtime/test_memory_budget.py):
# - `tokenizers` holds about 11-12x the size of tokenizer.json in native memory at its peak while
#   loading (measured: SmolLM2's 3.5 MB file -> 42 MB, Gemma 3's 33 MB -> 372 MB);
# - torch's first-use allocations on CPU (intra-op thread pool, kernel workspaces, allocator arenas
#   of the reader threads): 12-30 MB measured on the first forward (more with MoE routing and expert
#   reader threads), whatever the model size.
TOKENIZER_BYTES_PER_FILE_BYTE = 12
TORCH_WORKING_BYTES = 32 * 2**20


class RangeCosts:
    """Memory costs of a UnitRange (see the module docstring)."""

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
        # the stream slot: the file's data region, + zstd tensors decompressed (streaming.slot_layout);
        # a MoE block streams its dense part, its experts are read one by one (experts.py); read past
        # the page cache, a slot also holds O_DIRECT's alignment headroom
        streamed = slot_bytes(self.experts.stream_view(name, st) if self.experts is not None else st,
                              direct=not getattr(self, "page_cache", True))
        if name == UNIT_EMBED and self._embed_rows_from_file():
            streamed = 0  # not streamed whole: rows are read as needed (FileRows)
        return UnitCost(name, stored, dequantized, streamed)

    def _embed_rows_from_file(self) -> bool:
        """An untied, unquantized, uncompressed embedding can serve rows straight from its file."""
        if self.args.tie_word_embeddings or UNIT_EMBED not in self._files:
            return False
        info = self._files[UNIT_EMBED].tensors.get("embed.weight")
        return info is not None and info.logical_dtype is None and len(info.shape) == 2

    def kv_bytes(self, tokens: int) -> int:
        a = self.args
        return 2 * len(self.block_units) * a.num_kv_heads * a.head_dim * tokens * torch.empty(0, dtype=self.dtype).element_size()

    def activation_bytes(self, tokens: int, batch: int = 1) -> int:
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

    @property
    def fixed_bytes(self) -> int:
        """What the plan holds besides weights and stream buffers: KV cache, activations, runtime."""
        return self.plan.kv_bytes + self.plan.activation_bytes + self.plan.runtime_bytes

    def workload_bytes(self, workload: Workload) -> tuple[int, int]:
        """(KV cache bytes, peak activation bytes) of a workload on this range: its cache, and the
        larger of its prefill step and its decode step (one position per row, attending over the
        whole context)."""
        prefill = self.activation_bytes(workload.step_tokens, workload.step_batch)
        context = static_length(workload.context) if self.static_decode else workload.context  # the static cache's columns
        decode = self.activation_bytes(workload.batch, workload.batch) + self.args.num_heads * workload.batch * context * 4
        return self.kv_bytes(workload.kv_tokens + workload.batch * (context - workload.context)), max(prefill, decode)

    def runtime_bytes(self) -> int:
        """Memory a run takes besides the model's data: the pack's tokenizer once loaded (by the
        range that starts with the embedding: the one that owns the text), and torch's first-use
        working memory (see TORCH_WORKING_BYTES)."""
        size = next((f.size for f in self.manifest.files if f.path == "tokenizer.json"), 0) if self.has_embed else 0
        return size * TOKENIZER_BYTES_PER_FILE_BYTE + TORCH_WORKING_BYTES

    def _priority(self) -> list[str]:
        # The embedding is needed every step (and is the head when tied), then the head, then blocks;
        # an embedding that can serve rows from its file comes last: keeping it saves only a few reads.
        if self._embed_rows_from_file():
            order = [UNIT_HEAD, *self.block_units, UNIT_EMBED]
        else:
            order = [UNIT_EMBED, UNIT_HEAD, *self.block_units]
        return [u for u in order if u in self._layers]

    def _required(self) -> tuple[str, ...]:
        return (UNIT_EMBED,) if self.args.tie_word_embeddings and UNIT_EMBED in self._layers else ()  # a tied embedding is also the head

    def minimum_memory(self, workload: Workload | None = None) -> int:
        """The smallest `max_memory` this range runs its workload with (default: the declared one;
        what the error for too small a budget states)."""
        reserve = self.expert_cache if self.experts is not None else 0
        kv, act = self.workload_bytes(workload or self.workload)
        return minimum_budget([self._unit_cost(n) for n in self.units], kv, act, self.options.prefetch_depth or 1,
                              self._required(), reserve, self.runtime_bytes())


def _logical_bytes(info) -> int:
    """Bytes of a stored tensor once in memory (after zstd decompression, if compressed)."""
    return math.prod(info.out_shape) * itemsize(info.out_dtype)
