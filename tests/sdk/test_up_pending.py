"""`ray-vram up` (the real CLI, local mode on host memory) with a model that does not fit: one without
room now is pending, with a not-placed line giving the same reason the controller's API, the router's
503 and `ray-vram status` give, and the ready line tells the models that answer from those pending;
one larger than every GPU of the machine is refused before any engine starts (exit 3).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import stack
import yaml

from vram_scheduler.core.config import GIB
from vram_scheduler.core.exit_codes import ExitCode

pytestmark = pytest.mark.slow


def config_home(tmp_path: Path) -> Path:
    return tmp_path / "config"


def controller_headers(tmp_path: Path) -> dict[str, str]:
    """The controller token `up` made, as a client sends it."""
    token = (config_home(tmp_path) / "ray-vram" / "controller-token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def start_up(tmp_path: Path, models: list[dict]) -> tuple[subprocess.Popen, Path, int, int]:
    serving_port, controller_port = stack.free_port(), stack.free_port()
    values = tmp_path / "values.yaml"
    # A 2 GiB overhead for every model (placement.replica_overhead_gb), so the reasons' arithmetic is round.
    placement = {"replica_overhead_gb": 2}
    serving = {"host": "127.0.0.1", "port": serving_port}
    values.write_text(yaml.safe_dump({"models": models, "placement": placement, "serving": serving}))
    log = tmp_path / "up.log"
    env = stack.vllm_env() | {"RAY_TMPDIR": str(stack.ray_temp_dir("up-")), "RAY_AUTH_MODE": "disabled"}
    env["XDG_CONFIG_HOME"] = str(config_home(tmp_path))  # its own controller token file, never the user's
    command = [sys.executable, "-m", "vram_scheduler.cli", "up", "-f", str(values)]
    with log.open("w") as out:
        up = subprocess.Popen(
            [*command, "--controller-port", str(controller_port), "--report-every", "2"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env | {"COLUMNS": "400"},
            start_new_session=True,
        )
    return up, log, serving_port, controller_port


def stopped(up: subprocess.Popen) -> None:
    if up.poll() is None:  # the test failed: do not leave the stack running
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()


def test_up_refuses_a_model_larger_than_every_gpu_here_before_any_engine_starts(tmp_path: Path) -> None:
    up, log, _, _ = start_up(
        tmp_path, [stack.demo_model_spec("demo", vram_gb=2), stack.demo_model_spec("toobig", vram_gb=100000)]
    )
    try:
        code = up.wait(timeout=300)
    finally:
        stopped(up)
    text = log.read_text()
    assert code == ExitCode.UNPLACED, text[-3000:]
    assert "refused (no GPU here is large enough; local mode: none can join):" in text, text
    assert "1 replica of model toobig needs 100002.00 GiB per replica" in text
    assert "more than any GPU holds: the largest is" in text and "it needs a bigger GPU, not a free one" in text
    assert "deploying" not in text and "waiting for replicas" not in text, text  # no engine was started


def test_up_reports_a_model_without_room_as_pending_with_the_same_reason_everywhere(tmp_path: Path) -> None:
    # Not larger than the host (the pseudo-GPU), but more than is free beside what runs here.
    roomless = round(psutil.virtual_memory().total / GIB - 2 - 0.2, 1)
    up, log, serving_port, controller_port = start_up(
        tmp_path, [stack.demo_model_spec("demo", vram_gb=2), stack.demo_model_spec("roomless", vram_gb=roomless)]
    )
    try:
        deadline = time.monotonic() + 600
        while "Ctrl-C to stop" not in log.read_text():
            assert up.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        text = log.read_text()
        prefix = (
            f"1 replica of model roomless needs {roomless + 2:.2f} GiB per replica ({roomless:g} GiB budget "
            "+ 2.00 GiB overhead); the largest free slot is "
        )
        (line,) = [line for line in text.splitlines() if line.startswith("not placed")]
        assert line.startswith(f"not placed (pending: placed when room appears): {prefix}"), line
        assert "(models: demo; pending, not placed: roomless)" in text, text
        # while the engine started, `up` said what it waited for (a pending replica is not waited for)
        waiting = [line for line in text.splitlines() if line.startswith("still waiting (")]
        assert waiting and all("demo-0" in line and "roomless" not in line for line in waiting), text
        listed = httpx.get(
            f"http://127.0.0.1:{controller_port}/v1/deployments", headers=controller_headers(tmp_path), timeout=30
        ).json()
        (pending,) = [r for m in listed["models"] for r in m["replicas"] if r["state"] == "pending"]
        assert pending["replica_id"] == "roomless-0" and pending["reason"].startswith(prefix), pending
        body = {"model": "roomless", "messages": [{"role": "user", "content": "hi"}]}
        refused = httpx.post(f"http://127.0.0.1:{serving_port}/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 503 and "retry-after" not in refused.headers
        assert prefix in refused.json()["error"]["message"] and "is pending" in refused.json()["error"]["message"]
        body["model"] = "demo"
        assert (
            httpx.post(f"http://127.0.0.1:{serving_port}/v1/chat/completions", json=body, timeout=120).status_code
            == 200
        )
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "vram_scheduler.cli",
                "status",
                "--address",
                f"http://127.0.0.1:{controller_port}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ | {"COLUMNS": "400", "XDG_CONFIG_HOME": str(config_home(tmp_path))},
        )
        assert status.returncode == 0, status.stderr
        assert "roomless-0:pending" in status.stdout and prefix in " ".join(status.stdout.split()), status.stdout
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=300) == ExitCode.OK
    finally:
        stopped(up)
