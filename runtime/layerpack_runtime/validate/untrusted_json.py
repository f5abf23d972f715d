"""Untrusted JSON (manifest, layer headers, zstd metadata): size bounded before parsing, duplicate keys and
deep nesting refused."""
from __future__ import annotations

import json
from typing import Any

from ..errors import FormatError
from ..format import MAX_JSON_DEPTH


class _Duplicate(ValueError):
    pass


def _pairs(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):  # json keeps the last value silently: a second meaning hidden in one file
        seen = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def load_json(data: bytes | str, where: str, max_bytes: int) -> Any:
    """Parse untrusted JSON: at most max_bytes, no duplicate keys, nesting at most MAX_JSON_DEPTH."""
    where = f"{where}: " if where else ""
    if len(data) > max_bytes:
        raise FormatError(f"{where}more than the reader's limit of {max_bytes} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        obj = json.loads(text, object_pairs_hook=_pairs)
    except _Duplicate as e:
        raise FormatError(f"{where}duplicate key {str(e.args[0])[:60]!r}") from None
    except RecursionError:
        raise FormatError(f"{where}JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{where}not valid JSON ({str(e)[:120]})") from None
    stack = [(obj, 1)]
    while stack:  # iterative: a deep structure must not recurse here either
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise FormatError(f"{where}JSON nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return obj

