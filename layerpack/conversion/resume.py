"""Resuming an interrupted conversion: each finished unit leaves a small record in
OUT/.layerpack-partial (with the job's fingerprint), so a re-run after a crash or kill -9 skips it;
and the decision between a fresh start, a resume, nothing to do and a refusal."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict

from layerpack_runtime.errors import LayerpackError
from layerpack_runtime.format import FORMAT_VERSION, LAYERS_DIR, MANIFEST_FILE
from layerpack_runtime.manifest import FileEntry, LayerEntry, Quantization, TensorEntry
from layerpack_runtime.pack import sha256_file

from .. import __version__
from ..source import Source, read_json_object
from ..writer import TMP_MARK, write_text_atomic

PARTIAL_DIR = ".layerpack-partial"


class Partial:
    """Per-unit records of finished work, so a re-run after a crash skips it."""

    def __init__(self, out: str):
        self.dir = os.path.join(out, PARTIAL_DIR)

    def record_path(self, unit: str) -> str:
        return os.path.join(self.dir, f"{unit}.json")

    def fingerprint(self) -> str | None:
        p = os.path.join(self.dir, "job.json")
        return read_json_object(p).get("fingerprint") if os.path.isfile(p) else None

    def start(self, fingerprint: str) -> None:
        os.makedirs(self.dir, exist_ok=True)
        write_text_atomic(os.path.join(self.dir, "job.json"), json.dumps({"fingerprint": fingerprint}))

    def done(self, out: str, unit: str) -> tuple[LayerEntry, FileEntry] | None:
        p = self.record_path(unit)
        if not os.path.isfile(p):
            return None
        try:
            rec = read_json_object(p)
            f = FileEntry(**rec["file"])
            layer = LayerEntry(**{**rec["layer"], "tensors": [TensorEntry(**t) for t in rec["layer"]["tensors"]]})
        except (LayerpackError, TypeError, KeyError):
            return None
        path = os.path.join(out, f.path)
        # Re-hashing is far cheaper than re-quantizing, and catches a file damaged after the crash.
        if not os.path.isfile(path) or os.path.getsize(path) != f.size or sha256_file(path) != f.sha256:
            return None
        return layer, f

    def save(self, unit: str, layer: LayerEntry, f: FileEntry) -> None:
        write_text_atomic(self.record_path(unit), json.dumps({"layer": asdict(layer), "file": asdict(f)}, sort_keys=True))


def job_fingerprint(source: Source, quant: Quantization) -> str:
    """What a resumed run must share with the interrupted one: format, converter, quantization, source files."""
    files = []
    for rel in ["config.json"] + source.weight_files:
        st = os.stat(os.path.join(source.root, rel))
        files.append([rel, st.st_size, st.st_mtime_ns])
    job = {"format": FORMAT_VERSION, "converter": __version__, "quantization": quant.to_dict(), "source": source.provenance(), "files": files}
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


def prepare_out(out: str, overwrite: bool, fingerprint: str, quant: Quantization, source: Source) -> Partial | None:
    """Decide between fresh start, resume, nothing-to-do (returns None) and refusal."""
    partial = Partial(out)
    manifest_path = os.path.join(out, MANIFEST_FILE)
    if os.path.isdir(out) and os.listdir(out):
        if overwrite:
            if os.path.exists(manifest_path):
                os.remove(manifest_path)  # first: the folder stops being a pack before anything else changes
            shutil.rmtree(partial.dir, ignore_errors=True)
        elif os.path.isfile(manifest_path):
            old = read_json_object(manifest_path)
            old_sizes = {f.get("path"): f.get("size") for f in old.get("source", {}).get("files", [])}
            same = old.get("quantization") == quant.to_dict() and all(
                old_sizes.get(rel) == os.path.getsize(os.path.join(source.root, rel)) for rel in source.weight_files)
            if same:
                return None
            raise LayerpackError(f"{out}: already holds a different complete pack; pass --overwrite to replace it")
        elif partial.fingerprint() is None:
            raise LayerpackError(f"{out}: exists and is not empty; choose a new folder or pass --overwrite")
        elif partial.fingerprint() != fingerprint:
            raise LayerpackError(f"{out}: holds an unfinished conversion with other options or source; pass --overwrite to start over")
    os.makedirs(os.path.join(out, LAYERS_DIR), exist_ok=True)
    for d in (out, os.path.join(out, LAYERS_DIR)):
        for name in os.listdir(d):
            if TMP_MARK in name:  # debris of a killed run
                os.remove(os.path.join(d, name))
    partial.start(fingerprint)
    return partial