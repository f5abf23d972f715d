"""The pack manifest: dataclasses and (de)serialisation. Reading validates first (validate/: every
field's type, range and cross-consistency) and only then builds the dataclasses. The toolkit
additionally validates against schemas/manifest.schema.json (the runtime cannot depend on
jsonschema); both must agree, and the tests hold them together."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import FormatError
from .format import MANIFEST_FILE, MAX_MANIFEST_BYTES
from .validate import check_manifest, is_inside, load_json, pack_roots, parse_version, safe_relpath  # noqa: F401 (re-exported)


@dataclass
class FileEntry:
    path: str      # relative, '/'-separated
    size: int
    sha256: str


@dataclass
class TensorEntry:
    name: str                  # logical canonical name, e.g. "attn.q.weight"
    shape: list[int]
    scheme: str                # "none" | "int8" | "nf4"
    block_size: int | None = None
    outliers: int = 0          # number of entries kept exactly
    rel_rms_error: float = 0.0  # ||W - dequant(quant(W))|| / ||W||, against the source values


@dataclass
class LayerEntry:
    name: str                  # "embed", "block.000", ..., "head"
    kind: str                  # "embed" | "block" | "head"
    file: str
    params: int
    tensors: list[TensorEntry]
    index: int | None = None   # block index for kind == "block"


@dataclass
class Quantization:
    scheme: str
    dtype: str                 # "bf16" | "fp16" | "fp32": unquantized tensors, outlier values, compute
    block_size: int | None = None
    outlier_fraction: float = 0.0
    compression: str = "none"
    zstd_level: int | None = None
    quantized_embedding: bool = False  # True only when a tied embedding doubles as the head
    outlier_rule: str | None = None    # 1.1, informational: how the converter chose the outliers (None: no outliers)
    head_outlier_fraction: float | None = None  # 1.1: the output head's own fraction (the tied embedding's); None: outlier_fraction
    calibration: dict | None = None    # 1.2, informational: provenance of convert --calibrate's statistics (None: not calibrated)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("outlier_rule", "head_outlier_fraction", "calibration"):
            if d[key] is None:
                del d[key]  # optional: manifests without them stay as in format 1.0
        return d


@dataclass
class Manifest:
    format: str
    format_version: str
    created_by: str
    source: dict[str, Any]
    architecture: dict[str, Any]
    quantization: Quantization
    layers: list[LayerEntry]
    files: list[FileEntry]
    totals: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] | None = None  # format 1.1: measured quality (`convert --eval`); absent when not measured

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["quantization"] = self.quantization.to_dict()
        if d["quality"] is None:
            del d["quality"]  # optional: a pack without a measurement has no key rather than a null
        return d

    def to_json(self) -> str:
        # sort_keys + fixed separators: identical manifests are identical bytes (deterministic packs).
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        check_manifest(d)
        return cls(
            format=d["format"],
            format_version=d["format_version"],
            created_by=d.get("created_by", ""),
            source=d["source"],
            architecture=d["architecture"],
            quantization=Quantization(**_known(Quantization, d["quantization"])),
            layers=[
                LayerEntry(**{**_known(LayerEntry, l), "tensors": [TensorEntry(**_known(TensorEntry, t)) for t in l["tensors"]]})
                for l in d["layers"]
            ],
            files=[FileEntry(**_known(FileEntry, f)) for f in d["files"]],
            totals=d.get("totals", {}),
            quality=d.get("quality") if isinstance(d.get("quality"), dict) else None,
        )

    @classmethod
    def load(cls, pack_dir: str | os.PathLike) -> "Manifest":
        path = os.path.join(pack_dir, MANIFEST_FILE)
        if not os.path.isdir(pack_dir):
            raise FormatError(f"{pack_dir}: " + ("not a directory (a pack is a folder)" if os.path.exists(pack_dir) else "no such pack directory"))
        if not os.path.isfile(path):
            raise FormatError(f"{pack_dir}: not a complete layerpack (no {MANIFEST_FILE}; an unfinished conversion writes it last)")
        try:
            return cls.from_dict(read_manifest_json(pack_dir))
        except FormatError as e:  # name the file: the message is the user's one line
            raise type(e)(f"{path}: {e}") from None

    # -- lookups -------------------------------------------------------------------------
    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)

    def layer(self, name: str) -> LayerEntry:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)


def _known(klass, d: dict) -> dict:
    """Keep the keys the dataclass knows: minor format versions may add fields older readers ignore."""
    names = klass.__dataclass_fields__.keys()
    return {k: v for k, v in d.items() if k in names}


# The checks live in the validation layer (validate/); these names stay for existing callers.
check_structure = check_manifest


def read_manifest_json(pack_dir: str | os.PathLike) -> dict:
    """manifest.json of a pack folder as parsed, untrusted JSON: it must resolve inside the pack, be a
    regular file of at most MAX_MANIFEST_BYTES, and parse without duplicate keys or deep nesting.
    Errors do not name the file: callers prefix it."""
    pack_dir = os.fspath(pack_dir)
    real = os.path.realpath(os.path.join(pack_dir, MANIFEST_FILE))
    if not is_inside(real, pack_roots(pack_dir)):
        raise FormatError(f"resolves to {real}, outside the pack (a symlink leads out of it)")
    if not os.path.isfile(real):  # before open(): opening a FIFO would block
        raise FormatError("not a regular file")
    try:
        with open(real, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)  # never more than the limit, whatever the file claims
    except OSError as e:
        raise FormatError(f"unreadable manifest ({e.strerror or e})") from None
    try:
        return load_json(data, "", MAX_MANIFEST_BYTES)
    except FormatError as e:
        raise FormatError(f"unreadable manifest: {e}") from None
