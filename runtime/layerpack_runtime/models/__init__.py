"""Model families the runtime can execute. Each family maps to a module exposing the same unit
functions (ModelArgs, prepare_steps, embed_forward, block_forward, head_forward, check_unit,
rope_inv_freq); llama, mistral, qwen2, qwen3 and phi3 share `llama` (they differ only in
architecture flags: biases, sliding window, rope scaling, q/k norms; Phi-3's fused projections are
split by the converter); mixture-of-experts families use `mixtral`."""
from __future__ import annotations

from types import ModuleType

from ..errors import LayerpackError
from . import gemma3, llama, mixtral

MODULES: dict[str, ModuleType] = {"llama": llama, "mistral": llama, "qwen2": llama, "qwen3": llama, "phi3": llama,
                                  "gemma3": gemma3, "mixtral": mixtral, "qwen3_moe": mixtral,
                                  "qwen2_moe": mixtral}


def supported() -> str:
    return ", ".join(sorted(MODULES))


def module_for(family: str | None) -> ModuleType:
    try:
        return MODULES[family]  # type: ignore[index]
    except (KeyError, TypeError):
        raise LayerpackError(f"model family {family!r} is not supported by this runtime (supported: {supported()})") from None
