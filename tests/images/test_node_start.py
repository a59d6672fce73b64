"""`ray-vram node-start`: GPUs -> `ray start` options, checked without starting Ray (--dry-run).

Ray's own parsers check that what node-start produces is what `ray start` accepts; the image
tests (test_images.py) start Ray with it for real.
"""

from __future__ import annotations

import json
import shlex

import pytest
from ray._private.label_utils import parse_node_labels_string

from vram_scheduler.cli.main import main
from vram_scheduler.core.config import ConfigError
from vram_scheduler.monitor.node import (
    KUBERAY_COMMAND_ENV,
    NodeGPU,
    build_node_start,
    kuberay_args,
    label_value,
    node_labels,
)

H100 = NodeGPU(index=0, uuid="GPU-a", name="NVIDIA H100 80GB HBM3", total_bytes=81559 * 1024**2)
RTX4090 = NodeGPU(index=1, uuid="GPU-b", name="NVIDIA GeForce RTX 4090", total_bytes=24564 * 1024**2)


def test_no_gpus_means_only_the_node_name_label() -> None:
    assert node_labels([], "cpu-node-1") == {"ray-vram.io/node-name": "cpu-node-1"}


def test_labels_name_the_model_or_mixed_and_are_valid_for_ray() -> None:
    assert node_labels([H100], "gpu-1")["ray-vram.io/gpu-model"] == "NVIDIA-H100-80GB-HBM3"
    labels = node_labels([H100, RTX4090], "ip-10-0-0-1.ec2.internal")
    assert labels["ray-vram.io/gpu-model"] == "mixed"
    assert labels["ray-vram.io/gpu-count"] == "2"
    assert parse_node_labels_string(",".join(f"{k}={v}" for k, v in labels.items())) == labels


@pytest.mark.parametrize("text", ["NVIDIA A100-SXM4-40GB", "  weird/name (rev 2) ", "x" * 100, "---", "Tesla T4"])
def test_label_values_are_sanitised_to_what_ray_accepts(text: str) -> None:
    value = label_value(text)
    assert parse_node_labels_string(f"k={value}") == {"k": value}


def test_head_gets_head_block_gpus_and_labels_and_no_vram_resource() -> None:
    """The node's VRAM is the allocator's to account: no Ray custom resource carries it."""
    start = build_node_start("head", ["--port=6379", "--dashboard-host=0.0.0.0"], [H100, RTX4090], "gpu-1")
    command = start.command
    assert command[:5] == ["ray", "start", "--head", "--port=6379", "--dashboard-host=0.0.0.0"]
    assert "--block" in command and "--num-gpus=2" in command
    assert not any(w.startswith("--resources") for w in command)
    labels = next(w for w in command if w.startswith("--labels=")).split("=", 1)[1]
    assert parse_node_labels_string(labels)["ray-vram.io/node-name"] == "gpu-1"
    assert start.notes == []


def test_cpu_node_starts_nothing_gpu_related_and_keeps_the_callers_options() -> None:
    start = build_node_start("worker", ["--address=head:6379", "--num-cpus=4"], [], "cpu-1", "none")
    assert start.command == [
        "ray",
        "start",
        "--address=head:6379",
        "--num-cpus=4",
        "--block",
        "--labels=ray-vram.io/node-name=cpu-1",
    ]
    assert start.gpu_source == "none" and start.num_gpus is None
    kept = build_node_start("worker", ["--address", "head:6379", "--num-gpus", "0"], [], "cpu-1", "none")
    assert "--num-gpus=0" in kept.command and not any(w.startswith("--resources") for w in kept.command)


def test_detected_values_win_over_the_callers_and_each_replacement_is_noted() -> None:
    args = [
        "--address=h:6379",
        "--num-gpus",
        "4",
        "--resources",
        '{"disk": 2}',
        "--labels=team=a,ray-vram.io/gpu-count=9",
    ]
    start = build_node_start("worker", args, [H100], "gpu-1")
    assert start.num_gpus == 1
    assert start.resources == {"disk": 2}  # the caller's resources pass through, none added
    assert start.labels["team"] == "a"
    assert start.notes == [
        "--num-gpus 4 replaced by 1 (GPUs visible through nvml)",
        "label ray-vram.io/gpu-count=9 replaced by 1 (detected)",
    ]


@pytest.mark.parametrize(
    ("role", "args", "message"),
    [
        ("worker", ["--num-cpus=1"], "a worker needs --address"),
        ("worker", ["--address=h:1", "--head"], "--head given to a worker node"),
        ("head", ["--resources={not json"], "--resources: not JSON"),
        ("head", ["--resources=[1, 2]"], "expected a JSON object of numbers"),
        ("head", ["--labels=novalue"], "'novalue' is not key=value"),
        ("head", ["--labels=[1]"], "--labels: expected a JSON object"),
        ("head", ['--labels={"k": '], "--labels: not JSON"),
        ("head", ["--labels=k=has space"], "value of 'k' is not a valid label"),
        ("head", ["--num-gpus"], "--num-gpus: missing value"),
    ],
)
def test_invalid_ray_start_arguments_are_refused_with_the_reason(role, args, message) -> None:
    with pytest.raises(ConfigError, match="invalid configuration") as error:
        build_node_start(role, args, [H100], "gpu-1")
    assert message in str(error.value)


def test_kuberay_generated_command_is_split_and_expanded_like_bash_would() -> None:
    environ = {
        KUBERAY_COMMAND_ENV: "ray start --address=$FQ_RAY_IP:6379 --block --metrics-export-port=8080 "
        """--num-gpus=1 --resources='{"a": 1}'""",
        "FQ_RAY_IP": "rc-head-svc.ns.svc.cluster.local",
    }
    args = kuberay_args(environ)
    assert args == [
        "--address=rc-head-svc.ns.svc.cluster.local:6379",
        "--block",
        "--metrics-export-port=8080",
        "--num-gpus=1",
        '--resources={"a": 1}',
    ]
    start = build_node_start("worker", args, [H100, RTX4090], "gpu-1")
    assert start.command.count("--block") == 1
    assert json.loads(next(w for w in start.command if w.startswith("--resources=")).split("=", 1)[1])["a"] == 1
    assert kuberay_args({}) is None


def test_kuberay_command_that_is_not_ray_start_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"expected a `ray start \.\.\.` command"):
        kuberay_args({KUBERAY_COMMAND_ENV: "python -m something"})
    with pytest.raises(ConfigError, match="cannot split"):
        kuberay_args({KUBERAY_COMMAND_ENV: "ray start --labels='unclosed"})


def test_cli_dry_run_from_a_declared_inventory(repo_root, capsys) -> None:
    inventory = str(repo_root / "values/inventory-example.yaml")
    argv = ["node-start", "--dry-run", "--inventory-file", inventory, "--node-name", "gpu-1", "head", "--port=6380"]
    assert main(argv) == 0
    command = shlex.split(capsys.readouterr().out)
    assert command[:4] == ["ray", "start", "--head", "--port=6380"] and "--num-gpus=2" in command

    assert main(["node-start", "--dry-run", "--output", "json", "--inventory-file", inventory, "--node-name", "gpu-2",
                 "worker", "--address=head:6379"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["gpu_source"] == "file" and result["num_gpus"] == 1
    assert result["resources"] == {}
    assert result["labels"]["ray-vram.io/gpu-model"] == "NVIDIA-GeForce-RTX-3060"


def test_cli_uses_kuberays_command_when_given_no_ray_arguments(repo_root, capsys, monkeypatch) -> None:
    monkeypatch.setenv(KUBERAY_COMMAND_ENV, "ray start --head --block --dashboard-host=0.0.0.0 --num-cpus=0")
    inventory = str(repo_root / "values/inventory-example.yaml")
    assert main(["node-start", "--dry-run", "--inventory-file", inventory, "--node-name", "gpu-2", "head"]) == 0
    command = shlex.split(capsys.readouterr().out)
    assert command[:6] == ["ray", "start", "--head", "--block", "--dashboard-host=0.0.0.0", "--num-cpus=0"]
    assert "--num-gpus=1" in command


def test_cli_refuses_an_unknown_node_and_a_worker_without_address(repo_root, capsys) -> None:
    inventory = str(repo_root / "values/inventory-example.yaml")
    assert main(["node-start", "--dry-run", "--inventory-file", inventory, "--node-name", "gpu-9", "head"]) == 2
    assert "no node 'gpu-9' in the file (it lists gpu-1, gpu-2)" in capsys.readouterr().err
    assert main(["node-start", "--dry-run", "--inventory-file", inventory, "--node-name", "gpu-1", "worker"]) == 2
    assert "a worker needs --address" in capsys.readouterr().err


def test_cli_nvml_path_matches_what_nvml_lists(capsys) -> None:
    """Without a GPU: no GPU options and the reason on stderr; with one: one GPU per NVML device."""
    assert main(["node-start", "--dry-run", "--output", "json", "--node-name", "n1", "head"]) == 0
    result = json.loads(capsys.readouterr().out)
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception:
        count = 0
    if count == 0:
        assert result["gpu_source"] == "none" and result["num_gpus"] is None and result["resources"] == {}
        assert result["no_gpu_reason"]
        assert result["labels"] == {"ray-vram.io/node-name": "n1"}
    else:
        assert result["gpu_source"] == "nvml" and result["num_gpus"] == count
        assert sum(v for k, v in result["resources"].items() if k.startswith("gpu_")) == count
