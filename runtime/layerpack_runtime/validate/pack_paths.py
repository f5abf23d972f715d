"""Pack files resolve inside the pack: no symlink leads out of it (a pulled pack is untrusted)."""
from __future__ import annotations

import os

from ..errors import FormatError


def pack_roots(pack_dir: str) -> list[str]:
    """Folders a pack's files may resolve into: the pack itself, and for a pack in the Hugging Face
    cache (`<repo>/snapshots/<commit>`) its repo's `blobs/`, where the cache keeps the bytes its
    snapshot symlinks point to."""
    root = os.path.realpath(pack_dir)
    roots = [root]
    parent = os.path.dirname(os.path.abspath(pack_dir))
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.realpath(os.path.join(os.path.dirname(parent), "blobs")))
    return roots


def resolve_in_pack(pack_dir: str, rel: str, roots: list[str] | None = None) -> str:
    """The real path of pack file `rel`, refused when a symlink leads outside the pack."""
    real = os.path.realpath(os.path.join(pack_dir, rel))
    if not is_inside(real, roots or pack_roots(pack_dir)):
        raise FormatError(f"{rel}: resolves to {real}, outside the pack (a symlink leads out of it)")
    return real


def is_inside(real: str, roots: list[str]) -> bool:
    return any(real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)
