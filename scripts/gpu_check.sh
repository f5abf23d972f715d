#!/usr/bin/env bash
# One command for a GPU machine (under 8 minutes on one GPU): the CUDA tests, then the kernel
# benchmark on the GPU, then one table. On a machine without CUDA it says so and exits 0.
#
#   bash scripts/gpu_check.sh     # uses $PYTHON (default .venv/bin/python if present, else python3: on the GPU image, the one with CUDA torch)
#
# No network is assumed: the project is used from this checkout (PYTHONPATH), nothing is installed
# from an index. Packages the GPU image lacks (bitsandbytes for the fused 4-bit GEMV, zstandard,
# jsonschema, ...) travel as wheels in .whl/ and are unpacked into a private folder first.
# Output: the table on stdout, logs in ${OUT:-/tmp}/gpu_check/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
LOG=${OUT:-/tmp}/gpu_check
mkdir -p "$LOG"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lp-site .whl/*.whl \
    || { echo "error: could not unpack .whl/"; exit 1; }
  export PYTHONPATH=/tmp/lp-site
fi
export PYTHONPATH="$PWD/runtime:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA on this machine ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo 'no torch')); nothing to check"
  exit 0
fi
"$PY" - <<'EOF' | tee "$LOG/device.txt"
import torch
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
try:
    import bitsandbytes
    print(f"bitsandbytes {bitsandbytes.__version__}: fused 4-bit GEMV in use")
except Exception as e:
    print(f"bitsandbytes not importable ({type(e).__name__}): NF4 on CUDA dequantizes with pure torch")
EOF
status=0
timeout 240 "$PY" -m pytest -q -rs tests/kernels/test_cuda.py tests/kernels/test_kernels.py tests/runtime/test_engine.py::test_engine_on_cuda_equals_single_prompt_generation -p no:cacheprovider >"$LOG/tests.txt" 2>&1 || status=1
tests_line=$(tail -1 "$LOG/tests.txt")
# pipeline stages on CUDA: 2 processes on one GPU over gloo; NCCL with two GPUs or more (issue 14)
timeout 180 "$PY" -m pytest -q -rs tests/stages/test_stages_cuda.py -p no:cacheprovider >"$LOG/stages.txt" 2>&1 || status=1
stages_line=$(tail -1 "$LOG/stages.txt")
timeout 240 "$PY" scripts/bench_kernels.py --device cuda --shapes smollm2,llama3-8b,llama3-405b --rows 1,16,128 --repeats 5 --no-old-path \
  >"$LOG/bench_kernels.md" 2>"$LOG/bench_kernels.err" || status=1
# A Llama-3.1-405B-shaped pack (1 decoder layer, the real 128256 x 16384 embedding and head: 14.8 GB
# of bf16 -> 4.4 GB NF4) run with an 8 GB GPU budget, per unit, when the machine has the disk and
# the time left (skipped otherwise, with the reason in the table).
l405="skipped"
free_gb=$(df -BG --output=avail /tmp | tail -1 | tr -dc 0-9)
if [ "${GPU_405B:-1}" = 1 ] && [ "$free_gb" -ge 24 ] && [ $SECONDS -lt 240 ]; then
  src=/tmp/l405-src; pack=/tmp/l405-nf4
  if timeout 150 "$PY" scripts/make_synthetic.py "$src" --layers 1 --quiet --tokenizer "" >"$LOG/l405.txt" 2>&1 \
     && timeout 200 "$PY" -m layerpack.cli convert "$src" "$pack" --quant nf4 --outliers 0.001 --quiet >>"$LOG/l405.txt" 2>&1 \
     && timeout 120 "$PY" scripts/bench_405b.py --child --pack "$pack" --budget 8GB --tokens 4 --device cuda >"$LOG/l405.json" 2>>"$LOG/l405.txt"; then
    l405=$("$PY" - "$LOG/l405.json" <<'PYEOF'
import json, sys
r = json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
if "error" in r:
    print("error: " + r["error"][:150]); sys.exit()
steps = max(1, r["steps"])
per = "; ".join(f"{u} {r['placement'][u]} {v[3] / steps:.3f} s compute, {v[2] / steps:.3f} s wait, {v[0] / steps / 1e9:.2f} GB read"
                for u, v in r["rows"].items())
print(f"{(r['prefill_s'] + r['decode_s']) / steps:.3f} s/step; {per}")
PYEOF
)
  else
    l405="failed (see $LOG/l405.txt)"; status=1
  fi
  rm -rf "$src" "$pack"
elif [ "${GPU_405B:-1}" = 1 ]; then
  l405="skipped: ${free_gb} GB free in /tmp (24 needed) or ${SECONDS} s already spent"
fi
echo
echo "| check | result |"
echo "|---|---|"
echo "| $(head -1 "$LOG/device.txt") | $(sed -n 2p "$LOG/device.txt") |"
echo "| CUDA + kernel tests | $tests_line |"
echo "| CUDA pipeline stages | $stages_line |"
grep -E "^\| [0-9]+x[0-9]+ \| 1 \|" "$LOG/bench_kernels.md" | awk -F'|' '{printf "| decode %s %s | %s ms, %s GB/s, %s vs dense |\n", $2, $4, $5, $6, $7}'
grep -E "^Decode" "$LOG/bench_kernels.md" | sed 's/^/| summary | /; s/$/ |/'
echo "| 405B-shaped NF4 pack (1 layer + embed + head), 8 GB GPU budget | $l405 |"
[ $status -eq 0 ] || { echo "gpu_check: something failed, see $LOG"; tail -20 "$LOG/tests.txt"; }
exit $status
