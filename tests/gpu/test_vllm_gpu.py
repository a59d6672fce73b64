"""Real CUDA vLLM through ray-vram's whole local stack on a real GPU (run on the GPU machine).

One stack for the module: `LocalStack` (embedded Ray, allocator, NVML monitor, MPS daemon,
controller, OpenAI router) serving 4 replicas of a random-weight Qwen2 of real size
(`ray-vram demo-model --shape gpu`) on GPU 0, each with a budget of a tenth of the GPU. An NVML
sampler runs from before the first replica starts, so start-up, CUDA-graph capture and load all
count towards each replica's peak.

- pinning: every engine process is on the GPU its reservation names; the replica actor itself
  holds no CUDA context;
- the startup lock: the 4 replicas (one GPU) start 4/4;
- budgets: under `vllm bench serve` load with prompts up to `max_model_len`, at high concurrency,
  each replica's process tree peaks at or under its reservation (budget + overhead);
- isolation: a replica that outgrows its reservation (its KV cache forced past the cap) fails
  alone, its neighbours answer a load at the same time with zero errors, and the ledger frees it.

Results (JSON) go to $RAY_VRAM_GPU_RESULTS (default .work/gpu-results); bench/gpu/run.py reads them.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("RAY_VRAM_GPU_RESULTS", ROOT / ".work" / "gpu-results"))
GIB = 1024**3
REPLICAS = 4
MAX_MODEL_LEN = 2048
OVERHEAD_GB = float(os.environ.get("RAY_VRAM_GPU_OVERHEAD_GB", "2.0"))
#: KV block of the gpu demo shape: 2 (K and V) x 28 layers x 2 KV heads x 128 head size x 2 bytes x 16 tokens.
KV_BLOCK_BYTES = 2 * 28 * 2 * 128 * 2 * 16


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight model of real size, made in a child process (no CUDA context here)."""
    from bench.gpu.measured_stack import generated_model

    return generated_model(Path(os.environ.get("RAY_VRAM_GPU_MODEL") or tmp_path_factory.mktemp("gpu") / "model"))


@dataclass
class Stack:
    local: Any
    sampler: Any
    model_dir: Path
    gpu: dict[str, Any]
    budget_gb: float
    ready_s: float

    def replicas(self, model_id: str = "packed") -> list[dict[str, Any]]:
        from bench.gpu.measured_stack import replica_infos

        return replica_infos([model_id])

    @property
    def router_base(self) -> str:
        return self.local.controller.endpoint.removesuffix("/v1")


@pytest.fixture(scope="module")
def stack(gpu_model: Path) -> Iterator[Stack]:
    from bench.gpu.measured_stack import measured_stack, replica_budget_gb
    from bench.gpu.tools import gpus

    gpu = gpus()[0]
    budget_gb = replica_budget_gb(gpu["total_bytes"])
    model = {
        "model_id": "packed",
        "model": str(gpu_model),
        "vram_gb": budget_gb,
        "replicas": REPLICAS,
        "max_model_len": MAX_MODEL_LEN,
        "max_tokens": 128,
    }
    with measured_stack([model], OVERHEAD_GB) as running:
        print(f"{REPLICAS} replicas of {budget_gb} GiB ready in {running.ready_s}s")
        yield Stack(running.local, running.sampler, gpu_model, gpu, budget_gb, running.ready_s)


def _trees(infos: list[dict[str, Any]]) -> dict[str, list[int]]:
    from bench.gpu.measured_stack import replica_tree

    return {i["replica_id"]: replica_tree(i) for i in infos}


def test_replicas_pinned_and_inside_their_reservations_under_load(stack: Stack) -> None:
    from bench.gpu.measured_stack import replica_peaks
    from bench.gpu.tools import bench_serve, nvml_processes, summarize, write_json

    infos = stack.replicas()
    assert len(infos) == REPLICAS and all("url" in i for i in infos), infos
    trees = _trees(infos)
    on_gpu = nvml_processes()
    for info in infos:
        assert info["gpu_uuid"] == stack.gpu["uuid"]
        actor, engines = info["pids"][0], [p for p in trees[info["replica_id"]] if p in on_gpu]
        assert actor not in on_gpu, f"replica actor {actor} holds a CUDA context: {on_gpu[actor]}"
        assert engines, f"no engine process of {info['replica_id']} on the GPU (NVML: {on_gpu})"
        assert all(on_gpu[p][0] == info["gpu_uuid"] for p in engines)

    RESULTS.mkdir(parents=True, exist_ok=True)
    targets = [(i["url"], "packed") for i in infos]
    # Prompts of 85 to 1615 tokens (+128 out), 64 at a time per replica. Random token ids grow by up
    # to ~25% when the server re-tokenizes their text: longer ones would pass max_model_len (400).
    long_load = summarize(
        bench_serve(targets, str(stack.model_dir), "long", 384, 64, input_len=850, output_len=128, range_ratio=0.9)
    )
    # The throughput workload, through the router: one client process per replica.
    router_load = summarize(
        bench_serve([(stack.router_base, "packed")] * REPLICAS, str(stack.model_dir), "router", 1000, 64)
    )
    replicas = replica_peaks(stack.sampler, infos, OVERHEAD_GB)
    result = {
        "gpu": stack.gpu,
        "budget_gb": stack.budget_gb,
        "overhead_gb": OVERHEAD_GB,
        "replicas_ready_s": stack.ready_s,
        "long_prompts_load": long_load,
        "router_load": router_load,
        "replicas": replicas,
    }
    write_json(RESULTS / "stack.json", result)
    print("GPU-STACK-RESULT", {k: v for k, v in result.items() if k not in ("long_prompts_load", "router_load")})
    print(
        "loads",
        {k: {x: y for x, y in result[k].items() if x != "clients"} for k in ("long_prompts_load", "router_load")},
    )
    assert long_load["failed"] == 0 and router_load["failed"] == 0
    over = [r for r in replicas if r["nvml_peak_bytes"] > r["reservation_bytes"]]
    assert not over, f"replicas over their reservation: {over}"


def test_outgrown_replica_fails_alone(stack: Stack) -> None:

    from bench.gpu.tools import bench_serve, summarize, write_json
    from vram_scheduler.core.config import ModelSpec

    infos = stack.replicas()
    neighbours: dict[str, Any] = {}

    def load() -> None:
        targets = [(i["url"], "packed") for i in infos]
        neighbours.update(summarize(bench_serve(targets, str(stack.model_dir), "neighbours", 800, 32)))

    loader = threading.Thread(target=load)
    loader.start()
    forced_kv = 12 * GIB  # far past a 4 GiB budget + overhead: the engine outgrows its reservation
    greedy = ModelSpec(
        model_id="greedy",
        model=str(stack.model_dir),
        vram_gb=4,
        replicas=1,
        max_model_len=MAX_MODEL_LEN,
        engine_kwargs={"num_gpu_blocks_override": forced_kv // KV_BLOCK_BYTES},
    )
    stack.local.controller.deploy(greedy)
    with pytest.raises(RuntimeError) as failure:
        stack.local.controller.wait_ready(["greedy"], timeout_s=300)
    loader.join()
    allocator = stack.local.controller.allocator
    deadline = time.monotonic() + 60
    while any(r.model_id == "greedy" for r in allocator.reservations()):
        assert time.monotonic() < deadline, "the failed replica's reservation was never freed"
        time.sleep(1)
    stack.local.controller.remove("greedy")
    result = {"greedy_error": str(failure.value)[:2000], "neighbours_load": neighbours}
    write_json(RESULTS / "isolation.json", result)
    print("GPU-ISOLATION-RESULT", result["greedy_error"][:600], {k: v for k, v in neighbours.items() if k != "clients"})
    assert neighbours["failed"] == 0 and neighbours["completed"] == 800 * len(infos)
    assert all(i["replica_id"] in {x["replica_id"] for x in stack.replicas()} for i in infos)
