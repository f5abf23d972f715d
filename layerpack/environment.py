"""Every LAYERPACK_* environment variable the toolkit (layerpack/) reads, in one place. The runtime
reads its own (LAYERPACK_THREADS: layerpack_runtime/threads.py); no test hook is read from the
environment (tests pass fault objects in: layerpack/conversion/faults.py)."""
from __future__ import annotations

import os

DEBUG = "LAYERPACK_DEBUG"      # set (non-empty): the CLI shows an internal error's traceback instead of one line
API_KEY = "LAYERPACK_API_KEY"  # `layerpack serve --api-key`'s default (an environment variable keeps it out of `ps`)


def debug() -> bool:
    return bool(os.environ.get(DEBUG))
