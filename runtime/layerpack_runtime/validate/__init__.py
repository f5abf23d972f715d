"""The reader's one validation layer: everything a pack says is checked here before it is used.

Packs are downloaded from strangers, so every byte is hostile until checked, in this order (one module
per step; callers import the names below from this package):
1. JSON (manifest, layer headers, zstd metadata), untrusted_json.py: size bounded before parsing,
   duplicate keys and deep nesting refused (`load_json`).
2. The manifest (`check_manifest`), manifest_fields.py: every field the runtime or `inspect` reads has
   its type, range and cross-consistency checked; layer_entries.py: layer list == architecture's
   blocks, each layer's own file, tensor entries as the family's contract declares them, block size
   consistent with the scheme, and architecture dimensions tied to the tensor shapes, which are tied
   to the bytes of the files (so nothing is allocated from a number that the bytes present do not back).
   fields.py holds the typed getters both use.
3. Pack files (`resolve_in_pack`), pack_paths.py: every file must resolve inside the pack (no symlink
   escapes).
4. Each layer file's header against the manifest (`check_layer_file`), layer_headers.py: stored names,
   dtypes, shapes and byte counts per scheme (`stored_layout`), zstd sizes; before any payload byte is read.
5. Payloads as they are read (`check_payload`), payloads.py: absmax finite and >= 0, outlier tables in
   range, strictly increasing, values finite. Cheap vectorised reductions over the small tensors only.
Every failure is a FormatError naming the file and field. No jsonschema here: the runtime stays light
(the toolkit's `verify` also runs the schema; the tests hold the two together).
"""
from __future__ import annotations

from .fields import numel
from .layer_headers import check_layer_file, check_zstd_table, stored_layout, stored_spec
from .manifest_fields import check_manifest, parse_version, safe_relpath
from .pack_paths import is_inside, pack_roots, resolve_in_pack
from .payloads import check_payload, payload_tables
from .untrusted_json import load_json

__all__ = ["check_layer_file", "check_manifest", "check_payload", "check_zstd_table", "is_inside", "load_json", "numel",
           "pack_roots", "parse_version", "payload_tables", "resolve_in_pack", "safe_relpath", "stored_layout",
           "stored_spec"]
