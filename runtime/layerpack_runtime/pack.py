"""Opening a pack: manifest + layer files, with the cheap checks always and sha256 on demand."""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Iterable

import torch

from .errors import FormatError, LayerpackError
from .format import DTYPE_NAMES, SUFFIX_ABSMAX, SUFFIX_CODES, SUFFIX_OUTLIER_IDX, SUFFIX_OUTLIER_VAL
from .manifest import LayerEntry, Manifest
from .quant import dequantize_weight
from .safetensors_io import SafetensorsFile
from .validate import check_layer_file, check_payload, pack_roots, payload_tables, resolve_in_pack
from .value_scan import ValueScan, check_values, value_checks

HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: str, progress: Callable[[int], None] | None = None,
                inspect: Callable[[int, memoryview], None] | None = None) -> str:
    """The file's sha256; `inspect(offset, chunk)` sees every chunk hashed (verify's value checks)."""
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    offset = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on large buffers: hashing threads overlap
            if inspect:
                inspect(offset, view[:n])
            offset += n
            if progress:
                progress(n)
    return h.hexdigest()


def stored_names(entry) -> list[str]:
    """Names of the tensors stored in a layer file for one logical tensor entry."""
    if entry.scheme == "none":
        return [entry.name]
    names = [entry.name + SUFFIX_CODES, entry.name + SUFFIX_ABSMAX]
    if entry.outliers:
        names += [entry.name + SUFFIX_OUTLIER_IDX, entry.name + SUFFIX_OUTLIER_VAL]
    return names


class Pack:
    """A layerpack folder. Opening checks the manifest and (unless check_files=False, for tools
    that report every problem themselves) that every file exists with its size;
    each layer file's safetensors header is validated (and cross-checked with the manifest) the
    first time that file is used. `verify()` adds the full sha256 check."""

    def __init__(self, path: str | os.PathLike, check_files: bool = True, manifest: Manifest | None = None):
        """manifest: use this one instead of the folder's manifest.json (the converter evaluates a
        pack before it writes the manifest that makes the folder a pack)."""
        self.path = os.fspath(path)
        self.manifest = manifest if manifest is not None else Manifest.load(self.path)
        self.dtype = DTYPE_NAMES[self.manifest.quantization.dtype]
        self._headers: dict[str, SafetensorsFile] = {}
        self._roots = pack_roots(self.path)
        problems = self.check_presence() if check_files else []
        if problems:
            raise FormatError(f"{self.path}: {problems[0]}" + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))

    # -- integrity -----------------------------------------------------------------------
    def check_presence(self, only: set[str] | None = None) -> list[str]:
        """Problems with the files' presence and sizes (only: just these paths, e.g. a pipeline
        stage's own layers)."""
        problems = []
        for f in self.manifest.files:
            if only is not None and f.path not in only:
                continue
            try:
                p = resolve_in_pack(self.path, f.path, self._roots)
            except FormatError as e:
                problems.append(str(e))
                continue
            if not os.path.isfile(p):
                problems.append(f"{f.path}: missing")
            elif os.path.getsize(p) != f.size:
                problems.append(f"{f.path}: size {os.path.getsize(p)} != {f.size} in the manifest")
        return problems

    def verify(self, progress: Callable[[int], None] | None = None, payloads: bool = True) -> list[str]:
        """Every problem found (empty list = pack is intact): presence, sizes, sha256, that the
        runtime can run the architecture, headers, and (payloads=True) the payload checks of
        every quantized tensor's tables (validate.check_payload) and of every value
        (value_scan: no NaN/inf in unquantized tensors, no int8 code -128)."""
        from . import models

        problems = self.check_presence()
        bad = {p.split(":")[0] for p in problems}
        try:
            family = models.module_for(self.manifest.architecture.get("family"))
            args = family.ModelArgs.from_dict(self.manifest.architecture)
            for layer in self.manifest.layers:
                family.check_unit(args, layer.kind, {t.name for t in layer.tensors})
        except LayerpackError as e:
            problems.append(f"manifest.json: {e}")
        # One read of each file: hashed, and (payloads=True) every value checked on the way (value_scan).
        layer_of = {layer.file: layer for layer in self.manifest.layers}
        for f in self.manifest.files:
            if f.path in bad:
                continue
            layer, st, header_problem, scan = layer_of.get(f.path), None, None, None
            if layer is not None:
                try:
                    st = self.layer_file(layer)
                    scan = ValueScan(layer, st) if payloads else None
                except FormatError as e:
                    header_problem = str(e)
            digest = sha256_file(os.path.join(self.path, f.path), progress, scan.feed if scan else None)
            if digest != f.sha256:
                problems.append(f"{f.path}: sha256 mismatch (file is corrupt or was modified)")
            elif header_problem or (scan and scan.problem):
                problems.append(header_problem or scan.problem)
            elif st is not None and payloads:
                try:
                    self._check_payloads(layer, st)
                except FormatError as e:
                    problems.append(str(e))
        return problems

    def _check_payloads(self, layer: LayerEntry, st: SafetensorsFile) -> None:
        """verify's look inside the payloads: the tables check_payload inspects; in a compressed pack
        also every other frame, decompressed one tensor at a time (a corrupt or lying frame is found
        without holding more than one tensor)."""
        tables = payload_tables(layer)
        if self.manifest.quantization.compression != "none":
            checks = value_checks(layer)
            for name in st.tensors:
                if name not in tables or name in checks:
                    t = st.read([name])[name]
                    if name in checks:
                        check_values(layer.file, name, checks[name], t)
        check_payload(layer.tensors, st.read(tables), layer.file)

    # -- reading -------------------------------------------------------------------------
    def layer_file(self, layer: LayerEntry | str) -> SafetensorsFile:
        layer = self.manifest.layer(layer) if isinstance(layer, str) else layer
        if layer.file not in self._headers:
            resolve_in_pack(self.path, layer.file, self._roots)
            st = SafetensorsFile(os.path.join(self.path, layer.file))
            self._check_tensors(layer, st)
            self._headers[layer.file] = st
        return self._headers[layer.file]

    def _check_tensors(self, layer: LayerEntry, st: SafetensorsFile) -> None:
        check_layer_file(layer, st, self.manifest.quantization)

    def is_local(self, layer: LayerEntry | str) -> bool:
        """Whether the unit's file can be read now (a remote pack's may still be downloading)."""
        return True

    def close(self) -> None:
        """Release background work (a remote pack's downloads)."""

    def read_layer(self, layer: LayerEntry | str) -> dict[str, torch.Tensor]:
        """The stored tensors of one layer unit (quantized codes as stored), payload-checked."""
        layer = self.manifest.layer(layer) if isinstance(layer, str) else layer
        stored = self.layer_file(layer).read()
        check_payload(layer.tensors, stored, layer.file)
        return stored

    def layer_weights(self, layer: LayerEntry | str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Logical tensors of one layer unit, dequantized to `dtype` (default: the pack dtype)."""
        layer = self.manifest.layer(layer) if isinstance(layer, str) else layer
        stored = self.read_layer(layer)
        return {t.name: dequantize_weight(stored, t.name, _asdict(t), dtype or self.dtype) for t in layer.tensors}

    def layers(self) -> Iterable[LayerEntry]:
        return iter(self.manifest.layers)


def _asdict(t) -> dict:
    return {"scheme": t.scheme, "shape": t.shape, "block_size": t.block_size, "outliers": t.outliers}
