"""`ray-vram monitor` as a real process on a declared inventory: metrics over HTTP (parsed with
prometheus_client's parser), /healthz, /inventory, file changes, invalid input, no NVML, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vram_scheduler.core.config import ConfigError
from vram_scheduler.core.inventory import NodeInventory
from vram_scheduler.monitor.readers import FileReader

from .conftest import GIB, ROOT, Monitor, inventory_yaml, value

GPU_LABELS = {"node", "gpu", "uuid", "gpu_name"}
CONTRACT = {
    # name in the exposition → label names (CONTRIBUTING.md, "Contracts between parts")
    "ray_vram_gpu_total_bytes": GPU_LABELS,
    "ray_vram_gpu_used_bytes": GPU_LABELS,
    "ray_vram_gpu_free_bytes": GPU_LABELS,
    "ray_vram_gpu_reserved_bytes": GPU_LABELS,
    "ray_vram_gpu_unmanaged_bytes": GPU_LABELS,
    "ray_vram_gpu_healthy": GPU_LABELS,
    "ray_vram_monitor_errors_total": {"node", "kind"},
    "ray_vram_monitor_last_poll_timestamp_seconds": {"node"},
    "ray_vram_monitor_poll_duration_seconds_count": {"node"},
    "ray_vram_monitor_poll_duration_seconds_bucket": {"node", "le"},
}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vram_scheduler.cli", "monitor", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=60,
    )


def test_metrics_endpoints_and_sigterm(write_inventory, monitors: list[Monitor]) -> None:
    path = write_inventory(inventory_yaml(processes=[{"pid": 4000001, "used_bytes": 2 * GIB}]))
    monitor = Monitor(f"--inventory-file={path}")
    monitors.append(monitor)
    monitor.wait_ready()
    samples = monitor.wait_for(lambda s: value(s, "ray_vram_monitor_poll_duration_seconds_count") >= 2)

    for name, labels in CONTRACT.items():
        found = [dict(ls) for n, ls in samples if n == name]
        assert found, f"{name} missing from /metrics"
        assert all(set(ls) == labels for ls in found), f"{name} labels {found} != {labels}"
    gpu1 = {"node": "ci-node", "gpu": "1", "uuid": "GPU-ci-node-1", "gpu_name": "NVIDIA GeForce RTX 4090"}
    assert value(samples, "ray_vram_gpu_total_bytes", **gpu1) == 24 * GIB
    assert value(samples, "ray_vram_gpu_used_bytes", **gpu1) == 6 * GIB
    assert value(samples, "ray_vram_gpu_free_bytes", **gpu1) == 18 * GIB
    assert value(samples, "ray_vram_gpu_reserved_bytes", **gpu1) == 0
    assert value(samples, "ray_vram_gpu_unmanaged_bytes", **gpu1) == 6 * GIB, "no allocator: everything unmanaged"
    assert value(samples, "ray_vram_gpu_healthy", **gpu1) == 1
    assert value(samples, "ray_vram_gpu_total_bytes", node="ci-node", gpu="0") == 80 * GIB
    assert abs(value(samples, "ray_vram_monitor_last_poll_timestamp_seconds", node="ci-node") - time.time()) < 10
    assert value(samples, "ray_vram_monitor_errors_total", node="ci-node", kind="nvml") == 0

    health = monitor.json("/healthz")
    assert health["status"] == "ok" and health["source"] == "file" and health["allocator"] is None
    inventory = NodeInventory.model_validate(monitor.json("/inventory"))
    assert inventory.node == "ci-node" and [g.index for g in inventory.gpus] == [0, 1]
    assert inventory.gpus[1].processes[0].pid == 4000001
    assert monitor.get("/nope")[0] == 404

    assert monitor.stop(signal.SIGTERM) == 0
    assert "SIGTERM received: stopping" in monitor.log() and "stopped after" in monitor.log()


def test_file_edits_are_served_and_a_broken_file_is_counted(write_inventory, monitors: list[Monitor]) -> None:
    path = write_inventory(inventory_yaml())
    monitor = Monitor(f"--inventory-file={path}")
    monitors.append(monitor)
    monitor.wait_ready()

    write_inventory(inventory_yaml(used_gb=10, healthy=False))
    samples = monitor.wait_for(
        lambda s: value(s, "ray_vram_gpu_used_bytes", gpu="1") == 10 * GIB, what="the edited used_gb"
    )
    assert value(samples, "ray_vram_gpu_healthy", gpu="1") == 0

    write_inventory("nodes:\n  - node: ci-node\n    gpus:\n      - {index: 0, uuid: GPU-x, total_gb: -4}\n")
    samples = monitor.wait_for(
        lambda s: value(s, "ray_vram_monitor_errors_total", kind="inventory_file") >= 1, what="inventory_file error"
    )
    assert value(samples, "ray_vram_gpu_used_bytes", gpu="1") == 10 * GIB, "the last valid inventory stays"
    assert monitor.get("/healthz")[0] == 200, "a broken file is an error, not a dead monitor"
    assert monitor.stop() == 0
    assert "nodes[0].gpus[0].total_bytes" in monitor.log()


@pytest.mark.parametrize(
    ("gpu", "field"),
    [
        ({"index": 0, "uuid": "GPU-a", "total_gb": -1}, "nodes[0].gpus[0].total_bytes"),
        ({"index": 0, "total_gb": 8}, "nodes[0].gpus[0].uuid: required key is missing"),
        ({"index": 0, "uuid": "GPU-a", "total_gb": 8, "vram": 3}, "nodes[0].gpus[0].vram = 3: unknown key"),
        ({"index": 0, "uuid": "GPU-a", "total_gb": 8, "used_gb": 9}, "used_bytes 9663676416 exceeds total_bytes"),
    ],
)
def test_malformed_inventory_is_rejected_naming_the_field(tmp_path: Path, gpu: dict, field: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps({"nodes": [{"node": "n", "gpus": [gpu]}]}))
    with pytest.raises(ConfigError) as error:
        FileReader(path)
    assert field in str(error.value) and str(path) in str(error.value)


def test_malformed_inventory_exits_2_before_serving(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("nodes:\n  - node: n\n    gpus:\n      - {index: 0, uuid: GPU-a, total_gb: -1}\n")
    result = run_cli(f"--inventory-file={path}", "--port=0")
    assert result.returncode == 2 and "nodes[0].gpus[0].total_bytes" in result.stderr and str(path) in result.stderr


def test_node_choice_in_a_multi_node_file() -> None:
    example = ROOT / "values" / "inventory-example.yaml"
    with pytest.raises(ConfigError, match=r"lists 2 nodes \(gpu-1, gpu-2\); pick one with --node"):
        FileReader(example)
    with pytest.raises(ConfigError, match="no node 'gpu-9'"):
        FileReader(example, "gpu-9")
    result = run_cli("--inventory-file=values/inventory-example.yaml", "--node=gpu-2", "--once", "--output=json")
    assert result.returncode == 0, result.stderr
    inventory = NodeInventory.model_validate(json.loads(result.stdout))
    assert inventory.node == "gpu-2" and inventory.source == "file" and inventory.gpus[0].total_bytes == 12 * GIB


def test_without_nvml_the_monitor_exits_1_with_a_clear_message() -> None:
    result = run_cli("--port=0")
    assert result.returncode == 1
    assert "cannot initialise NVML" in result.stderr and "libnvidia-ml.so.1" in result.stderr
    assert "--inventory-file" in result.stderr and "--host-memory" in result.stderr


def test_invalid_flags_exit_2() -> None:
    result = run_cli("--host-memory", "--interval=0")
    assert result.returncode == 2 and "--interval = 0.0: out of range" in result.stderr


def test_host_memory_reports_the_host_as_one_gpu() -> None:
    import psutil

    result = run_cli("--host-memory", "--node=laptop", "--once", "--output=json")
    assert result.returncode == 0, result.stderr
    inventory = NodeInventory.model_validate(json.loads(result.stdout))
    (gpu,) = inventory.gpus
    assert inventory.source == "host-memory" and gpu.uuid == "host-laptop"
    assert gpu.total_bytes == psutil.virtual_memory().total and 0 < gpu.used_bytes < gpu.total_bytes


def test_allocator_unreachable_keeps_exporting(write_inventory, monitors: list[Monitor]) -> None:
    from .conftest import free_port

    path = write_inventory(inventory_yaml())
    monitor = Monitor(f"--inventory-file={path}", f"--ray-address=127.0.0.1:{free_port()}")
    monitors.append(monitor)
    monitor.wait_ready()
    samples = monitor.wait_for(
        lambda s: value(s, "ray_vram_monitor_errors_total", kind="allocator") >= 2, what="allocator retries"
    )
    assert value(samples, "ray_vram_gpu_total_bytes", gpu="0") == 80 * GIB
    assert monitor.json("/healthz")["allocator"] == "unreachable"
    assert monitor.stop() == 0
    log = monitor.log()
    assert "unreachable" in log and "retry in" in log
