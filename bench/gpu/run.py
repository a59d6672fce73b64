"""GPU benchmark (run on the GPU machine): packed replicas against bare vLLM and one big engine.

Stages (each writes `<results>/<stage>.json`; `report` merges them with the GPU tests' results
into bench/results/gpu.json and prints a table):

- ``bare N``: N of vLLM's own OpenAI servers on GPU 0, started one after another, each at the
  utilization share of a ray-vram replica (budget / total), one `vllm bench serve` client each;
- ``one N``: one vLLM server holding the memory of N such shares, loaded by N clients;
- ``race``: ray-vram's local stack deploying 4 replicas on one GPU without the per-GPU startup
  lock (``RAY_VRAM_GPU_STARTUP_LOCK=0``) and without MPS: the start-up race the lock prevents;
- ``sizes``: `ray-vram measure` on a 1.5B Qwen2, a 7B-class and a 14B-class Llama (`bench.gpu.sizes`),
  each size's recommendation and peak over its share, also written into bench/results/gpu.json;
- ``pack``: three measured models on one GPU, one pending until another is removed (`bench.gpu.pack`);
- ``sleep``: measured models adding up to 3x the GPU awake, hopping requests, wake and cold start
  to first token (`bench.gpu.sleep`, writes bench/results/sleep.json);
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

from vram_scheduler.core import capacity
from vram_scheduler.core.config import gib_to_bytes

from .measured_stack import replica_budget_gb, replica_infos, replica_peaks
from .pack import run_pack
from .sizes import SIZES, run_sizes
from .sleep import run_sleep
from .tools import GIB, BareServer, NVMLSampler, bench_serve, gpus, process_tree, summarize, write_json

ROOT = Path(__file__).resolve().parents[2]
PROMPTS, CONCURRENCY = 1000, 64
#: Stages run for N = 1, 2, 4, 8 replicas or shares (N = 4 keeps the plain file name).
SWEPT = ("bare", "bare-mps", "one")


def share_of_budget(total_bytes: int) -> tuple[float, float]:
    """The replica budget the GPU tests use (a tenth of the GPU, in half GiB) and its share."""
    budget_gb = replica_budget_gb(total_bytes)
    return budget_gb, math.floor(budget_gb * GIB / total_bytes * 10_000) / 10_000


def run_servers(
    model: str, shares: list[float], clients_per_server: int, tag: str, mps_pipe: str | None = None
) -> dict[str, Any]:
    from vram_scheduler.serving.replica.mps import client_env

    gpu = gpus()[0]
    servers = [
        BareServer(model, 8100 + i, gpu["uuid"], share, Path(f"/tmp/rv-bench-{tag}-{i}.log"))
        for i, share in enumerate(shares)
    ]
    for server in servers:  # the same cap as a ray-vram replica: share + 2 GiB
        if mps_pipe:
            share_bytes = int(server.utilization * gpu["total_bytes"])
            cap = capacity.cap_bytes(share_bytes, 2 * GIB, gpu["total_bytes"])
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


def mixed_models(model: str, total_bytes: int) -> list[dict[str, Any]]:
    """Two GPUs' worth of replicas that only fit when planned as a whole: 2 "mid" of ~36% and 2
    "large" of ~56% of a GPU (with the 2 GiB overhead: 37.7% and 57.7%), listed mid first."""
    mid_gb = math.floor(total_bytes / GIB * 0.363)
    large_gb = math.floor(total_bytes / GIB * 0.563)
    common = {"model": model, "max_model_len": 2048, "max_tokens": 128}
    return [
        {"model_id": "mid", "vram_gb": mid_gb, "replicas": 2, **common},
        {"model_id": "large", "vram_gb": large_gb, "replicas": 2, **common},
    ]


def stage_stack(model: str, models: list[dict[str, Any]], lock: bool, load_prompts: int) -> dict[str, Any]:
    """ray-vram's local stack deploying `models` at once, with or without the per-GPU startup lock
    (without it MPS is off too, as a plain Ray deployment would run): how many replicas start, in
    what time, where; with `load_prompts`, a load through the router and each replica's NVML peak."""
    from vram_scheduler.core.config import parse_config
    from vram_scheduler.local.stack import LocalStack

    if not lock:
        os.environ["RAY_VRAM_GPU_STARTUP_LOCK"] = "0"
        os.environ["RAY_VRAM_MPS"] = "off"
    overhead_gb = 2.0
    config = parse_config(
        {
            "models": models,
            "placement": {"replica_overhead_gb": overhead_gb},
            "serving": {"host": "127.0.0.1", "port": 8190, "max_ongoing_requests": 512},
        }
    )
    local = LocalStack(config, controller_port=8191)
    outcome: dict[str, Any] = {"gpus": gpus(), "models": models, "lock": lock, "mps": lock}
    with NVMLSampler() as sampler:
        started = time.monotonic()
        try:
            local.start(progress=print)
            deadline = time.monotonic() + 500
            while time.monotonic() < deadline:
                states = [r for m in local.controller.status().model_dump(mode="json")["models"] for r in m["replicas"]]
                if states and all(r["state"] in ("ready", "failed") for r in states):
                    break
                time.sleep(1)
            outcome["seconds_until_settled"] = round(time.monotonic() - started, 1)
            keep = ("replica_id", "state", "gpu_index", "bytes", "error")
            outcome["replicas"] = [{k: r[k] for k in keep} for r in states]
            outcome["ready"] = sum(r["state"] == "ready" for r in states)
            print(f"{outcome['ready']}/{len(states)} replicas ready after {outcome['seconds_until_settled']}s")
            if load_prompts and outcome["ready"] == len(states):
                base = local.controller.endpoint.removesuffix("/v1")
                targets = [(base, r["replica_id"].rsplit("-", 1)[0]) for r in states]
                outcome["router_load"] = summarize(bench_serve(targets, model, "stack2", load_prompts, CONCURRENCY))
                model_ids = [m["model_id"] for m in models]
                outcome["replica_peaks"] = replica_peaks(sampler, replica_infos(model_ids), overhead_gb)
        finally:
            local.stop()
    return outcome


def stage_fractional(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Ray's own fractional-GPU placement of the same replicas (num_gpus = reservation / GPU total,
    created in the order the values list them, each placed before the next), against the planner's.
    No engines: an actor per replica reports the GPU Ray gave it, or stays pending."""
    import ray

    from vram_scheduler.core.config import ModelSpec, PlacementSettings
    from vram_scheduler.core.inventory import GPUInfo, Inventory, NodeInventory
    from vram_scheduler.core.planner import plan

    devices = gpus()
    overhead = 2 * GIB
    total = devices[0]["total_bytes"]

    @ray.remote
    class Slot:
        def gpu(self) -> list[str]:
            return [str(i) for i in ray.get_runtime_context().get_accelerator_ids()["GPU"]]

    outcome: dict[str, Any] = {"gpus": devices, "orders": {}}
    ray.init(num_gpus=len(devices), include_dashboard=False)
    try:
        for name, order in (("values order (mid first)", models), ("largest first", models[::-1])):
            actors, placed = [], []
            for spec in order:
                fraction = round(capacity.reservation_bytes(gib_to_bytes(spec["vram_gb"]), overhead) / total, 4)
                for number in range(spec["replicas"]):
                    actor = Slot.options(num_gpus=fraction, num_cpus=0).remote()  # type: ignore[attr-defined]
                    actors.append(actor)
                    try:
                        gpu = ray.get(actor.gpu.remote(), timeout=15)
                    except ray.exceptions.GetTimeoutError:
                        gpu = None
                    placed.append({"replica": f"{spec['model_id']}-{number}", "num_gpus": fraction, "gpu": gpu})
            outcome["orders"][name] = {"placed": placed, "pending": sum(p["gpu"] is None for p in placed)}
            for actor in actors:
                ray.kill(actor)
            time.sleep(2)
    finally:
        ray.shutdown()
    inventory = Inventory(
        nodes=[
            NodeInventory(
                node="this-node",
                gpus=[GPUInfo(**{k: d[k] for k in ("index", "uuid", "name", "total_bytes")}) for d in devices],
            )
        ]
    )
    specs = [ModelSpec(**m) for m in models]
    result = plan(inventory, specs, settings=PlacementSettings(replica_overhead_gb=2.0))
    outcome["planner"] = {
        "placed": [{"replica": r.replica_id, "gpu": r.gpu_index} for r in result.reservations],
        "unplaced": [u.model_dump() for u in result.unplaced],
    }
    return outcome


def report(results: Path, vllm_version: str) -> dict[str, Any]:
    def load(name: str) -> dict[str, Any] | None:
        path = results / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    stack, bare, bare_mps, one, race, isolation = (
        load(n) for n in ("stack", "bare", "bare-mps", "one", "race", "isolation")
    )
    sweep = []
    for n in (1, 2, 4, 8):
        suffix = "" if n == 4 else f"-{n}"
        packed = load(f"bare-mps{suffix}") if n > 1 else load("one-1")
        single = load(f"one{suffix}")
        if packed and single:
            sweep.append(
                {
                    "n": n,
                    "n_servers_mps": {
                        k: packed["load"][k] for k in ("output_tok_s", "median_ttft_ms", "median_tpot_ms", "failed")
                    },
                    "one_server_same_memory": {
                        k: single["load"][k] for k in ("output_tok_s", "median_ttft_ms", "median_tpot_ms", "failed")
                    },
                    "ready_s": packed["ready_s"],
                    "over_share_gib": [e["over_share_gib"] for e in packed["engines"]],
                }
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
        "sweep_one_gpu": sweep,
        "sizes": {name: _size_row(data) for name in SIZES if (data := load(f"sizes-{name}"))},
        "two_gpus": {
            "ray_fractional_vs_planner": load("fractional"),
            "planner_with_lock": load("two-gpu"),
            "without_lock": load("two-gpu-no-lock"),
        },
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
    if sweep:
        print(f"{'N':>2} {'N servers tok/s':>15} {'TTFT':>6} {'one server tok/s':>16} {'TTFT':>6} {'ratio':>6}")
    for row in sweep:
        a, b = row["n_servers_mps"], row["one_server_same_memory"]
        ratio = round(a["output_tok_s"] / b["output_tok_s"], 2) if b["output_tok_s"] else None
        row["packing_gain"] = ratio
        cells = (a["output_tok_s"], a["median_ttft_ms"], b["output_tok_s"], b["median_ttft_ms"], ratio)
        print(f"{row['n']:>2} {cells[0]:>15} {cells[1]:>6} {cells[2]:>16} {cells[3]:>6} {cells[4]!s:>6}")
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


def _size_row(measured: dict[str, Any]) -> dict[str, Any]:
    """What bench/results/gpu.json keeps of one size's measurement (the full result stays in sizes-*.json)."""
    return {k: v for k, v in measured.items() if k != "measure"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "stage",
        choices=["bare", "bare-mps", "one", "race", "fractional", "two-gpu", "sizes", "pack", "sleep", "report"],
    )
    parser.add_argument("n", nargs="?", type=int, default=4)
    parser.add_argument("--results", default=os.environ.get("RAY_VRAM_GPU_RESULTS", str(ROOT / ".work/gpu-results")))
    parser.add_argument("--model", default=os.environ.get("RAY_VRAM_GPU_MODEL", ""))
    parser.add_argument("--write", help="also write the merged report here (report stage)")
    parser.add_argument("--no-lock", action="store_true", help="two-gpu stage: without the startup lock and MPS")
    parser.add_argument("--vllm-version", help="report stage: the vLLM the stages ran with (default: this Python's)")
    parser.add_argument("--size", action="append", choices=list(SIZES), help="sizes stage: only these (repeatable)")
    parser.add_argument("--model-root", default="/tmp/rv-sizes", help="sizes, pack, sleep: the models' folder")
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
    if args.stage == "sizes":
        measured = run_sizes(args.size or list(SIZES), Path(args.model_root), results)
        target = Path(args.write) if args.write else ROOT / "bench/results/gpu.json"
        merged = json.loads(target.read_text()) if target.exists() else {}
        merged["sizes"] = {**merged.get("sizes", {}), **{k: _size_row(v) for k, v in measured.items()}}
        write_json(target, merged)
        print("GPU-BENCH-SIZES", json.dumps(merged["sizes"])[:3000])
        return 0 if all(not v.get("error") and not v.get("failed") for v in measured.values()) else 1
    if args.stage == "pack":
        packed = run_pack(Path(args.model_root), results)
        write_json(results / "pack.json", packed)
        target = Path(args.write) if args.write else ROOT / "bench/results/gpu.json"
        merged = json.loads(target.read_text()) if target.exists() else {}
        merged["pack"] = {k: v for k, v in packed.items() if k != "vram"}
        write_json(target, merged)
        print("GPU-BENCH-PACK", json.dumps(merged["pack"])[:4000])
        return 0
    if args.stage == "sleep":
        slept = run_sleep(Path(args.model_root), results)
        write_json(results / "sleep.json", slept)
        target = Path(args.write) if args.write else ROOT / "bench/results/sleep.json"
        write_json(target, {k: v for k, v in slept.items() if k != "vram"})
        print("GPU-BENCH-SLEEP", json.dumps({k: slept[k] for k in ("failed", "wake_to_first_token")})[:2000])
        return 0 if slept["failed"] == 0 else 1
    if not args.model:
        print("--model (or RAY_VRAM_GPU_MODEL) is required", file=sys.stderr)
        return 2
    assert gpu is not None
    _, share = share_of_budget(gpu["total_bytes"])
    if args.stage == "bare":
        data = run_servers(args.model, [share] * args.n, 1, "bare")
    elif args.stage == "bare-mps":
        from vram_scheduler.serving.replica import mps

        pipe, logs = "/tmp/rv-bench-mps/pipe", "/tmp/rv-bench-mps/log"
        mps.start_daemon(pipe, logs)
        try:
            data = run_servers(args.model, [share] * args.n, 1, "bare-mps", mps_pipe=pipe)
        finally:
            mps.stop_daemon(pipe, logs)
    elif args.stage == "one":
        data = run_servers(args.model, [round(share * args.n, 4)], args.n, "one")
    elif args.stage == "race":
        budget_gb = share_of_budget(gpu["total_bytes"])[0]
        four = {"model_id": "race", "model": args.model, "vram_gb": budget_gb, "replicas": 4, "max_model_len": 2048}
        data = stage_stack(args.model, [four], lock=False, load_prompts=0)
    elif args.stage == "fractional":
        data = stage_fractional(mixed_models(args.model, gpu["total_bytes"]))
    else:
        mixed = mixed_models(args.model, gpu["total_bytes"])
        data = stage_stack(args.model, mixed, lock=not args.no_lock, load_prompts=0 if args.no_lock else 500)
    name = args.stage + ("-no-lock" if args.no_lock else "")
    name += f"-{args.n}" if args.stage in SWEPT and args.n != 4 else ""
    write_json(results / f"{name}.json", data)
    print(f"GPU-BENCH-{name.upper()}", json.dumps({k: v for k, v in data.items() if k != "gpu"})[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
