"""On a real GPU, without vLLM: the replica start-up path (reservation → pinning → cap → ledger)
with a stand-in engine (`serving_standin.StandInReplica`). Two models, three replicas: each lands
on the GPU its reservation names (NVML confirms each process's GPU), each is capped to its budget
(an over-budget allocation fails in that replica alone), and the ledger agrees with NVML's
per-process usage within the per-replica overhead. With two or more GPUs, GPU 0 is mostly taken
by an unmanaged process first, so the plan spreads replicas where Ray's fractional packing would
not. Prints one JSON line `GPU-REPLICA-RESULT` for the record."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
HERE = Path(__file__).resolve().parent

GIB = 1024**3
FREE_ON_GPU0_GIB = 10  # with 2+ GPUs: what an unmanaged process leaves free on GPU 0


def nvml_processes() -> dict[int, tuple[str, int]]:
    """pid → (GPU uuid, used bytes) for every compute process NVML reports."""
    import pynvml

    pynvml.nvmlInit()
    seen = {}
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            seen[proc.pid] = (uuid, int(proc.usedGpuMemory or 0))
    return seen


def test_replicas_pinned_capped_and_accounted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray workers (the replicas) import the stand-in from this folder.
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
    import pynvml
    import ray
    import torch
    from ray import serve
    from serving_standin import StandInReplica

    from vram_scheduler.allocator import NAMESPACE, get_vram_allocator
    from vram_scheduler.config import ModelSpec, PlacementSettings, ServingSettings
    from vram_scheduler.demo_model import generate_demo_model
    from vram_scheduler.monitor.readers import NVMLReader
    from vram_scheduler.monitor.service import MonitorService, MonitorSettings
    from vram_scheduler.planner import Plan
    from vram_scheduler.serving.app import model_app_name, model_application, replica_env

    pynvml.nvmlInit()
    n_gpus = pynvml.nvmlDeviceGetCount()
    model_dir = generate_demo_model(tmp_path / "model")
    hog = None
    if n_gpus >= 2:  # an unmanaged workload on GPU 0: the planner must see it, Ray's GPU count does not
        free = torch.cuda.mem_get_info(0)[0]
        hog = torch.empty(free - FREE_ON_GPU0_GIB * GIB, dtype=torch.uint8, device="cuda:0")
    ray.init(address="local", num_cpus=8, num_gpus=n_gpus, include_dashboard=False, namespace=NAMESPACE)
    serve.start(proxy_location="Disabled")
    allocator = get_vram_allocator()
    monitor = MonitorService(
        NVMLReader("gpu-node"),
        MonitorSettings(node="gpu-node", interval_s=0.5, host="127.0.0.1", port=0, ray_address="auto"),
    )
    threading.Thread(target=monitor.run, daemon=True).start()
    result: dict = {"gpus": n_gpus}
    try:
        deadline = time.monotonic() + 60
        while len(ray.get(allocator.get_vram_state.remote())["gpus"]) < n_gpus:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.5)  # a few polls, so the hog counts as unmanaged
        specs = [
            ModelSpec(model_id="small", model=str(model_dir), vram_gb=3, replicas=2),
            ModelSpec(model_id="large", model=str(model_dir), vram_gb=5, replicas=1),
        ]
        plan = Plan.model_validate(
            ray.get(allocator.plan.remote([s.model_dump(mode="json") for s in specs], PlacementSettings().model_dump()))
        )
        assert plan.complete, plan.unplaced
        result["plan"] = {r.replica_id: r.gpu_index for r in plan.reservations}
        for spec in specs:
            app = model_application(
                spec, plan.replicas_of(spec.model_id), ServingSettings(), replica_env(), StandInReplica
            )
            serve.run(app, name=model_app_name(spec.model_id), route_prefix=None)
        handles = {
            r.replica_id: serve.get_deployment_handle(r.replica_id, app_name=model_app_name(r.model_id))
            for r in plan.reservations
        }
        where = {rid: h.where.remote().result(timeout_s=120) for rid, h in handles.items()}
        nvml = nvml_processes()
        placed = {}
        for reservation in plan.reservations:
            info = where[reservation.replica_id]
            assert info["cuda_visible_devices"] == reservation.gpu_uuid
            assert info["torch_device_uuid"] == reservation.gpu_uuid
            assert nvml[info["pid"]][0] == reservation.gpu_uuid  # NVML: the process is on the planned GPU
            placed[reservation.replica_id] = nvml[info["pid"]][0]
        result["nvml_gpu_of_replica"] = placed
        time.sleep(2)  # monitor polls catch the loaded replicas
        state = ray.get(allocator.get_vram_state.remote())
        ledger = {r["replica_id"]: r for g in state["gpus"] for r in g["replicas"]}
        usage = {}
        overhead = int(PlacementSettings().replica_overhead_gb * GIB)  # the shipped default
        for rid, entry in ledger.items():
            used = entry["used_bytes"]
            assert used is not None and used <= entry["bytes"] + overhead, (rid, used, entry["bytes"])
            assert used >= 0.5 * entry["bytes"], (rid, used)  # the stand-in KV buffer is really there
            usage[rid] = {"budget_gib": round(entry["bytes"] / GIB, 2), "nvml_used_gib": round(used / GIB, 2)}
        result["ledger_vs_nvml"] = usage
        # Over budget: that replica's allocation fails; every replica (it too) keeps answering.
        victim = "small-0"
        over = handles[victim].allocate.remote(int(3 * GIB)).result(timeout_s=120)
        assert over.startswith("oom"), over
        result["over_budget"] = {victim: over}
        result["answers_after"] = {rid: h.generate.remote(8).result(timeout_s=120) for rid, h in handles.items()}
        assert set(result["answers_after"].values()) == {8}
        for spec in specs:
            serve.delete(model_app_name(spec.model_id))
        result["ledger_after_delete"] = ray.get(allocator.reservations.remote())
        assert result["ledger_after_delete"] == []
    finally:
        print("GPU-REPLICA-RESULT " + json.dumps(result), flush=True)
        monitor.stop()
        serve.shutdown()
        ray.shutdown()
        del hog
