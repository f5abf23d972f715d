"""layerpack_runtime (distribution layerpack-llm-runtime): read and run layerpacks, one layer at a time.

Imports nothing beyond torch (and zstandard / tokenizers lazily, when a pack needs them)."""
from .errors import FormatError, LayerpackError, VersionError
from .format import FORMAT_VERSION
from .loader import LayeredModel, load
from .manifest import Manifest
from .pack import Pack

__version__ = "0.1.0"
__all__ = ["FORMAT_VERSION", "FormatError", "LayeredModel", "LayerpackError", "Manifest", "Pack", "VersionError", "__version__", "load"]
