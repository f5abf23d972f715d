#!/usr/bin/env bash
# Create .venv and install layerpack-llm + layerpack-llm-runtime (editable) with a CPU build of torch.
# torch is installed first and pinned: a bare `torch` requirement in a fresh venv can pull a
# multi-GB CUDA build. Elsewhere, TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets a
# CPU wheel from PyTorch's index; a GPU machine can set it to a CUDA index instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION:-2.13.0}"
fi
# Re-install only when the project's requirements changed (saves ~30 s per run of the other scripts).
stamp=$(cat pyproject.toml runtime/pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.layerpack-setup 2>/dev/null)" != "$stamp" ]; then
  # The distributions were first named layerpack / layerpack-runtime (`layerpack` on PyPI is another
  # project): drop an install under the old names and their stale metadata before installing.
  if .venv/bin/python -c "import importlib.metadata as m, sys; sys.exit(not any(True for n in ('layerpack', 'layerpack-runtime') for _ in m.distributions(name=n)))" 2>/dev/null; then
    pip uninstall -y layerpack layerpack-runtime
  fi
  rm -rf layerpack.egg-info runtime/layerpack_runtime.egg-info
  pip install -e ./runtime -e ".[test]"
  echo "$stamp" > .venv/.layerpack-setup
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2
