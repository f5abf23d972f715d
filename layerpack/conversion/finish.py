"""The end of a conversion: sidecar files copied, layer files of an older conversion removed, and
the manifest that makes the folder a pack."""
from __future__ import annotations

import os
import sys

from layerpack_runtime.format import FORMAT_NAME, FORMAT_VERSION, FORMAT_VERSION_CALIBRATED, LAYERS_DIR, SIDECAR_FILES
from layerpack_runtime.manifest import FileEntry, LayerEntry, Manifest

from .. import __version__
from ..schema import validate_manifest
from ..source import Source
from ..writer import write_bytes_atomic
from .job import Job


def copy_sidecars(source: Source, out: str) -> list[FileEntry]:
    entries = []
    for name in SIDECAR_FILES:
        p = os.path.join(source.root, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                size, sha = write_bytes_atomic(os.path.join(out, name), f.read())
            entries.append(FileEntry(name, size, sha))
    return entries


def remove_stale_layers(out: str, keep: set[str]) -> None:
    d = os.path.join(out, LAYERS_DIR)
    for name in os.listdir(d):
        if f"{LAYERS_DIR}/{name}" not in keep:
            os.remove(os.path.join(d, name))


def build_manifest(job: Job, done: list[tuple[LayerEntry, FileEntry]], sidecars: list[FileEntry], src_files: list[dict]) -> Manifest:
    total_bytes = sum(f.size for _, f in done)
    params = sum(l.params for l, _ in done)
    m = Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION_CALIBRATED if job.quant.calibration is not None else FORMAT_VERSION,
        created_by=f"layerpack {__version__}",
        source={**job.source.provenance(), "files": src_files},
        architecture=job.arch,
        quantization=job.quant,
        layers=[l for l, _ in done],
        files=sorted([f for _, f in done] + sidecars, key=lambda f: f.path),
        totals={"params": params, "layer_bytes": total_bytes, "bits_per_param": round(8 * total_bytes / params, 4)},
    )
    validate_manifest(m.to_dict())
    return m


def warn_no_tokenizer(src: str, source: Source) -> None:
    """A pack without tokenizer.json runs on token ids only: say so now, not at the first text prompt."""
    only_sp = os.path.isfile(os.path.join(source.root, "tokenizer.model"))
    print(f"warning: {src} has no tokenizer.json" + (" (only a sentencepiece tokenizer.model, which the runtime does not read)" if only_sp else "")
          + "; the pack takes token ids but no text prompts. Add the model's tokenizer.json to the source and convert again",
          file=sys.stderr)
