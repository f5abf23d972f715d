#!/usr/bin/env bash
# The test suite beside two CPU-burning processes (issue 19: same input, same bits, whatever else the
# machine is doing): `bash scripts/test_under_load.sh [pytest args]`. The hogs are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
hogs=()
for _ in 1 2; do
  python3 -c 'while True: pass' &
  hogs+=($!)
done
trap 'kill "${hogs[@]}" 2>/dev/null || true' EXIT
echo "test_under_load: 2 CPU hogs running (pids ${hogs[*]}); load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
.venv/bin/python -m pytest "$@"
