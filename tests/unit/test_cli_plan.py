"""`ray-vram plan` end to end on files: output shape and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vram_scheduler.cli", *args], capture_output=True, text=True, cwd=ROOT, check=False
    )


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_plan_json_lists_assignments_per_gpu(tmp_path: Path) -> None:
    values = write(tmp_path, "v.yaml", "models:\n  - {model_id: m, model: x, vram_gb: 10, replicas: 3}\n")
    result = run_cli("plan", "--inventory", "values/inventory-example.yaml", "--values", values, "--output", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["complete"] is True
    placed = [a["replica_id"] for gpu in data["gpus"] for a in gpu["assignments"]]
    assert sorted(placed) == ["m-0", "m-1", "m-2"]


def test_plan_exit_3_names_shortfall(tmp_path: Path) -> None:
    values = write(tmp_path, "v.yaml", "models:\n  - {model_id: big, model: x, vram_gb: 60, replicas: 2}\n")
    result = run_cli("plan", "--inventory", "values/inventory-example.yaml", "--values", values, "--output", "json")
    assert result.returncode == 3
    (unplaced,) = json.loads(result.stdout)["unplaced"]
    assert unplaced["model_id"] == "big" and unplaced["count"] == 1
    assert "largest free slot" in unplaced["reason"] and "22.50 GiB on node gpu-1, GPU 1" in unplaced["reason"]


def test_plan_exit_2_on_invalid_values(tmp_path: Path) -> None:
    values = write(tmp_path, "v.yaml", "models:\n  - {model_id: m, model: x, vram_gb: -3}\n")
    result = run_cli("plan", "--inventory", "values/inventory-example.yaml", "--values", values)
    assert result.returncode == 2
    assert "models[0].vram_gb = -3" in result.stderr


SLEEPY = """\
placement: {sleep: {after_idle_s: 300}}
models:
  - {model_id: a, model: x, vram_gb: 40, overhead_gb: 2}
  - {model_id: b, model: x, vram_gb: 40, overhead_gb: 2}
  - {model_id: c, model: x, vram_gb: 40, overhead_gb: 2}
  - {model_id: pin, model: x, vram_gb: 20, overhead_gb: 2, pinned: true}
"""


def test_plan_shows_which_replicas_are_awake_and_which_start_stopped(tmp_path: Path) -> None:
    values = write(tmp_path, "v.yaml", SLEEPY)
    result = run_cli("plan", "--inventory", "values/inventory-example.yaml", "--values", values, "--output", "json")
    assert result.returncode == 0, result.stderr  # more than fits awake, and every model placed
    states = {a["replica_id"]: a["state"] for gpu in json.loads(result.stdout)["gpus"] for a in gpu["assignments"]}
    assert states == {"pin-0": "awake", "a-0": "awake", "b-0": "stopped", "c-0": "stopped"}
    table = run_cli("plan", "--inventory", "values/inventory-example.yaml", "--values", values)
    assert "b-0 40.00+2.00 starts stopped" in table.stdout
    assert "4 replica(s) placed: 2 awake, 2 start stopped (their models sleep)" in table.stdout
