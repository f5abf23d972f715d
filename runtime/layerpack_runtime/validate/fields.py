"""Typed getters of untrusted manifest fields: each returns the value it checked or raises a FormatError
naming the field (`architecture.num_heads: must be an integer, not 'x'`); and the element count of a shape."""
from __future__ import annotations

import math
from typing import Any, Iterable

from ..errors import FormatError
from ..format import BLOCK_SIZE_MULTIPLE


def field_error(path: str, what: str) -> FormatError:
    return FormatError(f"manifest field {path}: {what}")


def shown(v: Any) -> str:
    if v is None:
        return "null (or missing)"
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def checked_int(v: Any, path: str, lo: int = 0, hi: int | None = None) -> int:
    if type(v) is not int:  # bool is an int subclass: refused too
        raise field_error(path, f"must be an integer, not {shown(v)}")
    if v < lo or (hi is not None and v > hi):
        raise field_error(path, f"{v} is out of range [{lo}, {'...' if hi is None else hi}]")
    return v


def checked_number(v: Any, path: str, lo: float | None = None, positive: bool = False) -> float:
    if type(v) not in (int, float) or not math.isfinite(v):
        raise field_error(path, f"must be a finite number, not {shown(v)}")
    if (positive and v <= 0) or (lo is not None and v < lo):
        raise field_error(path, f"{v} must be {'> 0' if positive else f'>= {lo}'}")
    return float(v)


def one_of(v: Any, choices) -> bool:
    """Membership without hashing a hostile value (a dict or list where a string belongs)."""
    return isinstance(v, str) and v in choices


def checked_type(v: Any, typ, path: str, optional: bool = False):
    if v is None and optional:
        return None
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise field_error(path, f"must be a {names}{' or null' if optional else ''}, not {shown(v)}")
    return v


def optional_number(d: dict, key: str, path: str, positive: bool = False) -> None:
    if d.get(key) is not None:
        checked_number(d[key], f"{path}.{key}", lo=0, positive=positive)



def checked_block_size(bs: Any, path: str) -> int:
    checked_int(bs, path, lo=BLOCK_SIZE_MULTIPLE)
    if bs % BLOCK_SIZE_MULTIPLE:
        raise field_error(path, f"{bs} is not a multiple of {BLOCK_SIZE_MULTIPLE}")
    return bs



def numel(shape: Iterable[int]) -> int:
    return math.prod(shape)

