"""`layerpack verify`: every problem with a pack, or none."""
from __future__ import annotations

import os

from layerpack_runtime.errors import FormatError
from layerpack_runtime.format import LAYERS_DIR, MANIFEST_FILE
from layerpack_runtime.manifest import Manifest, read_manifest_json
from layerpack_runtime.pack import Pack

from .progress import progress_bar
from .schema import schema_errors


def verify_pack(path: str, quiet: bool = False) -> list[str]:
    """Schema, structure, presence, sizes, sha256, safetensors headers and payload checks (absmax,
    outlier tables) of every file. Returns the list of problems (empty: the pack is intact)."""
    mpath = os.path.join(path, MANIFEST_FILE)
    if not os.path.isdir(path):
        return [f"{path}: no such pack directory"]
    if not os.path.isfile(mpath):
        return [f"{MANIFEST_FILE}: missing (an unfinished conversion writes it last)"]
    try:  # bounded, no duplicate keys or deep nesting, inside the pack; then version + every field
        raw = read_manifest_json(path)
        Manifest.from_dict(raw)  # a future major version is reported as such
    except FormatError as e:
        return [f"{MANIFEST_FILE}: {e}"]
    problems = schema_errors(raw)
    if problems:
        return problems
    pack = Pack(path, check_files=False)  # we want every problem listed, not the first raised
    total = sum(f.size for f in pack.manifest.files)
    with progress_bar(total, "verify", quiet) as bar:
        problems = pack.verify(bar.update)
    listed = {f.path for f in pack.manifest.files}
    layers_dir = os.path.join(path, LAYERS_DIR)
    if os.path.isdir(layers_dir):
        problems += [f"{LAYERS_DIR}/{n}: not listed in the manifest" for n in sorted(os.listdir(layers_dir)) if f"{LAYERS_DIR}/{n}" not in listed]
    return problems
