"""layerpack_runtime (distribution layerpack-llm-runtime): read and run layerpacks, one layer at a time.

Imports nothing beyond torch (and zstandard / tokenizers lazily, when a pack needs them). The names
below are loaded on first use, so that `import layerpack_runtime.errors` (and the `layerpack`
command's --help, --version and argument errors) does not pay for importing torch (~1-4 s)."""
from __future__ import annotations

import importlib

from .errors import FormatError, LayerpackError, VersionError

# Importing the package writes no environment variable: the OpenMP wait policy (threads.py) is set
# by the command-line entry points (`layerpack`, `python -m layerpack_runtime.launch`), not here.

__version__ = "0.1.0"
__all__ = ["FORMAT_VERSION", "FormatError", "LayeredModel", "LayerpackError", "Manifest", "Pack", "VersionError", "__version__", "load"]

# name -> submodule that defines it (imported on first access: PEP 562)
_LAZY = {"FORMAT_VERSION": "format", "LayeredModel": "loader", "load": "loader", "Manifest": "manifest", "Pack": "pack"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
