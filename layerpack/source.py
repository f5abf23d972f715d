"""Where weights come from: a local Hugging Face folder or a Hub repo id, indexed tensor by tensor
without loading anything (safetensors headers only), so conversion can stream one layer at a time."""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

import torch

from layerpack_runtime.errors import FormatError, LayerpackError
from layerpack_runtime.fileio import read_range
from layerpack_runtime.format import SIDECAR_FILES, ST_DTYPES
from layerpack_runtime.pack import sha256_file
from layerpack_runtime.remote import check_reachable, is_repo_id
from layerpack_runtime.safetensors_io import SafetensorsFile, TensorInfo, itemsize

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


MAX_JSON_BYTES = 64 * 2**20   # config.json is a few KB; a 405B shard index ~100 KB


def read_json_object(path: str, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A source JSON file (config.json, generation_config.json, the shard index) as a dict, or one
    LayerpackError naming the file: unreadable, too large, not JSON, nested too deeply for the parser
    (RecursionError), or not an object."""
    try:
        if os.path.getsize(path) > max_bytes:
            raise LayerpackError(f"{path}: {os.path.getsize(path)} bytes, more than any real {os.path.basename(path)}; refusing to parse it")
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except RecursionError:
        raise LayerpackError(f"{path}: unreadable (JSON nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise LayerpackError(f"{path}: unreadable ({str(e)[:200]})") from None
    if not isinstance(d, dict):
        raise LayerpackError(f"{path}: unreadable (not a JSON object)")
    return d


@dataclass
class Source:
    root: str                  # local folder holding config.json and the weights
    kind: str                  # "local" | "hub"
    id: str                    # folder name (local) or repo id (hub)
    revision: str | None = None
    weight_files: list[str] = field(default_factory=list)  # relative to root
    pickle: bool = False

    def provenance(self) -> dict:
        # A local path is reduced to its folder name: packs get shared, home directories should not.
        return {"kind": self.kind, "id": self.id, "revision": self.revision}


def resolve(src: str, revision: str | None = None, allow_pickle: bool = False, quiet: bool = False) -> Source:
    if os.path.exists(src):
        if not os.path.isdir(src):
            raise LayerpackError(f"{src}: is a file; give the checkpoint folder that holds config.json")
        root, kind, ident = os.path.abspath(src), "local", os.path.basename(os.path.abspath(src))
    elif is_repo_id(src):
        root, revision = _download(src, revision, allow_pickle, quiet)
        kind, ident = "hub", src
    else:
        raise LayerpackError(f"{src}: no such folder, and not a Hub repo id (owner/name)")
    if not os.path.isfile(os.path.join(root, "config.json")):
        raise LayerpackError(f"{src}: not a Hugging Face checkpoint (no config.json)")
    files, pickle = _weight_files(root, src, allow_pickle)
    return Source(root, kind, ident, revision, files, pickle)


def _download(repo_id: str, revision: str | None, allow_pickle: bool, quiet: bool) -> tuple[str, str | None]:
    """Fetch only what conversion reads, into the HF cache (resumable, shared with transformers).
    Errors become one line naming what is missing; the token never appears in them."""
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError:  # pragma: no cover - a toolkit dependency
        raise LayerpackError("huggingface_hub is required to convert from a Hub repo id") from None
    silent = quiet or not sys.stderr.isatty()
    check_reachable(repo_id)
    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=False)
        names = [s.rfilename for s in info.siblings or []]
        has_st = any(n.endswith(".safetensors") for n in names)
        if not has_st and not allow_pickle:
            raise LayerpackError(f"{repo_id}: has no safetensors weights; pickle weights (.bin) need --allow-pickle")
        patterns = list(SIDECAR_FILES) + ([SAFETENSORS_INDEX, "*.safetensors"] if has_st else [PICKLE_INDEX, "pytorch_model*.bin"])
        if silent:
            disable_progress_bars()
        try:
            root = snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns)
        finally:
            if silent:
                enable_progress_bars()
        return root, info.sha
    except LayerpackError:
        raise
    except Exception as e:  # Hub and network errors: one line, no token
        from layerpack_runtime.remote import hub_error

        raise hub_error(e, repo_id, revision) from None


def _weight_files(root: str, src: str, allow_pickle: bool) -> tuple[list[str], bool]:
    for index_name, pickle in ((SAFETENSORS_INDEX, False), (PICKLE_INDEX, True)):
        index_path = os.path.join(root, index_name)
        if os.path.isfile(index_path):
            if pickle and not allow_pickle:
                break
            files = _index_files(index_path, index_name, pickle)
            missing = [p for p in files if not os.path.isfile(os.path.join(root, p))]
            if missing:
                raise LayerpackError(f"{src}: shard {missing[0]} listed in {index_name} is missing")
            return files, pickle
    st = sorted(n for n in os.listdir(root) if n.endswith(".safetensors"))
    if st:
        return st, False
    bins = sorted(n for n in os.listdir(root) if n.startswith("pytorch_model") and n.endswith(".bin"))
    if bins:
        if not allow_pickle:
            raise LayerpackError(
                f"{src}: only pickle weights ({bins[0]}); pickle can run code when loaded, so it is refused. "
                "Pass --allow-pickle to load it safely with torch.load(weights_only=True)"
            )
        return bins, True
    raise LayerpackError(f"{src}: no weights found (no *.safetensors or pytorch_model*.bin)")


def _index_files(index_path: str, index_name: str, pickle: bool) -> list[str]:
    """The shard files a shard index lists, validated: weight_map maps tensor names to plain file
    names inside the checkpoint folder (never a path out of it)."""
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LayerpackError(f"{index_path}: field 'weight_map' must be a non-empty object of tensor name -> shard file")
    suffix = ".bin" if pickle else ".safetensors"
    for name, shard in weight_map.items():
        if (not isinstance(shard, str) or not shard.endswith(suffix) or shard.startswith(("/", "\\")) or "\\" in shard
                or any(part in ("", ".", "..") for part in shard.split("/")) or "\0" in shard):
            raise LayerpackError(f"{index_path}: field 'weight_map' entry {name[:80]!r} -> {json.dumps(shard)[:80]}: "
                                 f"not a {suffix} file inside the checkpoint folder")
    return sorted(set(weight_map.values()))


@dataclass(frozen=True)
class Part:
    """A contiguous piece of a fused source tensor [E, R, C] (transformers 5's fused experts):
    expert `expert`'s [R, C] slice, or its first (half=0) / second (half=1) R/2 rows."""
    name: str
    expert: int
    half: int | None = None

    def locate(self, shape: list[int]) -> tuple[int, list[int]]:
        """(element offset in the flattened source tensor, shape of the part)."""
        if len(shape) != 3 or not 0 <= self.expert < shape[0] or (self.half is not None and shape[1] % 2):
            raise LayerpackError(f"source tensor {self.name} has shape {shape}; expected fused experts [experts, rows, cols]")
        rows = shape[1] if self.half is None else shape[1] // 2
        return (self.expert * shape[1] + (self.half or 0) * rows) * shape[2], [rows, shape[2]]


def base_name(ref) -> str:
    return ref.name if isinstance(ref, Part) else ref


class TensorIndex:
    """name -> where to read it. Safetensors: validated headers, reads on demand. Pickle: loaded
    with weights_only=True and mmap, so tensors are paged in lazily too."""

    def __init__(self, source: Source):
        self.source = source
        self._where: dict[str, tuple[str, object]] = {}
        for rel in source.weight_files:
            path = os.path.join(source.root, rel)
            if source.pickle:
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:
                    raise LayerpackError(f"{path}: cannot load safely with weights_only=True ({type(e).__name__})") from None
                for name, t in sd.items():
                    self._where[name] = (rel, t)
            else:
                try:
                    st = SafetensorsFile(path)
                except FormatError as e:
                    raise LayerpackError(str(e)) from None
                for name, info in st.tensors.items():
                    if name in self._where:
                        raise LayerpackError(f"{path}: tensor {name[:100]!r} is also in {self._where[name][0]}; a checkpoint holds each tensor once")
                    self._where[name] = (rel, (st, info))

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name) -> tuple[str, list[int], int]:
        """(dtype name, shape, nbytes) without reading. `name`: a tensor name or a Part."""
        rel, h = self._where[base_name(name)]
        if isinstance(h, torch.Tensor):
            dtype, shape, item = str(h.dtype), list(h.shape), h.element_size()
        else:
            info: TensorInfo = h[1]
            dtype, shape, item = info.dtype, list(info.shape), itemsize(info.dtype)
        if isinstance(name, Part):
            shape = name.locate(shape)[1]
        return dtype, shape, math.prod(shape) * item

    def read(self, name) -> torch.Tensor:
        rel, h = self._where[base_name(name)]
        if isinstance(name, Part):
            return self._read_part(name, h)
        if isinstance(h, torch.Tensor):
            return h.contiguous().clone()
        st, info = h
        try:
            return st.read([info.name])[info.name]
        except FormatError as e:
            raise LayerpackError(str(e)) from None

    def _read_part(self, part: Part, h) -> torch.Tensor:
        """Only the part's bytes: one expert of a fused tensor costs 1/E of reading it whole."""
        if isinstance(h, torch.Tensor):
            offset, shape = part.locate(list(h.shape))
            return h.reshape(-1)[offset: offset + math.prod(shape)].reshape(shape).clone()
        st, info = h
        offset, shape = part.locate(list(info.shape))
        dtype = ST_DTYPES.get(info.dtype)
        if dtype is None:
            raise LayerpackError(f"source tensor {part.name} has dtype {info.dtype}, which cannot be converted")
        item = itemsize(info.dtype)
        raw = torch.empty(math.prod(shape) * item, dtype=torch.uint8)
        try:  # read_range loops: one part of a fused expert tensor can exceed a single read's 2 GiB
            read_range(st.path, raw.numpy(), info.start + offset * item, f"tensor {part.name}")
        except FormatError as e:
            raise LayerpackError(str(e)) from None
        return raw.view(dtype).reshape(shape)

    def reader(self, name, rows: tuple[int, int] | None = None):
        """A TensorSource (quantizer/windows.py) reading the tensor - or rows [a, b) of its first dimension -
        straight from its file in pieces, never whole: how the converter takes a 4 GB tensor."""
        from .quantizer.windows import InMemory

        rel, h = self._where[base_name(name)]
        if isinstance(h, torch.Tensor):  # pickle, mmap'ed: pages come in as the pieces are read
            t = self._read_part(name, h) if isinstance(name, Part) else h
            return InMemory(t if rows is None else t[rows[0]: rows[1]])
        st, info = h
        dtype = ST_DTYPES.get(info.dtype)
        if dtype is None:
            raise LayerpackError(f"source tensor {base_name(name)} has dtype {info.dtype}, which cannot be converted")
        offset, shape = name.locate(list(info.shape)) if isinstance(name, Part) else (0, list(info.shape))
        if rows is not None:
            row = math.prod(shape[1:])
            offset, shape = offset + rows[0] * row, [rows[1] - rows[0], *shape[1:]]
        return FileTensor(st.path, info.start + offset * itemsize(info.dtype), shape, dtype, base_name(name))

    def file_of(self, name) -> str:
        return self._where[base_name(name)][0]

    def dtype_of(self, name) -> torch.dtype:
        rel, h = self._where[base_name(name)]
        if isinstance(h, torch.Tensor):
            return h.dtype
        from layerpack_runtime.format import ST_DTYPES

        return ST_DTYPES.get(h[1].dtype, torch.float32)


class FileTensor:
    """Elements of one tensor in a safetensors file (already validated: inside the file), read by
    pread on demand; a file shorter than its header says is an error."""

    def __init__(self, path: str, offset: int, shape: list[int], dtype: torch.dtype, name: str):
        self.path, self.offset, self.shape, self.dtype, self.name = path, offset, shape, dtype, name
        self.item = torch.empty((), dtype=dtype).element_size()

    def read(self, start: int, stop: int) -> torch.Tensor:
        raw = torch.empty((stop - start) * self.item, dtype=torch.uint8)
        try:  # the runtime's read loop: one call reads at most 0x7ffff000 bytes on Linux
            read_range(self.path, raw.numpy(), self.offset + start * self.item, f"tensor {self.name}")
        except FormatError as e:
            raise LayerpackError(str(e)) from None
        return raw.view(self.dtype)


def provenance_files(source: Source) -> list[str]:
    """Source files the pack derives from: config, tokenizer files, weights (relative paths)."""
    side = [f for f in SIDECAR_FILES if f != "config.json" and os.path.isfile(os.path.join(source.root, f))]
    return ["config.json", *side, *source.weight_files]


def file_digest(source: Source, rel: str) -> dict:
    """sha256 of one source file, hashed from the bytes we convert. The HF cache names LFS blobs by
    the sha256 the server advertised but huggingface_hub only checks sizes: a mismatch means a
    corrupt download, and the pack must not claim the advertised hash."""
    path = os.path.join(source.root, rel)
    digest = sha256_file(path)
    blob = os.path.basename(os.path.realpath(path))
    if source.kind == "hub" and _HEX64.match(blob) and blob != digest:
        raise LayerpackError(f"corrupt download in the HF cache: {rel} does not match its sha256 {blob[:12]}...; delete {os.path.realpath(path)} and retry")
    return {"path": rel, "size": os.path.getsize(path), "sha256": digest}
