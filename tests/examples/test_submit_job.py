"""examples/5_submit_job.py against a local Ray head with its dashboard and token authentication."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import stack

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow
EXAMPLE = ROOT / "examples" / "5_submit_job.py"


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[str, str]]:
    """(dashboard URL, token) of an isolated Ray head with RAY_AUTH_MODE=token."""
    token = secrets.token_hex(32)
    private_tmp = str(stack.ray_temp_dir("jobs-"))  # own ray_current_cluster: never redirects others
    log = Path(private_tmp) / "head.log"
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_TMPDIR=private_tmp, TMPDIR=private_tmp)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    dashboard, agent = stack.free_port(), stack.free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "examples" / "ray_head.py"), str(dashboard), str(agent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("ready"), f"Ray head did not start (exit {process.poll()}):\n{log.read_text()[-3000:]}"
        yield f"http://127.0.0.1:{dashboard}", token
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_example(address: str, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "HOME"}}
    return subprocess.run(
        [sys.executable, str(EXAMPLE), "--address", address, "--timeout", "120", *extra],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_job_runs_with_the_token_from_a_file(ray_head: tuple[str, str], tmp_path: Path) -> None:
    address, token = ray_head
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    result = run_example(address, {"RAY_AUTH_TOKEN_PATH": str(token_file), "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "cluster CPUs: 1.0" in result.stdout
    assert "SUCCEEDED" in result.stderr


def test_custom_entrypoint_failure_is_reported(ray_head: tuple[str, str], tmp_path: Path) -> None:
    address, token = ray_head
    result = run_example(address, {"RAY_AUTH_TOKEN": token, "HOME": str(tmp_path)}, "--", "python", "-c", "exit(3)")
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "exit code 3" in result.stderr


@pytest.mark.parametrize(("token", "status"), [("wrong-token", "403"), (None, "401")])
def test_jobs_api_refuses_a_missing_or_wrong_token(
    ray_head: tuple[str, str], tmp_path: Path, token: str | None, status: str
) -> None:
    address, _ = ray_head
    env = {"HOME": str(tmp_path)} | ({"RAY_AUTH_TOKEN": token} if token else {})
    result = run_example(address, env)
    assert result.returncode != 0
    assert f"HTTP {status}" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr
