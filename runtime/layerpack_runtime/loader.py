"""`load(pack)` -> a LayeredModel that runs a layerpack unit by unit and generates text.

A LayeredModel is the whole pack as one unit range (unitrange.py: which units stay resident within
`max_memory` and which stream from disk, their weights, the forward over them) plus text
generation (text.py). A forward pass runs the embed unit, each block unit and the head unit in
turn, with a KV cache of every block. A pipeline of stage processes, each holding some of the
units, runs the same ranges (stages.py).
"""
from __future__ import annotations

import atexit
import gc
import os

import torch

from . import models
from .cache import KVCache
from .errors import FormatError, LayerpackError
from .decode_step import StaticDecoder, attention_backends, describe, graph_ineligible
from .generate import GenerationStats
from .options import RunOptions, Workload, run_options
from .pack import Pack
from .text import Prompt, TextGenerator, encode_prompt  # noqa: F401 - Prompt: part of this module's API
from .tokenizer import PackTokenizer
from .threads import apply_threads
from .unit_costs import TOKENIZER_BYTES_PER_FILE_BYTE, TORCH_WORKING_BYTES  # noqa: F401 - re-exported
from .unitrange import DTYPE_ALIASES, UnitRange  # noqa: F401 - re-exported


class LayeredModel(TextGenerator, UnitRange):
    """A pack, ready to run: every unit (see UnitRange for how weights are obtained) and text."""

    def __init__(self, pack: Pack, options: RunOptions | None = None, *, progress=None, **fields):
        opts = run_options(options, **fields)
        _skip_exit_collection()
        self.threads = apply_threads(opts.threads)  # torch's CPU threads (threads.py: explicit > $LAYERPACK_THREADS > physical cores)
        self.last_stats = GenerationStats()
        UnitRange.__init__(self, pack, opts, progress=progress)
        if opts.decode == "graph" and graph_ineligible(self):
            raise LayerpackError(f"--decode graph is not available for this model: {graph_ineligible(self)}")

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
        with attention_backends(self.device):
            if T == 1 and attention_mask is None and self.static_decode and type(cache) is KVCache and cache.plain():
                return self._static_decoder(cache).step(ids, cache).float()
            mask = None if attention_mask is None else torch.as_tensor(attention_mask, device=self.device).reshape(B, T)
            steps = self.begin_step(cache, (B, T), mask)
            logits = self.run(ids, cache, steps, last_only)
            cache.commit(T, mask)
            return logits.float()

    def _static_decoder(self, cache: KVCache) -> StaticDecoder:
        """The fixed-shape decode steps of this cache's generation (captured as a CUDA graph where
        decode_step.graph_ineligible finds nothing against it), made at its first decode step."""
        decoder = cache.decoder
        if decoder is None or decoder.model is not self:
            graph = self.options.decode != "static" and graph_ineligible(self) is None
            decoder = cache.decoder = StaticDecoder(self, cache, graph)
        return decoder

    def decode_description(self) -> str:
        """How decode steps run, and why (--stats)."""
        return describe(self, self.options.decode)

    def logits(self, input_ids) -> torch.Tensor:
        """Logits [B, T, vocab] (float32) of a whole sequence, without a persistent cache."""
        return self.forward(input_ids)


_exit_hook: list[bool] = []


def _freeze_heap() -> None:
    gc.freeze()


def _skip_exit_collection() -> None:
    """Once per process that makes a model: at exit, move every object then alive into the
    collector's permanent generation (gc.freeze), so that the interpreter's shutdown collections do
    not walk torch's ~170k objects again. Measured (scripts/bench_startup.py): exit after a SmolLM2
    generation 0.5-1.0 s -> ~0.25 s, a fifth of a 128-token run's whole-process time. Everything
    else still happens at exit: atexit handlers (this one runs before those registered earlier,
    e.g. torch's), weakref.finalize callbacks, stdio flushing and module teardown, whose reference
    counting frees what is not in a cycle. What is skipped is only the freeing of cyclic garbage
    that was alive at exit, which the OS reclaims; Python does not promise finalizers for objects
    alive at exit either."""
    if not _exit_hook:
        _exit_hook.append(True)
        atexit.register(_freeze_heap)


def open_pack(path: str | os.PathLike, verify: bool = False, revision: str | None = None, token=None) -> Pack:
    """A pack folder, or a Hub repo id "owner/name" (needs huggingface_hub: the manifest and
    tokenizer are fetched, then the layer files download in execution order while the model runs,
    into the HF cache; remote.py). verify: check every file's sha256 first (sizes and headers are
    always checked; a remote pack always hashes the files it downloads, and with verify also those
    it finds in the cache). revision / token: for a repo id (token default: HF_TOKEN or the saved login)."""
    from .hubnames import is_repo_id, no_such_pack  # torch-free; remote.py (hub clients) only for a repo id

    if is_repo_id(path):
        from .remote import open_remote

        return open_remote(os.fspath(path), revision=revision, token=token, verify=verify)
    if not os.path.exists(path):
        raise no_such_pack(path)
    pack = Pack(path)
    if verify:
        problems = pack.verify()
        if problems:
            pack.close()
            raise FormatError(f"{pack.path}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return pack


def load(path: str | os.PathLike, options: RunOptions | None = None, *, verify: bool = False, revision: str | None = None,
         token=None, progress=None, context: int | None = None, **fields) -> LayeredModel:
    """Open the pack at `path` (a folder or a Hub repo id; see open_pack) and prepare it to run.

    options: a RunOptions, and/or its fields by keyword: device, dtype (default: the pack's),
    max_memory ("2GiB", "110MB", bytes; None: hold everything - units that do not fit stream from
    disk every step, prefetched `prefetch_depth` units ahead), page_cache (False drops streamed units
    from the OS page cache after each read: for streams larger than RAM), expert_reads /
    expert_cache (MoE packs), threads (torch's CPU threads; default $LAYERPACK_THREADS, else the
    physical cores), weight_form (auto | stored | dequantized: qweight.choose_form), workload.
    workload / context: what the run will ask (options.Workload); the memory plan is made once, for
    it. `context=N` declares Workload(context=N). Without either, the plan starts for 256 tokens and
    a call that needs more replans (keeping fewer units resident) - a convenience for the Python
    API; the CLI and the server always declare theirs.
    progress: called with a byte count as each resident unit is loaded (e.g. a tqdm's update)."""
    opts = run_options(options, context=context, **fields)
    apply_threads(opts.threads)  # a bad value fails before any file is opened
    pack = open_pack(path, verify=verify, revision=revision, token=token)
    try:
        return LayeredModel(pack, opts, progress=progress)
    except BaseException:
        pack.close()
        raise


def load_for_prompt(path: str | os.PathLike, prompt, options: RunOptions | None = None, *, max_new_tokens: int = 256,
                    chat: bool = False, verify: bool = False, revision: str | None = None, token=None,
                    progress=None, **fields) -> tuple[LayeredModel, list[int]]:
    """load() for one known prompt: it is tokenized first (with the pack's tokenizer), so that the
    workload - the prompt plus max_new_tokens - is declared and the plan made once, exactly for it
    (what `layerpack run` does). Returns the model and the prompt's token ids."""
    opts = run_options(options, **fields)
    apply_threads(opts.threads)
    pack = open_pack(path, verify=verify, revision=revision, token=token)
    try:
        models.module_for(pack.manifest.architecture.get("family"))  # an unsupported family: said before anything else
        tokenizer: list[PackTokenizer] = []  # made only for a text prompt (token ids need none)

        def get_tokenizer() -> PackTokenizer:
            tokenizer.append(PackTokenizer(pack.path, pack.manifest.architecture))
            return tokenizer[0]

        ids = encode_prompt(get_tokenizer, prompt, chat)
        if not ids:
            raise LayerpackError("the prompt encodes to no tokens; give some text")
        workload = Workload.for_generation([len(ids)], max_new_tokens)
        model = LayeredModel(pack, opts.with_(workload=workload), progress=progress)
        if tokenizer:
            model._tokenizer = tokenizer[0]
        return model, ids
    except BaseException:
        pack.close()
        raise
