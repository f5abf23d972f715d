#!/usr/bin/env bash
# Create .bench-venv: a separate venv for scripts/bench_baselines.py (transformers, accelerate
# disk offload and AirLLM baselines). accelerate and airllm are NOT layerpack dependencies, so
# they live here and never in .venv.
#
#   bash scripts/setup_bench_venv.sh           # create / complete .bench-venv
#   .bench-venv/bin/python scripts/bench_baselines.py --json out/baselines.json
#
# torch is installed first and pinned: a bare `torch` requirement can pull a multi-GB CUDA build.
# Elsewhere, TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets a CPU wheel.
# airllm is installed with --no-deps: its metadata asks for an unpinned torch and scipy, which its
# code never imports; what it does import (tqdm, huggingface_hub, safetensors, accelerate,
# transformers; sentencepiece only for its Baichuan class, installed to keep import quiet) is
# installed explicitly. airllm 4.0.0 runs on CPU with transformers 5.x unpatched (device="cpu").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.bench-venv
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.23.0}
ACCELERATE_VERSION=${ACCELERATE_VERSION:-1.15.0}
AIRLLM_VERSION=${AIRLLM_VERSION:-4.0.0}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
fi
# Everything else must keep that torch: constrain it so no resolver step swaps it out.
CONSTRAINT=$(mktemp)
trap 'rm -f "$CONSTRAINT"' EXIT
"$VENV/bin/python" -W ignore -c "import torch; print('torch==' + torch.__version__)" >"$CONSTRAINT" 2>/dev/null
pip install -c "$CONSTRAINT" \
  "transformers==$TRANSFORMERS_VERSION" "accelerate==$ACCELERATE_VERSION" \
  tokenizers safetensors tqdm huggingface_hub numpy sentencepiece
pip install --no-deps "airllm==$AIRLLM_VERSION"
"$VENV/bin/python" - <<'EOF' >&2
import importlib.metadata as md
import airllm  # noqa: F401  (fails here rather than mid-benchmark)
print("setup_bench_venv: .bench-venv ready (" + ", ".join(
    f"{p} {md.version(p)}" for p in ("torch", "transformers", "accelerate", "airllm", "tokenizers", "safetensors")) + ")")
EOF
