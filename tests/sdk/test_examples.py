"""examples/0…4 run as a user runs them, against the real local stack."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from stack import MODEL, ROOT

pytestmark = pytest.mark.slow


def run_example(name: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        env=os.environ | env | {"COLUMNS": "160"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_deploy_from_a_config_file_then_shut_it_down(controller_env: dict[str, str]) -> None:
    try:
        deployed = run_example("1_deploy_models.py", env=controller_env)
        assert "example-demo: 1 replica(s) ready (example-demo-0 on node sdk-node, GPU 0)" in deployed.stdout
        assert "loading → ready" in deployed.stderr
    finally:
        down = run_example("0_shutdown_models.py", "example-demo", env=controller_env)
    assert "removed: example-demo" in down.stdout and "example-demo-0" not in down.stdout


def test_max_replicas_fill_the_free_gpu(controller_env: dict[str, str]) -> None:
    try:
        result = run_example("2_deploy_max_llms.py", "--vram-gb", "1.5", "--gpu-type", "8GB", env=controller_env)
        # 8 GiB GPU, 1.5 GiB + 2 GiB overhead per replica → exactly 2 (7 GiB; a third would need 10.5)
        assert "demo-max: 2 replica(s) of 1.5 GiB" in result.stdout
        assert "node sdk-node, GPU 0: 2" in result.stdout
    finally:
        run_example("0_shutdown_models.py", "demo-max", env=controller_env)


def test_every_inference_style(controller_env: dict[str, str]) -> None:
    result = run_example("3_test_inference.py", MODEL, env=controller_env)
    out = result.stdout
    assert "sync: '" in out and "async: '" in out
    assert "batch: 4 answers" in out and "async batch: 3 answers" in out
    assert "[0] done (length)" in out and "[1] done (length)" in out
    assert "structured: {'city':" in out or "structured output did not validate" in out


def test_openai_client_and_langchain(controller_env: dict[str, str]) -> None:
    out = run_example("4_openai_client.py", MODEL, env=controller_env).stdout
    assert f"'{MODEL}'" in out.split("models:")[1].splitlines()[0]
    assert "chat: '" in out and "streamed pieces:" in out and "completion: '" in out
    assert "langchain: AIMessage" in out
