"""`layerpack eval`: what a pack costs in quality, and the quality section of its manifest and model card.

The measurement itself is the runtime's (layerpack_runtime.evaluate: sliding-window perplexity, KL
and top-1 agreement against a reference). This module resolves what the user names: the text (the
default pydoc_data.topics slice, or a file) and the reference, which is either a pack or a Hugging
Face checkpoint folder. A checkpoint is converted unquantized (its own dtype) into a temporary pack
and run by the same runtime, so the comparison isolates the quantization: both sides share the
model code and compute dtype, and the runtime's parity with transformers is tested separately.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.evaluate import (DEFAULT_MAX_TOKENS, DEFAULT_STRIDE, DEFAULT_WINDOW, EvalResult, default_text,
                                        encode_text, evaluate, windows)
from layerpack_runtime.format import MANIFEST_FILE, SCHEME_NONE
from layerpack_runtime.loader import load
from layerpack_runtime.manifest import Manifest
from layerpack_runtime.threads import resolve_threads

from .progress import progress_bar
from .textfile import read_text_file

DEFAULT_EVAL_DTYPE = "fp32"  # measures the weights, not the compute dtype (and is ~9x faster than bf16 on CPUs)


def read_text(path: str | None) -> tuple[str, str]:
    """(text, id): the default text, or the UTF-8 file at `path` (its id is the file name)."""
    if path is None:
        return default_text()
    return read_text_file(path, "--text")


@contextlib.contextmanager
def reference_model(path: str | None, **load_kw):
    """The reference as a LayeredModel: a pack folder as it is, a Hugging Face checkpoint folder
    converted unquantized into a temporary pack (deleted afterwards)."""
    if path is None:
        yield None
        return
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        yield load(path, **load_kw)
        return
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise LayerpackError(f"--reference {path}: neither a pack (manifest.json) nor a Hugging Face checkpoint folder (config.json)")
    from .conversion.build import build_pack
    from .conversion.options import ConvertOptions

    tmp = tempfile.mkdtemp(prefix="layerpack-reference-")
    try:
        build_pack(path, os.path.join(tmp, "pack"), ConvertOptions(quant=SCHEME_NONE, quiet=True))
        yield load(os.path.join(tmp, "pack"), **load_kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def evaluate_model(model, text: str, max_tokens: int | None = DEFAULT_MAX_TOKENS, reference=None,
                   window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE, quiet: bool = False) -> EvalResult:
    """Tokenize `text` with the model's tokenizer and evaluate (with a progress bar on a terminal)."""
    windows(2, window, stride)  # bad window/stride: an error before any work
    ids = encode_text(model, text, max_tokens)
    limit = model.args.max_position_embeddings
    if limit and window > limit:  # a short-context model: the window is its context, the stride at most half of it
        window, stride = limit, min(stride, limit // 2)
    total = sum(e - f for _, e, f in windows(len(ids), window, stride)) if len(ids) >= 2 else 0
    with progress_bar(total, "eval", quiet, unit="tok") as bar:
        return evaluate(model, ids, window, stride, reference, progress=bar.update)


def evaluate_pack(pack: str, text_file: str | None = None, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                  reference: str | None = None, device: str = "cpu", dtype: str | None = DEFAULT_EVAL_DTYPE,
                  max_memory=None, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE,
                  quiet: bool = False, threads: int | None = None) -> tuple[EvalResult, str]:
    """`layerpack eval`: (result, text id). Text and reference are checked before any model loads."""
    if max_tokens is not None and max_tokens < 2:
        raise LayerpackError(f"--max-tokens must be at least 2, not {max_tokens}")
    resolve_threads(threads, "--threads")  # a bad --threads / $LAYERPACK_THREADS fails before the text is read
    text, text_id = read_text(text_file)
    if reference is not None and not os.path.isdir(reference):
        raise LayerpackError(f"--reference {reference}: no such folder (a pack or a Hugging Face checkpoint folder)")
    load_kw = dict(device=device, dtype=dtype, max_memory=max_memory, context=window, threads=threads)
    model = load(pack, **load_kw)
    with reference_model(reference, **load_kw) as ref:
        return evaluate_model(model, text, max_tokens, ref, window, stride, quiet), text_id


def pack_quality(pack_dir: str, manifest: Manifest, source_root: str, source_dtype: str | None, scratch_dir: str, *,
                 text: tuple[str, str], quiet: bool = False) -> dict:
    """convert --eval: the manifest's `quality` for the pack just converted into `pack_dir` (run from
    the in-memory `manifest`, before manifest.json exists): perplexity on `text` ((text, id), see
    read_text) and, unless the pack holds the source's own values, KL and top-1 agreement against
    the source checkpoint converted unquantized in its own dtype (source_dtype; None: the pack's)
    into `scratch_dir`."""
    from layerpack_runtime.loader import LayeredModel
    from layerpack_runtime.pack import Pack

    from .conversion.build import build_pack
    from .conversion.options import ConvertOptions

    q = manifest.quantization
    same_as_source = q.scheme == SCHEME_NONE and q.dtype == source_dtype
    model = LayeredModel(Pack(pack_dir, manifest=manifest), dtype=DEFAULT_EVAL_DTYPE)
    ref, desc = None, None
    if not same_as_source:
        ref_dtype = source_dtype or q.dtype
        build_pack(source_root, scratch_dir, ConvertOptions(quant=SCHEME_NONE, dtype=ref_dtype, overwrite=True, quiet=True))
        ref, desc = load(scratch_dir, dtype=DEFAULT_EVAL_DTYPE), f"source checkpoint, unquantized ({ref_dtype})"
    result = evaluate_model(model, text[0], reference=ref, quiet=quiet)
    return quality_record(manifest, result, text[1], DEFAULT_EVAL_DTYPE, desc)


def quality_record(manifest: Manifest, result: EvalResult, text_id: str, dtype: str, reference: str | None) -> dict:
    """The manifest's `quality` object (schemas/manifest.schema.json) for an evaluated pack."""
    t = manifest.totals
    return {
        "scheme": manifest.quantization.scheme,
        "outlier_fraction": manifest.quantization.outlier_fraction,
        "bits_per_param": t.get("bits_per_param") or round(8 * t["layer_bytes"] / t["params"], 4),
        "perplexity": _sig(result.perplexity),
        "kl": _sig(result.kl),
        "top1_agreement": _sig(result.top1_agreement),
        "reference": reference,
        "reference_perplexity": _sig(result.reference_perplexity),
        "text": text_id,
        "tokens": result.tokens,
        "window": result.window,
        "stride": result.stride,
        "compute_dtype": dtype,
    }


def _sig(x: float | None, digits: int = 7) -> float | None:
    """Round to significant digits (a KL of 2e-4 keeps its precision; the manifest stays readable)."""
    return None if x is None else float(f"{x:.{digits}g}")


def format_result(result: EvalResult, text_id: str) -> str:
    lines = [f"text: {text_id}", f"tokens scored: {result.tokens} (window {result.window}, stride {result.stride})",
             f"perplexity: {result.perplexity:.4f}"]
    if result.kl is not None:
        lines += [f"reference perplexity: {result.reference_perplexity:.4f}",
                  f"KL(reference || pack): {result.kl:.6f} nats/token", f"top-1 agreement: {100 * result.top1_agreement:.2f}%"]
    return "\n".join(lines)


def quality_card_lines(manifest: Manifest) -> list[str]:
    """Markdown lines of the model card's "Quality" section, from the manifest's `quality` object
    (written by `layerpack convert --eval`); [] for a pack without one."""
    q = getattr(manifest, "quality", None)
    if not q:
        return []
    scheme = q["scheme"] + (f" + outliers {q['outlier_fraction']:g}" if q.get("outlier_fraction") else "")
    lines = ["## Quality", "",
             f"Measured by `layerpack convert --eval` on {q['text']}: {q['tokens']} tokens, sliding window "
             f"{q['window']} / stride {q['stride']}, {q['compute_dtype']} compute.", "",
             "| scheme | bits/param | perplexity | KL vs reference (nats/token) | top-1 agreement |",
             "|---|---|---|---|---|"]
    kl = "—" if q.get("kl") is None else f"{q['kl']:.5f}"
    top1 = "—" if q.get("top1_agreement") is None else f"{100 * q['top1_agreement']:.2f}%"
    lines.append(f"| {scheme} | {q['bits_per_param']:.3f} | {q['perplexity']:.3f} | {kl} | {top1} |")
    if q.get("reference_perplexity") is not None:
        lines += ["", f"Reference: {q['reference']}, perplexity {q['reference_perplexity']:.3f} on the same tokens."]
    lines.append("")
    return lines
