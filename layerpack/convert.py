"""`layerpack convert`: HF checkpoint -> layerpack (conversion/), and with --eval the pack's quality
measured (evaluate.pack_quality) and stored in its manifest before the manifest is written."""
from __future__ import annotations

import functools

from layerpack_runtime.manifest import Manifest

from .conversion.build import build_pack
from .conversion.faults import NO_FAULTS, ConvertFaults
from .conversion.options import ConvertOptions

__all__ = ["ConvertOptions", "convert"]


def convert(src: str, out: str, opts: ConvertOptions | None = None, *, faults: ConvertFaults = NO_FAULTS) -> Manifest:
    """Convert checkpoint `src` (a folder or a Hub repo id) into the pack folder `out`.
    faults: interruption points for the resume tests (conversion/faults.py)."""
    opts = opts or ConvertOptions()
    opts.check()
    quality = None
    if opts.evaluate:
        from .evaluate import pack_quality, read_text

        text = read_text(opts.eval_text)  # a bad --eval-text fails now, not after the conversion
        quality = functools.partial(pack_quality, text=text, quiet=opts.quiet)
    return build_pack(src, out, opts, quality=quality, faults=faults)
