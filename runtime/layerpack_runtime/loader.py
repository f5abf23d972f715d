"""`load(pack)` -> a LayeredModel that runs a layerpack unit by unit and generates text.

A LayeredModel is the whole pack as one unit range (unitrange.py: which units stay resident within
`max_memory` and which stream from disk, their weights, the forward over them) plus text
generation (text.py). A forward pass runs the embed unit, each block unit and the head unit in
turn, with a KV cache of every block. A pipeline of stage processes, each holding some of the
units, runs the same ranges (stages.py).
"""
from __future__ import annotations

import os

import torch

from .cache import KVCache
from .errors import FormatError
from .generate import GenerationStats
from .pack import Pack
from .text import Prompt, TextGenerator  # noqa: F401 - Prompt: part of this module's API
from .threads import apply_threads
from .unitrange import DTYPE_ALIASES, TOKENIZER_BYTES_PER_FILE_BYTE, TORCH_WORKING_BYTES, UnitRange  # noqa: F401 - re-exported


class LayeredModel(TextGenerator, UnitRange):
    """A pack, ready to run: every unit (see UnitRange for how weights are obtained) and text."""

    def __init__(self, pack: Pack, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                 max_memory=None, context: int = 256, prefetch_depth: int = 1, page_cache: bool = True,
                 progress=None, expert_reads: bool = True, expert_cache=None, threads: int | None = None):
        self.threads = apply_threads(threads)  # torch's CPU threads (threads.py: explicit > $LAYERPACK_THREADS > physical cores)
        self.last_stats = GenerationStats()
        UnitRange.__init__(self, pack, device, dtype, max_memory, context, prefetch_depth, page_cache, progress,
                           expert_reads, expert_cache)

    def __repr__(self) -> str:
        a = self.args
        return (f"LayeredModel({os.path.basename(self.pack.path)!r}, family={a.family}, layers={a.num_layers}, "
                f"hidden={a.hidden_size}, scheme={self.manifest.quantization.scheme}, dtype={self.dtype}, device={self.device}; "
                f"{self.plan.describe()})")

    @torch.inference_mode()
    def forward(self, input_ids, cache: KVCache | None = None, attention_mask=None, last_only: bool = False) -> torch.Tensor:
        """Run new tokens [B, T] (or [T]) through every unit; returns float32 logits [B, T or 1, vocab].

        With a cache, the tokens continue the cached sequence (their keys/values are appended);
        without one, they are a whole sequence. attention_mask [B, T] (1 = token, 0 = left
        padding) is needed only for padded prompts."""
        ids = self.check_ids(input_ids)
        B, T = ids.shape
        if cache is None:
            cache = self.new_cache(B, T)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=self.device).reshape(B, T)
        steps = self.begin_step(cache, (B, T), mask)
        logits = self.run(ids, cache, steps, last_only)
        cache.commit(T, mask)
        return logits.float()

    def logits(self, input_ids) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of a whole sequence, without a persistent cache."""
        return self.forward(input_ids)


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
