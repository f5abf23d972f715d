"""Building a pack from a Hugging Face checkpoint: plan, resume or start, convert every unit, then
the manifest, written last and atomically, so a folder without manifest.json is never mistaken for
a pack. Crash safety: each layer file is written under a temporary name and renamed; a record per
finished unit lets a re-run skip it (resume.py).

Quality measurement (convert --eval) is not done here but by the `quality` function the caller
passes (layerpack.convert passes evaluate.pack_quality): evaluation converts its reference through
this module, so this module must not depend on evaluation."""
from __future__ import annotations

import contextlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import DTYPE_TO_NAME, MANIFEST_FILE, unit_file
from layerpack_runtime.manifest import Manifest

from ..schema import validate_manifest
from ..writer import fsync_dir, write_text_atomic
from .calibration import calibration_stats
from .faults import NO_FAULTS, ConvertFaults
from .finish import build_manifest, copy_sidecars, remove_stale_layers, warn_no_tokenizer
from .job import Job, plan_job
from .options import ConvertOptions
from .resume import PARTIAL_DIR, job_fingerprint, prepare_out
from .units import convert_units

# quality(pack_dir, manifest, source_root, source_dtype, scratch_dir) -> the manifest's `quality`
# object. It runs before manifest.json exists (from the in-memory manifest); source_dtype is the
# source's dtype name (None: one the runtime cannot compute in, e.g. fp8); scratch_dir is a folder
# under the pack's partial folder for a reference pack, removed afterwards.
QualityMeasure = Callable[[str, Manifest, str, "str | None", str], dict]


def build_pack(src: str, out: str, opts: ConvertOptions, *, quality: QualityMeasure | None = None,
               faults: ConvertFaults = NO_FAULTS) -> Manifest:
    """Convert checkpoint `src` (folder or Hub repo id) into the pack folder `out`; with `quality`,
    measure the pack and store the result in its manifest (also for an existing complete pack of
    the same job without one). `faults`: interruption points for the resume tests."""
    opts.check()
    job = plan_job(src, opts)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise LayerpackError(f"{out}: cannot create output folder ({e.strerror})") from None
    partial = prepare_out(out, opts.overwrite, job_fingerprint(job.source, job.quant), job.quant, job.source)
    if partial is None:
        manifest = Manifest.load(out)
        if quality is not None and manifest.quality is None:  # the pack exists; only its measurement is missing
            manifest.quality = _measure(quality, job, out, manifest)
            validate_manifest(manifest.to_dict())
            write_text_atomic(os.path.join(out, MANIFEST_FILE), manifest.to_json())
        elif not opts.quiet:
            print(f"{out}: already a complete pack of this source with these options; nothing to do")
        return manifest

    results = {u.name: rec for u in job.units if (rec := partial.done(out, u.name))}
    if job.calibration_ids is not None and len(results) < len(job.units):
        job.stats = calibration_stats(job, partial, opts.quiet)
    with ThreadPoolExecutor(1, thread_name_prefix="hash-source") as hasher:
        digests = convert_units(job, [u for u in job.units if u.name not in results], out, partial, results, opts.quiet,
                                hasher, faults)
        src_files = [d.result() for d in digests]
    sidecars = copy_sidecars(job.source, out)
    manifest = build_manifest(job, [results[u.name] for u in job.units], sidecars, src_files)
    remove_stale_layers(out, {unit_file(u.name) for u in job.units})
    if quality is not None:  # every file is final; the manifest that makes the folder a pack comes after
        manifest.quality = _measure(quality, job, out, manifest)
        validate_manifest(manifest.to_dict())
    write_text_atomic(os.path.join(out, MANIFEST_FILE), manifest.to_json())
    fsync_dir(out)
    shutil.rmtree(partial.dir, ignore_errors=True)
    if not opts.quiet and not any(f.path == "tokenizer.json" for f in sidecars):
        warn_no_tokenizer(src, job.source)
    return manifest


def _measure(quality: QualityMeasure, job: Job, out: str, manifest: Manifest) -> dict:
    source_dtype = DTYPE_TO_NAME.get(job.index.dtype_of(job.units[0].tensors["embed.weight"]))  # None: e.g. fp8, needs --dtype
    scratch = os.path.join(out, PARTIAL_DIR, "reference")
    try:
        return quality(out, manifest, job.source.root, source_dtype, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):  # an existing pack being evaluated: leave no partial folder behind
            os.rmdir(os.path.dirname(scratch))
