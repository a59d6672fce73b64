"""GPU benchmark (run on the GPU machine): packed replicas against bare vLLM and one big engine.

Stages (each writes `<results>/<stage>.json`; `report` merges them with the GPU tests' results
into bench/results/gpu.json and prints a table):

- ``bare N``: N of vLLM's own OpenAI servers on GPU 0, started one after another, each at the
  utilization share of a ray-vram replica (budget / total), one `vllm bench serve` client each;
- ``one N``: one vLLM server holding the memory of N such shares, loaded by N clients;
- ``race``: ray-vram's local stack deploying 4 replicas on one GPU without the per-GPU startup
  lock (``RAY_VRAM_GPU_STARTUP_LOCK=0``) and without MPS: the start-up race the lock prevents;
- ``report``: the comparison with ray-vram's stack (tests/gpu/test_vllm_gpu.py writes stack.json:
  the same packing through the router).

Load: random prompts of 300 tokens, 128 output tokens (``--ignore-eos``), 1000 prompts and 64 in
flight per client. Usage: python -m bench.gpu.run STAGE [N] [--results DIR] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from .tools import GIB, BareServer, NVMLSampler, bench_serve, gpus, process_tree, summarize, write_json

ROOT = Path(__file__).resolve().parents[2]
PROMPTS, CONCURRENCY = 1000, 64


def share_of_budget(total_bytes: int) -> tuple[float, float]:
    """The replica budget the GPU tests use (a tenth of the GPU, in half GiB) and its share."""
    budget_gb = math.floor(total_bytes / GIB * 0.1 * 2) / 2
    return budget_gb, math.floor(budget_gb * GIB / total_bytes * 10_000) / 10_000


def run_servers(
    model: str, shares: list[float], clients_per_server: int, tag: str, mps_pipe: str | None = None
) -> dict[str, Any]:
    from vram_scheduler.serving.mps import client_env

    gpu = gpus()[0]
    servers = [
        BareServer(model, 8100 + i, gpu["uuid"], share, Path(f"/tmp/rv-bench-{tag}-{i}.log"))
        for i, share in enumerate(shares)
    ]
    for server in servers:  # the same cap as a ray-vram replica: share + 2 GiB
        if mps_pipe:
            cap = int(server.utilization * gpu["total_bytes"]) + 2 * GIB
            server.extra_env = client_env(mps_pipe, gpu["uuid"], cap)
    ready: list[float | None] = []
    with NVMLSampler() as sampler:
        started = time.monotonic()
        try:
            for server in servers:
                server.start()
                ready.append(server.wait())
                print(f"{tag}: server {server.port} at {server.utilization} ready in {ready[-1]}s", flush=True)
            all_ready_s = round(time.monotonic() - started, 1)
            live = [s for s, r in zip(servers, ready, strict=True) if r is not None]
            targets = [(s.url, "m") for s in live for _ in range(clients_per_server)]
            load = summarize(bench_serve(targets, model, tag, PROMPTS, CONCURRENCY))
            engines = []
            for server in servers:
                pids = process_tree(server.proc.pid) if server.proc else []
                peak = sampler.tree_peak(pids)
                share_bytes = int(server.utilization * gpu["total_bytes"])
                engines.append(
                    {
                        "port": server.port,
                        "utilization": server.utilization,
                        "share_bytes": share_bytes,
                        "nvml_peak_bytes": peak,
                        "over_share_gib": round((peak - share_bytes) / GIB, 3),
                        "errors": server.error_lines() if server.proc and server.proc.poll() is not None else [],
                    }
                )
        finally:
            for server in servers:
                server.stop()
    return {"gpu": gpu, "ready_s": ready, "all_ready_s": all_ready_s, "load": load, "engines": engines}


def stage_race(model: str) -> dict[str, Any]:
    """4 replicas at once on one GPU, no lock, no MPS: how many start, and why the others fail."""
    os.environ["RAY_VRAM_GPU_STARTUP_LOCK"] = "0"
    os.environ["RAY_VRAM_MPS"] = "off"
    from vram_scheduler.config import parse_config
    from vram_scheduler.serving.local import LocalStack

    gpu = gpus()[0]
    budget_gb, _ = share_of_budget(gpu["total_bytes"])
    config = parse_config(
        {
            "models": [
                {"model_id": "race", "model": model, "vram_gb": budget_gb, "replicas": 4, "max_model_len": 2048}
            ],
            "placement": {"replica_overhead_gb": 2.0},
            "serving": {"host": "127.0.0.1", "port": 8190},
        }
    )
    local = LocalStack(config, controller_port=8191)
    started = time.monotonic()
    outcome: dict[str, Any] = {"gpu": gpu, "budget_gb": budget_gb, "lock": False, "mps": False}
    try:
        local.start(progress=print)
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            states = [r for m in local.controller.status()["models"] for r in m["replicas"]]
            if all(r["state"] in ("ready", "failed") for r in states):
                break
            time.sleep(1)
        outcome["seconds"] = round(time.monotonic() - started, 1)
        outcome["replicas"] = [{k: r[k] for k in ("replica_id", "state", "error")} for r in states]
        outcome["ready"] = sum(r["state"] == "ready" for r in states)
    finally:
        local.stop()
    return outcome


def report(results: Path, vllm_version: str) -> dict[str, Any]:
    def load(name: str) -> dict[str, Any] | None:
        path = results / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    stack, bare, bare_mps, one, race, isolation = (
        load(n) for n in ("stack", "bare", "bare-mps", "one", "race", "isolation")
    )
    merged: dict[str, Any] = {
        "device": (stack or bare or {}).get("gpu"),
        "vllm_version": vllm_version,
        "model": "ray-vram demo-model --shape gpu: Qwen2, 28 layers, hidden 1536, bf16, random weights",
        "load": f"vllm bench serve: random {300} in / 128 out tokens, --ignore-eos, {PROMPTS} prompts and "
        f"{CONCURRENCY} in flight per client, one client process per replica or server",
        "ray_vram_stack": stack,
        "bare_vllm": bare,
        "bare_vllm_mps": bare_mps,
        "one_engine_same_memory": one,
        "race_without_lock": race,
        "isolation": isolation,
    }
    rows = []
    for name, data, tput in (
        ("ray-vram, 4 replicas via router", stack, (stack or {}).get("router_load")),
        ("bare vLLM, 4 servers", bare, (bare or {}).get("load")),
        ("bare vLLM, 4 servers, MPS", bare_mps, (bare_mps or {}).get("load")),
        ("one vLLM server, same memory", one, (one or {}).get("load")),
    ):
        if data and tput:
            rows.append((name, tput["output_tok_s"], tput["median_ttft_ms"], tput["median_tpot_ms"], tput["failed"]))
    print(f"{'stack':34} {'output tok/s':>12} {'TTFT ms':>8} {'TPOT ms':>8} {'failed':>6}")
    for row in rows:
        print(f"{row[0]:34} {row[1]:>12} {row[2]:>8} {row[3]:>8} {row[4]:>6}")
    for key, other in (("ray_vram_vs_bare", bare), ("ray_vram_vs_bare_mps", bare_mps)):
        if stack and other:
            s, b = stack["router_load"], other["load"]
            merged[key] = {
                "output_tok_s_ratio": round(s["output_tok_s"] / b["output_tok_s"], 3) if b["output_tok_s"] else None,
                "median_ttft_ratio": round(s["median_ttft_ms"] / b["median_ttft_ms"], 3)
                if b["median_ttft_ms"]
                else None,
            }
            print(f"{key}:", merged[key])
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["bare", "bare-mps", "one", "race", "report"])
    parser.add_argument("n", nargs="?", type=int, default=4)
    parser.add_argument("--results", default=os.environ.get("RAY_VRAM_GPU_RESULTS", str(ROOT / ".work/gpu-results")))
    parser.add_argument("--model", default=os.environ.get("RAY_VRAM_GPU_MODEL", ""))
    parser.add_argument("--write", help="also write the merged report here (report stage)")
    parser.add_argument("--vllm-version", help="report stage: the vLLM the stages ran with (default: this Python's)")
    args = parser.parse_args()
    results = Path(args.results)
    gpu = gpus()[0] if args.stage != "report" else None
    if args.stage == "report":
        if args.vllm_version is None:
            import vllm

            args.vllm_version = vllm.__version__
        merged = report(results, args.vllm_version)
        write_json(results / "gpu.json", merged)
        if args.write:
            write_json(Path(args.write), merged)
        return 0
    if not args.model:
        print("--model (or RAY_VRAM_GPU_MODEL) is required", file=sys.stderr)
        return 2
    assert gpu is not None
    _, share = share_of_budget(gpu["total_bytes"])
    if args.stage == "bare":
        data = run_servers(args.model, [share] * args.n, 1, "bare")
    elif args.stage == "bare-mps":
        from vram_scheduler.serving import mps

        pipe, logs = "/tmp/rv-bench-mps/pipe", "/tmp/rv-bench-mps/log"
        mps.start_daemon(pipe, logs)
        try:
            data = run_servers(args.model, [share] * args.n, 1, "bare-mps", mps_pipe=pipe)
        finally:
            mps.stop_daemon(pipe, logs)
    elif args.stage == "one":
        data = run_servers(args.model, [round(share * args.n, 4)], args.n, "one")
    else:
        data = stage_race(args.model)
    write_json(results / f"{args.stage}.json", data)
    print(f"GPU-BENCH-{args.stage.upper()}", json.dumps({k: v for k, v in data.items() if k != "gpu"})[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
