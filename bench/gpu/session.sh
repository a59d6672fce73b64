#!/usr/bin/env bash
# The capacity benchmarks on the GPU machine, one stage per call: `sizes` (ray-vram measure on the
# 7B-class, 1.5B and 14B-class models; $SIZES picks) then `pack` (the measured models on one GPU), and
# `sleep` (more models than the GPU holds awake, after `sizes`; bench/results/sleep.json).
# Everything runs in the foreground: the device tool ends a command's background processes with the
# command (seen 2026-12-07), so each call must finish its stage within the per-call limit (10 min):
# a size takes 150-210 s on an H100 (two engine starts and a load each), pack about 6 min.
# Results: $RESULTS (default .work/gpu-results, kept between calls on a warm machine) and
# bench/results/gpu.json; `collect OUT` copies them to OUT.
# Usage (repo root, with CUDA vLLM and Ray importable): bash bench/gpu/session.sh sizes|recorded|pack|sleep|collect OUT
set -uo pipefail
RESULTS=${RESULTS:-$PWD/.work/gpu-results}
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD
mkdir -p "$RESULTS"
case "${1:-sizes}" in
  sizes)
    for size in ${SIZES:-llama-7b qwen2-1.5b llama-14b}; do
      python -m bench.gpu.run sizes --size "$size" --results "$RESULTS" || echo "SIZES $size FAILED"
    done
    ;;
  recorded)  # a fresh machine: the sizes results recorded in bench/results/gpu-logs (the newest of
    # each size) stand in for a `sizes` run; pack and sleep make the models they name when missing
    for size in ${SIZES:-llama-7b qwen2-1.5b llama-14b}; do
      latest=$(ls bench/results/gpu-logs/sizes-"$size"-*.json 2>/dev/null | sort | tail -n 1)
      [ -n "$latest" ] && cp "$latest" "$RESULTS/sizes-$size.json" && echo "recorded: $latest"
    done
    ;;
  pack)
    python -m bench.gpu.run pack --results "$RESULTS" || echo "PACK FAILED"
    ;;
  sleep)
    python -m bench.gpu.run sleep --results "$RESULTS" || echo "SLEEP FAILED"
    ;;
  collect)  # copy what exists so far to OUT (the device tool brings back 8 files at most)
    out=$2; mkdir -p "$out"
    cp -f "$RESULTS"/sizes-*.json "$RESULTS"/pack.json bench/results/gpu.json bench/results/sleep.json "$out"/ 2>/dev/null
    ls "$out"
    ;;
esac
