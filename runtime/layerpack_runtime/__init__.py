"""layerpack-runtime: read and run layerpacks, one layer at a time.

Imports nothing beyond torch (and zstandard / tokenizers lazily, when a pack needs them)."""
import os

# A decode step is hundreds of short parallel regions. By default GNU OpenMP's idle threads spin for
# about 300,000 iterations before they sleep: on a machine shared with other work, a spinning or
# descheduled thread stalls every region, and 2 threads were measured 10x slower than 1
# (BENCHMARKS.md, "threads on a busy machine"). A short spin keeps most of the quiet-machine speed
# and none of that collapse. Read by libgomp when torch loads, so it only applies when torch is
# imported after this package; an explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY is left alone.
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "1000"

from .errors import FormatError, LayerpackError, VersionError
from .format import FORMAT_VERSION
from .loader import LayeredModel, load
from .manifest import Manifest
from .pack import Pack

__version__ = "0.1.0"
__all__ = ["FORMAT_VERSION", "FormatError", "LayeredModel", "LayerpackError", "Manifest", "Pack", "VersionError", "__version__", "load"]
