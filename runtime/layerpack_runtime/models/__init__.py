"""Model families the runtime can execute, found by looking: every module of this package that
declares `FAMILY` (a contract.Family) adds that family, so a new family is one new file. Its
declaration names the runtime module whose code runs it (`runs`): a module exposing the unit
functions (ModelArgs, prepare_steps, embed_forward, block_forward, head_forward, check_unit,
rope_inv_freq). llama.py runs llama, mistral, qwen2, qwen3 and phi3 (they differ only in
architecture flags: biases, sliding window, rope scaling, q/k norms; Phi-3's fused projections are
split by the converter); gemma3.py runs gemma3; mixtral.py runs the mixture-of-experts families."""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from ..errors import LayerpackError
from .contract import Family, merged

FAMILIES: dict[str, Family] = {}
MODULES: dict[str, ModuleType] = {}   # family -> the module whose code runs it


def _discover() -> None:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "contract":
            continue
        fam = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(fam, Family):
            if fam.name in found:
                raise ImportError(f"model family {fam.name!r} is declared twice")
            found[fam.name] = fam
    for name, fam in found.items():
        FAMILIES[name] = fam
        MODULES[name] = importlib.import_module(f"{__name__}.{fam.runs}")


_discover()
_ANY = merged(FAMILIES.values())


def supported() -> str:
    return ", ".join(sorted(MODULES))


def runs(module: str) -> tuple[str, ...]:
    """The families the runtime module `module` runs."""
    return tuple(sorted(n for n, f in FAMILIES.items() if f.runs == module))


def family_of_pack(family) -> Family:
    """The declared contract of `family`; for a family this runtime does not know, one holding every
    known family's tensors (so its manifest is still checked; loading it fails in module_for)."""
    return FAMILIES.get(family, _ANY) if isinstance(family, str) else _ANY


def module_for(family: str | None) -> ModuleType:
    try:
        return MODULES[family]  # type: ignore[index]
    except (KeyError, TypeError):
        raise LayerpackError(f"model family {family!r} is not supported by this runtime (supported: {supported()})") from None
