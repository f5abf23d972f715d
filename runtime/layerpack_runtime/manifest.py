"""The pack manifest: dataclasses, (de)serialisation, and the structural checks a reader makes
before trusting a pack. The toolkit additionally validates against schemas/manifest.schema.json
(the runtime cannot depend on jsonschema); both must agree, and the tests hold them together."""
from __future__ import annotations

import json
import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import FormatError, VersionError
from .format import COMPRESSIONS, DTYPE_NAMES, FORMAT_MAJOR, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, SCHEMES


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

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("outlier_rule", "head_outlier_fraction"):
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
        check_structure(d)
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
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise FormatError(f"{path}: unreadable manifest ({e})") from None
        return cls.from_dict(d)

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


def parse_version(v: Any) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in str(v).split("."))
        if len(parts) != 3:
            raise ValueError
        return parts  # type: ignore[return-value]
    except ValueError:
        raise FormatError(f"manifest format_version {v!r} is not MAJOR.MINOR.PATCH") from None


def safe_relpath(p: Any) -> bool:
    """Pack paths must stay inside the pack: relative, '/'-separated, no '..' (a pulled pack is untrusted)."""
    return (
        isinstance(p, str) and p != "" and not p.startswith("/") and "\\" not in p
        and posixpath.normpath(p) == p and not p.startswith("..")
    )


def check_structure(d: Any) -> None:
    """The checks every reader makes, in order: identity, version, then the fields it relies on."""
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise FormatError(f"not a {FORMAT_NAME} manifest (field 'format' is {d.get('format') if isinstance(d, dict) else None!r})")
    major = parse_version(d.get("format_version"))[0]
    if major > FORMAT_MAJOR:
        raise VersionError(
            f"pack format version {d['format_version']} is newer than this reader supports "
            f"({FORMAT_VERSION}); upgrade layerpack / layerpack-runtime"
        )
    if major < 1:
        raise VersionError(f"pack format version {d['format_version']} predates format 1 and is not supported")
    for key, typ in (("source", dict), ("architecture", dict), ("quantization", dict), ("layers", list), ("files", list)):
        if not isinstance(d.get(key), typ):
            raise FormatError(f"manifest field {key!r} is missing or not a {typ.__name__}")
    q = d["quantization"]
    if q.get("scheme") not in SCHEMES:
        raise FormatError(f"manifest quantization scheme {q.get('scheme')!r} is not one of {', '.join(SCHEMES)}")
    if q.get("dtype") not in DTYPE_NAMES:
        raise FormatError(f"manifest dtype {q.get('dtype')!r} is not one of {', '.join(DTYPE_NAMES)}")
    if q.get("compression", "none") not in COMPRESSIONS:
        raise FormatError(f"manifest compression {q.get('compression')!r} is not one of {', '.join(COMPRESSIONS)}")
    files = set()
    for f in d["files"]:
        if not (isinstance(f, dict) and safe_relpath(f.get("path")) and isinstance(f.get("size"), int) and isinstance(f.get("sha256"), str)):
            raise FormatError(f"manifest file entry {f!r} is malformed or points outside the pack")
        files.add(f["path"])
    if not d["layers"]:
        raise FormatError("manifest lists no layers")
    for l in d["layers"]:
        if not (isinstance(l, dict) and isinstance(l.get("tensors"), list) and isinstance(l.get("name"), str)):
            raise FormatError(f"manifest layer entry {str(l)[:80]!r} is malformed")
        if l.get("file") not in files:
            raise FormatError(f"layer {l['name']!r} refers to {l.get('file')!r}, which the manifest's file list lacks")
