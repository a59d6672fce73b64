"""`ray-vram deploy/status/shutdown/check/chat` as a user runs them, against the real local stack."""

from __future__ import annotations

import json

import pytest
import stack
from stack import ALIAS, MODEL, run_cli
from waiting import wait_until

pytestmark = pytest.mark.slow


def test_status_table_and_json(controller_env: dict[str, str]) -> None:
    table = run_cli("status", env=controller_env)
    assert table.returncode == 0, table.stderr
    assert "NVIDIA Test 8GB" in table.stdout and "tiny-0 1.50" in table.stdout and "1/1 ready" in table.stdout
    data = json.loads(run_cli("status", "--output", "json", env=controller_env).stdout)
    assert [g["total_bytes"] for g in data["vram"]["gpus"]] == [8 * 1024**3, 4 * 1024**3]
    assert [d["model_id"] for d in data["deployments"]] == [MODEL]


def test_status_watch_json_streams_snapshots(controller_env: dict[str, str]) -> None:
    import os
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "vram_scheduler.cli", "status", "--watch", "0.2", "--output", "json"],
        env=os.environ | controller_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [json.loads(process.stdout.readline()) for _ in range(2)]
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert all(line["vram"]["gpus"] for line in lines)


def test_deploy_that_does_not_fit_exits_3_naming_the_shortfall(controller_env: dict[str, str]) -> None:
    result = run_cli("deploy", "huge", "--model", "demo", "--vram-gb", "8", env=controller_env)
    assert result.returncode == 3, result.stderr
    assert "model huge needs 10.00 GiB" in result.stderr and "the largest is 8.00 GiB" in result.stderr
    assert "nothing was deployed" in result.stderr


def test_deploy_invalid_input_exits_2(controller_env: dict[str, str]) -> None:
    result = run_cli("deploy", "bad", "--model", "demo", "--vram-gb", "-1", env=controller_env)
    assert result.returncode == 2 and "vram_gb = -1" in result.stderr
    missing = run_cli("deploy", "bad", env=controller_env)
    assert missing.returncode == 2 and "--model" in missing.stderr and "--vram-gb" in missing.stderr


def test_deploy_with_progress_then_shutdown(controller_env: dict[str, str]) -> None:
    engine = ["--engine-arg", "dtype=float32", "--engine-arg", "enforce_eager=true", "--engine-arg", "max_num_seqs=8"]
    try:
        result = run_cli(
            "deploy", "cli-demo", "--model", "demo", "--vram-gb", "1.5", "--max-model-len", "512", *engine,
            env=controller_env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "cli-demo: cli-demo-0 (node sdk-node, GPU 0) loading → ready" in result.stderr
        assert "cli-demo-0" in result.stdout and "ready" in result.stdout
    finally:
        down = run_cli("shutdown", "cli-demo", env=controller_env)
    assert down.returncode == 0 and "shut down: cli-demo" in down.stdout
    again = run_cli("shutdown", "cli-demo", "--output", "json", env=controller_env)
    assert again.returncode == 0 and json.loads(again.stdout) == {"removed": []}


def test_check_passes_on_a_healthy_stack(controller_env: dict[str, str]) -> None:
    result = run_cli("check", "--output", "json", env=controller_env)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = json.loads(result.stdout)["checks"]
    assert [c["name"] for c in checks] == [
        "controller reachable",
        "allocator round trip",
        "oversized reservation refused",
        f"inference {MODEL}",
    ]
    assert all(c["ok"] for c in checks)


def test_check_fails_without_a_controller() -> None:
    address = f"http://127.0.0.1:{stack.free_port()}"
    result = run_cli("check", "--address", address)
    assert result.returncode == 1
    assert "FAILED" in result.stdout and "controller reachable" in result.stdout


def test_chat_streams_answers_to_piped_lines(controller_env: dict[str, str]) -> None:
    result = run_cli("chat", ALIAS, "--max-tokens", "4", env=controller_env, stdin="hello\n/reset\nagain\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") >= 2 and result.stdout.strip()


def test_chat_with_an_unknown_model_is_a_clear_error(controller_env: dict[str, str], endpoint: str) -> None:
    result = run_cli("chat", "nope", "--endpoint", endpoint, env=controller_env, stdin="hi\n")
    assert result.returncode == 2
    assert "'nope' is not served" in result.stderr and MODEL in result.stderr
    discovered = run_cli("chat", "nope", env=controller_env, stdin="hi\n")
    assert discovered.returncode == 2 and "no endpoint serves model 'nope'" in discovered.stderr


@pytest.mark.parametrize("command", ["deploy", "status", "shutdown", "check", "chat"])
def test_help_has_examples(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0 and "examples:" in result.stdout


def test_deploy_from_a_values_file_plans_all_models_first(controller_env: dict[str, str], tmp_path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        "models:\n"
        "  - {model_id: fits, model: demo, vram_gb: 1.5}\n"
        "  - {model_id: too-many, model: demo, vram_gb: 1.5, replicas: 2}\n"
    )
    result = run_cli("deploy", "-f", str(values), env=controller_env)
    assert result.returncode == 3, result.stderr
    assert "2 of 3 replica(s) would be placed" in result.stderr and "too-many" in result.stderr
    listed = json.loads(run_cli("status", "--output", "json", env=controller_env).stdout)["deployments"]
    assert [d["model_id"] for d in listed] == [MODEL]
    both = run_cli("deploy", "x", "-f", str(values), env=controller_env)
    assert both.returncode == 2 and "not both" in both.stderr


def test_status_watch_table_stops_on_ctrl_c(controller_env: dict[str, str], tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys

    out_file, err_file = tmp_path / "watch.out", tmp_path / "watch.err"
    # As in a terminal (FORCE_COLOR): rich draws the live table while it runs, where to a plain file it
    # draws only the last one, at exit; so the test sees the table on screen before pressing Ctrl-C.
    terminal = {"FORCE_COLOR": "1", "COLUMNS": "200"}
    with out_file.open("w") as out, err_file.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "vram_scheduler.cli", "status", "--watch", "0.2"],
            env=os.environ | controller_env | terminal,
            stdout=out,
            stderr=err,
            text=True,
        )
    try:
        # Ctrl-C once the table is on screen, whatever the moment (drawing or waiting for the next one).
        wait_until(lambda: "tiny-0" in out_file.read_text() or process.poll() is not None, 120, "the first table")
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err_file.read_text()
    out = out_file.read_text()
    assert "NVIDIA Test 8GB" in out and "tiny-0" in out
