"""Stopping `ray-vram up` at any moment (SIGINT or SIGTERM, at each start-up phase, while the replica
loads included) leaves no process, no reservation and no open port behind.

Every process `up` starts inherits a marker in its environment, so the check finds them all — Ray's
GCS and raylet, workers, and vLLM's engine-core process, even one orphaned to init. The ledger
(reservations) lives in that cluster's GCS, so no process left also means no reservation left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import stack
import yaml

pytestmark = pytest.mark.slow

#: Phase -> how the test knows `up` is in it (a progress line, or vLLM's engine process running).
PHASES = {
    "starting Ray": "starting Ray",
    "deploying": "deploying 1 model",
    "loading": "VLLM::EngineCor",  # the engine-core process's name (/proc/PID/comm keeps 15 characters)
    "ready": "Ctrl-C to stop",
}


def marked(mark: str) -> list[tuple[int, str]]:
    """(pid, name) of every live process carrying `mark` in its environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if mark.encode() not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().split(") ")[-1].split()[0]
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if state != "Z":
            found.append((int(entry.name), name))
    return found


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_stopping_up_leaves_nothing_behind(tmp_path: Path, phase: str, signum: int) -> None:
    mark = f"RAY_VRAM_TEST_MARK={uuid.uuid4().hex}"
    serving_port, controller_port = stack.free_port(), stack.free_port()
    values = tmp_path / "values.yaml"
    model = stack.demo_model_spec("stop-me")
    values.write_text(yaml.safe_dump({"models": [model], "serving": {"host": "127.0.0.1", "port": serving_port}}))
    log = tmp_path / "up.log"
    env = stack.vllm_env() | {"RAY_TMPDIR": str(stack.ray_temp_dir("up-")), mark.split("=")[0]: mark.split("=")[1]}
    command = [sys.executable, "-m", "vram_scheduler.cli", "up", "-f", str(values)]
    with log.open("w") as out:
        up = subprocess.Popen(
            [*command, "--controller-port", str(controller_port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 600
        while True:
            text = log.read_text()
            reached = PHASES[phase] in text or any(PHASES[phase] in name for _, name in marked(mark))
            if reached or up.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert reached, f"`up` never reached {phase!r} (exit {up.poll()}):\n{text[-3000:]}"
        up.send_signal(signum)
        code = up.wait(timeout=300)
    finally:
        if up.poll() is None:  # the test failed: do not leave the stack running
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    text = log.read_text()
    assert code == (0 if phase == "ready" else 130), text[-3000:]
    assert "stopped: no replicas, reservations or Ray processes left" in text
    assert marked(mark) == [], text[-3000:]
    assert port_free(serving_port) and port_free(controller_port)
