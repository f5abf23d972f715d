"""Typed, bounded reads of a Hugging Face config.json (or generation_config.json): every wrong type,
missing required field or out-of-range number is one LayerpackError naming the file and the field,
before anything is read or written (families.architecture_spec reads every field through here)."""
from __future__ import annotations

import json
import math

from layerpack_runtime.errors import LayerpackError


# Upper bounds far above any real model (Llama 3.1 405B: hidden 16384, 126 layers, vocab 128256,
# intermediate 53248, 128 heads), there only so that a corrupt number fails here instead of
# allocating per-layer tables or overflowing later.
_MAX = {"vocab_size": 1 << 24, "hidden_size": 1 << 20, "intermediate_size": 1 << 22, "num_hidden_layers": 1 << 14,
        "num_attention_heads": 1 << 14, "num_key_value_heads": 1 << 14, "head_dim": 1 << 14,
        "max_position_embeddings": 1 << 40, "sliding_window": 1 << 40, "num_local_experts": 1 << 16,
        "num_experts": 1 << 16, "num_experts_per_tok": 1 << 16, "moe_intermediate_size": 1 << 22,
        "shared_expert_intermediate_size": 1 << 22, "decoder_sparse_step": 1 << 14, "max_window_layers": 1 << 14,
        "sliding_window_pattern": 1 << 14, "_sliding_window_pattern": 1 << 14}
_NO_VALUE = object()


class ConfigFields:
    """Typed, bounded reads of a config.json (or generation_config.json) object: every wrong type,
    missing required field or out-of-range number is a LayerpackError naming the file and the field.
    JSON null counts as absent (real configs write null for unused optional fields)."""

    def __init__(self, config: dict, file: str = "config.json"):
        self.d, self.file = config, file

    def _bad(self, key: str, want: str, v) -> LayerpackError:
        shown = json.dumps(v)[:60] if not isinstance(v, float) or math.isfinite(v) else str(v)
        return LayerpackError(f"{self.file}: field {key!r} must be {want}, not {shown}")

    def get(self, key: str, default=None):
        v = self.d.get(key)
        return default if v is None else v

    def int(self, key: str, default=_NO_VALUE, lo: int = 1, hi: int | None = None) -> int:
        v = self.d.get(key)
        if v is None:
            if default is _NO_VALUE:
                raise LayerpackError(f"{self.file}: required field {key!r} is missing")
            return default
        hi = hi if hi is not None else _MAX.get(key, 1 << 40)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise self._bad(key, f"an integer in [{lo}, {hi}]", v)
        return v

    def float(self, key: str, default=_NO_VALUE, positive: bool = True) -> float:
        v = self.d.get(key)
        if v is None:
            if default is _NO_VALUE:
                raise LayerpackError(f"{self.file}: required field {key!r} is missing")
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise self._bad(key, "a positive number" if positive else "a finite number", v)
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):  # "false" (a string) is true in Python: never guess
            raise self._bad(key, "true or false", v)
        return v

    def str(self, key: str, default: str | None = None) -> str | None:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise self._bad(key, "a string", v)
        return v

    def dict(self, key: str) -> dict:
        v = self.d.get(key)
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self._bad(key, "an object", v)
        return v

    def ids(self, key: str, default=None) -> list[int]:
        """A token id or a list of token ids."""
        v = self.d.get(key, default)
        if v is None:
            return []
        items = v if isinstance(v, list) else [v]
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < (1 << 31) for x in items):
            raise self._bad(key, "a token id or a list of token ids", v)
        return list(items)

    def int_list(self, key: str, hi: int) -> list[int]:
        v = self.d.get(key)
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < hi for x in v):
            raise self._bad(key, f"a list of block indices below {hi}", v)
        return v

    def str_list(self, key: str, length: int) -> list[str] | None:
        v = self.d.get(key)
        if v is None:
            return None
        if not isinstance(v, list) or len(v) != length or not all(isinstance(x, str) for x in v):
            raise self._bad(key, f"a list of {length} strings (one per block)", v)
        return v
