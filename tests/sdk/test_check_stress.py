"""`ray-vram check --stress`: the verdict rules on pydantic inputs, and the burn-in itself on a real
multi-node Ray cluster (`ray.cluster_utils.Cluster`) with a real allocator. No GPU here: the CPU
phase runs for real; GPUs come from a declared inventory, so the GPU phase shows its skip rules and
its failure path (a GPU the node does not have), reservation taken and given back."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # imported after the environment above is set
from ray.cluster_utils import Cluster
from stack import run_cli
from waiting import wait_until

from vram_scheduler.allocator.actor import AllocatorClient
from vram_scheduler.core.config import GIB, ConfigError, PlacementSettings
from vram_scheduler.core.inventory import GPUInfo, NodeInventory
from vram_scheduler.core.ledger import Ledger
from vram_scheduler.core.ray_names import NODE_NAME_LABEL
from vram_scheduler.tools.stress import gpu as stress_gpu
from vram_scheduler.tools.stress.report import CPUStress, GPUStress, build_report, judge_cpus, judge_gpus, notes, rows
from vram_scheduler.tools.stress.runner import (
    MIN_STRESS_BYTES,
    RayNode,
    gpu_targets,
    ray_nodes,
    run_stress,
    select_names,
)

H100 = "NVIDIA H100 80GB HBM3"
SETTINGS = PlacementSettings(stale_after_s=3600)


# --------------------------------------------------------------------------- verdict rules (pure)


def gpu(index: int = 0, name: str = H100, **fields: object) -> GPUStress:
    """A healthy, well-measured GPU result; `fields` override."""
    base: dict[str, object] = {
        "node": "gpu-1",
        "index": index,
        "uuid": f"GPU-{index}",
        "name": name,
        "replica_id": f"stress-gpu-1-{index}",
        "reserved_bytes": 40 * GIB,
        "overhead_bytes": GIB,
        "allocated_bytes": 39 * GIB,
        "nvml_bytes": 39 * GIB + 500 * 1024**2,
        "bf16_tflops": 700.0,
        "fp16_tflops": 710.0,
        "copy_gbps": 2900.0,
        "temperature_c": 60,
        "sm_clock_mhz": 1980,
        "mem_clock_mhz": 2619,
        "ecc_uncorrected": 0,
        "ecc_corrected": 0,
        "throttle_reasons": ["sw_power_cap"],
    }
    return GPUStress.model_validate(base | fields)


def cpu(node: str, gflops: float | None, model: str = "AMD EPYC 9654", threads: int = 8, **fields) -> CPUStress:
    return CPUStress(node=node, node_id=node * 4, cpu_model=model, threads=threads, gflops=gflops, **fields)


def test_a_node_slower_than_the_ratio_of_its_models_median_is_slow() -> None:
    verdicts = judge_cpus([cpu("a", 100), cpu("b", 102), cpu("c", 60)], slow_ratio=0.7)
    assert [v.status for v in verdicts] == ["ok", "ok", "slow"]
    assert "GFLOP/s 60.0 is 0.60 × the median 100.0 of 3 AMD EPYC 9654 × 8 threads (limit 0.7 ×)" in verdicts[2].reasons
    report = build_report([], [cpu("a", 100), cpu("b", 102), cpu("c", 60)], 5, 0.5, 0.7)
    assert not report.ok
    assert build_report([], [cpu("a", 100), cpu("c", 60), cpu("b", 102)], 5, 0.5, 0).ok, "ratio 0 turns it off"


def test_nodes_are_compared_only_with_their_own_model() -> None:
    results = [cpu("a", 100), cpu("b", 30, model="Intel Xeon 6430"), cpu("c", 40, threads=2)]
    assert [v.status for v in judge_cpus(results, 0.7)] == ["ok", "ok", "ok"]


def test_a_failed_node_fails_the_burn_in_and_leaves_the_median_to_the_others() -> None:
    results = [cpu("a", None, error="the CPU task on a failed: NodeDiedError"), cpu("b", 100), cpu("c", 50)]
    verdicts = judge_cpus(results, 0.7)
    assert verdicts[0].status == "failed" and verdicts[0].reasons == ["the CPU task on a failed: NodeDiedError"]
    assert verdicts[2].status == "slow", "50 < 0.7 × the median of b and c (75), the failed node not counted"
    assert not build_report([], results, 5, 0.5, 0.7).ok


def test_a_skipped_gpu_is_reported_not_failed() -> None:
    skipped = GPUStress(node="gpu-1", index=1, uuid="GPU-1", name=H100, replica_id="x", skipped="0.50 GiB free")
    report = build_report([gpu(0), skipped], [], 5, 0.5, 0.7)
    assert [v.status for v in report.gpu_verdicts] == ["ok", "skipped"]
    assert report.gpu_verdicts[1].reasons == ["0.50 GiB free"]
    assert report.ok
    assert rows(report)[1][-1] == "skipped"
    assert notes(report) == ["gpu node gpu-1, GPU 1: skipped: 0.50 GiB free"]


def test_memory_nvml_misreports_fail_the_burn_in() -> None:
    under = gpu(0, nvml_bytes=30 * GIB)
    over = gpu(1, nvml_bytes=42 * GIB)
    unseen = gpu(2, nvml_bytes=None, nvml_note="own pid 7 not listed; 0 new process(es); listed: none")
    verdicts = judge_gpus([under, over, unseen, gpu(3)], 0.7)
    assert [v.status for v in verdicts] == ["misreported", "misreported", "misreported", "ok"]
    assert (
        "NVML sees 30.00 GiB used by the stress process, less than the 39.00 GiB torch holds" in verdicts[0].reasons[0]
    )
    assert (
        "more than its reservation of 41.00 GiB (40.00 GiB budget + 1.00 GiB overhead; over by 1.00 GiB)"
        in (verdicts[1].reasons[0])
    )
    assert (
        "NVML lists no memory for the stress process on node gpu-1, GPU 2 (own pid 7 not listed"
        in (verdicts[2].reasons[0])
    )
    assert not build_report([under], [], 5, 0.5, 0.7).ok


def test_ecc_xid_and_hardware_throttling_fail_a_gpu_but_power_capping_does_not() -> None:
    results = [
        gpu(0, ecc_uncorrected=2),
        gpu(1, xids=[79]),
        gpu(2, throttle_reasons=["sw_power_cap", "hw_thermal_slowdown"]),
        gpu(3, throttle_reasons=["sw_power_cap"], ecc_uncorrected=None, ecc_corrected=None),
        gpu(4, error="RuntimeError: 3 byte(s) of the 30.00 GiB filler read back changed"),
    ]
    verdicts = judge_gpus(results, 0.7)
    assert [v.status for v in verdicts] == ["failed", "failed", "failed", "ok", "failed"]
    assert verdicts[0].reasons == ["2 uncorrected ECC error(s) during the run"]
    assert verdicts[1].reasons == ["critical XID event(s) 79 during the run"]
    assert verdicts[2].reasons == ["throttled by hw_thermal_slowdown under load"]
    assert verdicts[4].reasons == ["RuntimeError: 3 byte(s) of the 30.00 GiB filler read back changed"]


def test_a_gpu_is_slow_against_the_median_of_its_own_name() -> None:
    results = [gpu(0), gpu(1), gpu(2, copy_gbps=1000.0), gpu(3, name="NVIDIA L4", bf16_tflops=100.0)]
    verdicts = judge_gpus(results, 0.7)
    assert [v.status for v in verdicts] == ["ok", "ok", "slow", "ok"]
    assert verdicts[2].reasons == [f"copy GB/s 1000.0 is 0.34 × the median 2900.0 of 3 {H100} (limit 0.7 ×)"]


def test_table_rows_carry_throughput_memory_end_state_and_verdict() -> None:
    report = build_report([gpu(0, xids=[48])], [cpu("a", 12.5)], 5, 0.5, 0.7)
    gpu_row, cpu_row = rows(report)
    assert gpu_row[:4] == ["gpu", "gpu-1", "GPU 0 GPU-0", H100]
    assert gpu_row[4] == "bf16 700.0 · fp16 710.0 · copy 2900.0 (TFLOP/s, GB/s)"
    assert gpu_row[5] == "39.49 / 39.00 / 40.00+1.00 GiB"
    assert "60 °C" in gpu_row[6] and "SM 1980 / mem 2619 MHz" in gpu_row[6] and "XID 48" in gpu_row[6]
    assert gpu_row[7] == "failed"
    assert cpu_row == ["cpu", "a", "CPU (aaaa)", "AMD EPYC 9654 × 8 threads", "12.5 GFLOP/s", "-", "-", "ok"]
    assert notes(report) == ["gpu node gpu-1, GPU 0: failed: critical XID event(s) 48 during the run"]


def test_throttle_bits_and_matrix_sizes() -> None:
    assert stress_gpu.throttle_names(0x1 | 0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert stress_gpu.matrix_size(80 * GIB) == 8192 and stress_gpu.matrix_size(GIB) == 4096
    assert 3 * stress_gpu.matrix_size(MIN_STRESS_BYTES) ** 2 * 2 <= MIN_STRESS_BYTES // 8


def _state(*gpus: GPUInfo, stale_node: str | None = None) -> Ledger:
    ledger = Ledger()
    ledger.configure(SETTINGS)
    by_node: dict[str, list[GPUInfo]] = {}
    for g in gpus:
        by_node.setdefault(g.node, []).append(g)
    for node, listed in by_node.items():
        arrived = -SETTINGS.stale_after_s * 2 if node == stale_node else time.time()
        source = "host-memory" if listed[0].uuid.startswith("host-") else "file"
        ledger.update_inventory(NodeInventory(node=node, gpus=listed, source=source), arrived)
    return ledger


def test_gpu_targets_budget_and_skip_rules() -> None:
    nodes = [RayNode("id-a", "gpu-a", 8, frozenset({"gpu-a", "id-a"}))]
    ledger = _state(
        GPUInfo(node="gpu-a", index=0, uuid="GPU-a0", name=H100, total_bytes=80 * GIB, used_bytes=20 * GIB),
        GPUInfo(node="gpu-a", index=1, uuid="GPU-a1", name=H100, total_bytes=80 * GIB, used_bytes=int(79.5 * GIB)),
        GPUInfo(node="gpu-a", index=2, uuid="GPU-a2", name=H100, total_bytes=80 * GIB, healthy=False),
        GPUInfo(node="declared", index=0, uuid="GPU-d0", name=H100, total_bytes=80 * GIB),
        GPUInfo(node="laptop", index=0, uuid="host-laptop", name="host memory", total_bytes=16 * GIB),
    )
    ledger.reserve("llm-0", "llm", 50 * GIB, time.time(), "GPU-a0")
    targets = {t.gpu.uuid: t for t in gpu_targets(ledger.state(time.time()), nodes, 0.5)}
    a0 = targets["GPU-a0"]
    # 0.5 × 60 GiB free = 30 GiB, but the ledger leaves 80 − 20 (unmanaged) − 50.75 − 0.75 overhead = 8.5 GiB.
    assert a0.skip is None and a0.ray_node == nodes[0] and a0.replica_id == "stress-gpu-a-0"
    assert a0.budget_bytes == 80 * GIB - 20 * GIB - 50 * GIB - 2 * a0.overhead_bytes
    assert "0.5 × 0.50 GiB free" in targets["GPU-a1"].skip and "not forced" in targets["GPU-a1"].skip
    assert targets["GPU-a2"].skip == "the monitor reports it unhealthy: it takes no reservations"
    assert targets["GPU-d0"].skip.startswith("node declared is not an alive Ray node")
    assert "host memory standing in for a GPU" in targets["host-laptop"].skip
    only = gpu_targets(
        ledger.state(time.time()), nodes, 0.5, select_names(["laptop"], ledger.state(time.time()), nodes)
    )
    assert [t.gpu.uuid for t in only] == ["host-laptop"]
    with pytest.raises(ConfigError, match="no node named 'nowhere'"):
        select_names(["nowhere"], ledger.state(time.time()), nodes)


def test_a_stale_node_is_skipped() -> None:
    nodes = [RayNode("id-a", "gpu-a", 8, frozenset({"gpu-a"}))]
    ledger = _state(GPUInfo(node="gpu-a", index=0, uuid="GPU-a0", name=H100, total_bytes=80 * GIB), stale_node="gpu-a")
    (target,) = gpu_targets(ledger.state(time.time()), nodes, 0.5)
    assert target.skip == "node gpu-a is stale (no inventory lately): it takes no reservations"


# --------------------------------------------------------------------------- on a real Ray cluster

NODE_ARGS = {"object_store_memory": 80 * 1024**2}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head without CPUs (as the chart's) and two CPU workers named stress-a and stress-b."""
    ray_cluster = Cluster(initialize_head=True, head_node_args=NODE_ARGS | {"num_cpus": 0, "include_dashboard": False})
    try:
        for name in ("stress-a", "stress-b"):
            ray_cluster.add_node(**NODE_ARGS, num_cpus=1, labels={NODE_NAME_LABEL: name})
        ray_cluster.wait_for_nodes()
        ray.init(address=ray_cluster.address)
        AllocatorClient().configure(SETTINGS)
        yield ray_cluster
    finally:
        ray.shutdown()
        ray_cluster.shutdown()


def publish(*inventories: NodeInventory) -> None:
    allocator = AllocatorClient()
    for inventory in inventories:
        allocator.update_inventory(inventory)


def stress_reservations() -> list[str]:
    return [r.replica_id for r in AllocatorClient().reservations() if r.replica_id.startswith("stress-")]


def test_cpu_phase_on_every_cpu_node_json_exit_0(cluster: Cluster) -> None:
    publish(NodeInventory(node="stress-a", source="host-memory", gpus=[host_gpu("stress-a")]))
    # --slow-ratio 0: both "nodes" share this machine's cores with other tests, so their speeds say
    # nothing about the hardware; the slow rule is tested on pydantic inputs above.
    result = run_cli(
        "check", "--stress", "--ray-address", cluster.address, "--seconds", "2", "--slow-ratio", "0", "--output", "json"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert sorted(c["node"] for c in report["cpus"]) == ["stress-a", "stress-b"], "the head has no CPUs"
    assert all(c["gflops"] > 0 and c["error"] is None and c["threads"] == 1 for c in report["cpus"])
    assert [v["status"] for v in report["cpu_verdicts"]] == ["ok", "ok"]
    assert [(g["uuid"], v["status"]) for g, v in zip(report["gpus"], report["gpu_verdicts"], strict=True)] == [
        ("host-stress-a", "skipped")
    ]


def host_gpu(node: str) -> GPUInfo:
    return GPUInfo(node=node, index=0, uuid=f"host-{node}", name="host memory", total_bytes=16 * GIB)


def test_missing_gpu_fails_full_gpu_is_skipped_table_exit_1(cluster: Cluster) -> None:
    """stress-b's inventory names two GPUs this machine does not have: one with room (its actor reserves,
    finds no such GPU, fails and gives the reservation back) and one full (skipped before anything runs)."""
    publish(
        NodeInventory(
            node="stress-b",
            gpus=[
                GPUInfo(index=0, uuid="GPU-stress-b-0", name=H100, total_bytes=80 * GIB),
                GPUInfo(index=1, uuid="GPU-stress-b-1", name=H100, total_bytes=80 * GIB, used_bytes=79 * GIB),
            ],
        )
    )
    result = run_cli("check", "--stress", "--ray-address", cluster.address, "--seconds", "1", "--nodes", "stress-b")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    failed = [line for line in lines if line.startswith("gpu node stress-b, GPU 0: failed: ")]
    assert failed and "GPU GPU-stress-b-0 is not visible through NVML on Ray node" in failed[0], result.stdout
    assert "this node has no such GPU" in failed[0]
    skipped = [line for line in lines if line.startswith("gpu node stress-b, GPU 1: skipped: 0.5 × 1.00 GiB free")]
    assert skipped and skipped[0].endswith("not forced"), result.stdout
    assert "stress-a" not in result.stdout, "--nodes stress-b leaves stress-a out"
    assert "burn-in FAILED: 2 GPU(s), 1 node(s)" in result.stdout
    assert stress_reservations() == [], "the failed GPU's reservation was given back"


def test_room_taken_after_planning_is_refused_and_reported_in_the_allocators_words(cluster: Cluster) -> None:
    """Planned with room; by the time the actor reserves, the monitor has seen another process take
    the GPU: the allocator refuses, the GPU is skipped, and the reason is the allocator's own text
    (not Ray's remote traceback with terminal colours). Seen so on the GPU machine."""
    from vram_scheduler.tools.stress.runner import GPUStressActor

    free = GPUInfo(index=0, uuid="GPU-stress-a-0", name=H100, total_bytes=80 * GIB)
    publish(NodeInventory(node="stress-a", gpus=[free]))
    state = AllocatorClient().vram_state()
    target = next(t for t in gpu_targets(state, ray_nodes(), 0.5) if t.gpu.uuid == "GPU-stress-a-0")
    assert target.skip is None
    publish(NodeInventory(node="stress-a", gpus=[free.model_copy(update={"used_bytes": 78 * GIB})]))
    result = ray.get(ray.remote(GPUStressActor).options(num_cpus=0).remote().run.remote(target, 1), timeout=120)
    skipped = result["skipped"] or ""
    assert skipped.startswith("the allocator refused the stress reservation: model ray-vram-stress needs "), result
    assert "ray::" not in skipped and "\x1b[" not in skipped and "Traceback" not in skipped, skipped
    assert result["error"] is None and result["reserved_bytes"] == 0
    assert stress_reservations() == []


def test_unknown_node_and_bad_options_exit_2(cluster: Cluster) -> None:
    unknown = run_cli("check", "--stress", "--ray-address", cluster.address, "--seconds", "1", "--nodes", "nowhere")
    assert unknown.returncode == 2, unknown.stdout + unknown.stderr
    assert "no node named 'nowhere'" in unknown.stderr and "stress-a" in unknown.stderr
    bad = run_cli("check", "--stress", "--seconds", "0", "--gpu-fraction", "1.5")
    assert bad.returncode == 2
    assert "--seconds must be > 0, got 0" in bad.stderr and "--gpu-fraction must be in (0, 0.95], got 1.5" in bad.stderr
    url = run_cli("check", "--stress", "--ray-address", "http://127.0.0.1:8080")
    assert url.returncode == 2 and "give the Ray address (host:6379)" in url.stderr
    # the former spelling of the Ray address still joins, with a warning
    old = run_cli("check", "--stress", "--address", cluster.address, "--seconds", "1", "--nodes", "nowhere")
    assert old.returncode == 2 and "no node named 'nowhere'" in old.stderr
    assert "warning: --address with --stress is deprecated; use --ray-address" in old.stderr


def running_on(node: object, task: str) -> bool:
    """Whether a worker of `node` (a `ray._private.node.Node`) runs `task`: Ray titles a worker
    process `ray::<task>` while it runs it, and the node's raylet is every worker's parent."""
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    for worker in raylet.children(recursive=True):
        try:
            if " ".join(worker.cmdline()).startswith(f"ray::{task}"):
                return True
        except psutil.Error:
            continue
    return False


def test_a_node_that_dies_during_the_cpu_phase_fails(cluster: Cluster) -> None:
    doomed = cluster.add_node(**NODE_ARGS, num_cpus=1, labels={NODE_NAME_LABEL: "stress-doomed"})
    cluster.wait_for_nodes()
    assert "stress-doomed" in {n.name for n in ray_nodes()}
    outcome: dict[str, object] = {}
    runner = threading.Thread(
        target=lambda: outcome.update(report=run_stress(8, 0.5, 0.7, ["stress-doomed", "stress-a"]))
    )
    runner.start()
    wait_until(lambda: running_on(doomed, "cpu_stress"), 120, "the CPU task running on stress-doomed", every_s=0.1)
    cluster.remove_node(doomed)
    runner.join(timeout=120)
    report = outcome["report"]
    by_node = {c.node: (c, v) for c, v in zip(report.cpus, report.cpu_verdicts, strict=True)}
    dead, verdict = by_node["stress-doomed"]
    assert verdict.status == "failed" and dead.error.startswith("the CPU task on stress-doomed failed: ")
    assert by_node["stress-a"][1].status == "ok"
    assert not report.ok
