#!/usr/bin/env bash
# One GPU-machine session of the capacity benchmarks, run in the background so that it outlives a
# single command: `sizes` (ray-vram measure on the 7B-class, 1.5B and 14B-class models, in that
# order; $SIZES picks, PACK=0 skips pack) then `pack` (the measured models on one GPU), then `sleep` with
# SLEEP=1 (more models than the GPU holds awake). Progress: /tmp/rv-gpu-session.log;
# results: $RESULTS (default .work/gpu-results) and bench/results/gpu.json.
# Usage (repo root, with CUDA vLLM and Ray importable): bash bench/gpu/session.sh [start|collect OUT]
set -uo pipefail
RESULTS=${RESULTS:-$PWD/.work/gpu-results}
LOG=/tmp/rv-gpu-session.log
case "${1:-start}" in
  start)
    mkdir -p "$RESULTS"
    export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD
    nohup bash -c "
      for size in ${SIZES:-llama-7b qwen2-1.5b llama-14b}; do
        python -m bench.gpu.run sizes --size \$size --results '$RESULTS' || echo \"SIZES \$size FAILED\"
      done
      if [ '${PACK:-1}' = 1 ]; then python -m bench.gpu.run pack --results '$RESULTS' || echo 'PACK FAILED'; fi
      if [ '${SLEEP:-0}' = 1 ]; then python -m bench.gpu.run sleep --results '$RESULTS' || echo 'SLEEP FAILED'; fi
      echo SESSION-DONE" > "$LOG" 2>&1 &
    echo "started: $LOG"
    ;;
  collect)  # copy what exists so far to OUT (the device tool brings back 8 files at most)
    out=$2; mkdir -p "$out"
    cp -f "$RESULTS"/sizes-*.json "$RESULTS"/pack.json bench/results/gpu.json bench/results/sleep.json "$out"/ 2>/dev/null
    tail -c 2000000 "$LOG" > "$out/session.log" 2>/dev/null
    ls "$out"
    ;;
esac
