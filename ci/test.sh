#!/usr/bin/env bash
# The full test suite on a fresh machine: installs what it needs (cached under ~/.cache/ray-vram),
# lints, then runs pytest. Services (Ray, vLLM, kube-apiserver, containers) are started by the
# tests' fixtures through the other ci/ scripts.  Usage: bash ci/test.sh [pytest args]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source ci/env.sh
start=$(date +%s)
VENV=$(bash ci/install-python.sh | tail -n 1)
export PATH=$VENV/bin:$PATH
echo "[test] python environment ready in $(( $(date +%s) - start ))s: $VENV"
# Prometheus and promtool (Debian's package, unpacked into the cache) for the chart's alert and
# dashboard tests; tests/promstack.py finds them through these variables.
PROM_BIN=$(bash ci/prometheus.sh | tail -n 1)
export RAY_VRAM_PROMETHEUS=$PROM_BIN/prometheus RAY_VRAM_PROMTOOL=$PROM_BIN/promtool
ruff check src tests bench examples
ruff format --check src tests bench examples
# strict types on the pure core and the typed boundaries (pyproject's [tool.mypy] lists them)
mypy
set +e
# Two workers (pytest-xdist): one core waits on a stack's start or a fault's recovery while the other
# works. tests/conftest.py groups the tests: the session stack's users on one worker, every other
# file on one worker. RAY_VRAM_TEST_WORKERS=0 runs everything in this process, one test at a time.
python -m pytest -ra -p no:cacheprovider -n "${RAY_VRAM_TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder --durations=25 "$@"
rc=$?
set -e
echo "[test] finished in $(( $(date +%s) - start ))s (pytest exit $rc)"
exit $rc
