"""Every way a deploy fails reaches the user whole: the root cause (vLLM's or ours, never a traceback's
last line) in the SDK's error, in `ray-vram status`, in the controller API and in Serve's status, and
nothing stays reserved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import httpx
import pytest
import stack
from stack import run_cli

from vram_scheduler import ConfigError, DeploymentError, VRAMScheduler
from vram_scheduler.core.loopback import LOOPBACK_NODE_ENV

pytestmark = pytest.mark.slow

SERVE_MESSAGES = """
import json, ray
from ray import serve
ray.init(namespace="ray-vram", log_to_driver=False)
apps = serve.status().applications
print(json.dumps({n: {d: s.message for d, s in a.deployments.items()} for n, a in apps.items()}))
"""


def serve_messages(local_stack: stack.LocalStack) -> dict[str, dict[str, str]]:
    # Local mode's Ray is on 127.0.0.1 only: a process joining it must stay on loopback too.
    env = os.environ | LOOPBACK_NODE_ENV | {"RAY_ADDRESS": local_stack.gcs_address, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, "-c", SERVE_MESSAGES], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def reserved_by(scheduler: VRAMScheduler, model_id: str) -> list[str]:
    return [r.replica_id for gpu in scheduler.get_vram_state().gpus for r in gpu.replicas if r.model_id == model_id]


@pytest.mark.parametrize(
    ("model_id", "model_name", "vram_gb", "engine_kwargs", "cause"),
    [
        ("bad-path", "/no/such/model", 1.5, {}, "model path /no/such/model does not exist here"),
        ("small-budget", "demo", 1.0, {}, "budget 1.00 GiB cannot hold weights"),
        ("bad-kwarg", "demo", 1.5, {"no_such_arg": 1}, "unrecognized arguments: --no-such-arg"),
    ],
)
def test_a_start_failure_reaches_every_view_whole(
    controller_env: dict[str, str],
    local_stack: stack.LocalStack,
    model_id: str,
    model_name: str,
    vram_gb: float,
    engine_kwargs: dict,
    cause: str,
) -> None:
    with VRAMScheduler() as scheduler:
        try:
            with pytest.raises(DeploymentError) as caught:
                scheduler.deploy_model(model_id, model_name, vram_gb, progress=False, timeout_s=600, **engine_kwargs)
            assert cause in str(caught.value)
            assert "For further information visit" not in str(caught.value)

            status = run_cli("status", "--output", "json", env=controller_env)
            assert status.returncode == 0, status.stderr
            listed = [m for m in json.loads(status.stdout)["deployments"] if m["model_id"] == model_id]
            assert listed and all(cause in (r["error"] or "") for r in listed[0]["replicas"])
            table = run_cli("status", env=controller_env)
            assert " ".join(cause.split()) in " ".join(table.stdout.split()), table.stdout

            api = httpx.get(f"{local_stack.controller}/v1/deployments", headers=local_stack.headers, timeout=30).json()
            errors = [r["error"] for m in api["models"] if m["model_id"] == model_id for r in m["replicas"]]
            assert errors and all(cause in (e or "") for e in errors)

            deployments = serve_messages(local_stack)[f"model-{model_id}"]
            messages = [
                text for name, text in deployments.items() if name.startswith(f"{model_id}-") and name[-1].isdigit()
            ]
            assert messages and all(cause in message for message in messages), deployments
            assert not reserved_by(scheduler, model_id)
        finally:
            scheduler.shutdown(model_id)


def test_a_length_over_the_models_maximum_is_refused_before_anything_is_reserved(
    controller_env: dict[str, str],
) -> None:
    with VRAMScheduler() as scheduler:
        with pytest.raises(ConfigError) as caught:
            scheduler.deploy_model("too-long", "demo", 1.5, max_model_len=8192, progress=False)
        message = str(caught.value)
        assert "max_model_len = 8192 exceeds the model's maximum of 2048 tokens" in message
        assert "max_position_embeddings" in message
        assert "too-long" not in {d.model_id for d in scheduler.deployments()}
        assert not reserved_by(scheduler, "too-long")
    cli = run_cli(
        "deploy", "too-long", "--model", "demo", "--vram-gb", "1.5", "--max-model-len", "4096", env=controller_env
    )
    assert cli.returncode == 2 and "4096" in cli.stderr and "2048" in cli.stderr


def test_redeploying_a_failed_model_never_shows_the_old_attempt(controller_env: dict[str, str]) -> None:
    """Status shows the current attempt: while a failed model is replaced, its old failure is gone."""
    with VRAMScheduler() as scheduler:
        try:
            with pytest.raises(DeploymentError):
                scheduler.deploy_model("again", "demo", 1.0, progress=False, timeout_s=600)
            seen: list[str] = []
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    for status in scheduler.deployments():
                        if status.model_id == "again":
                            seen.extend(f"{r.state}:{r.error}" for r in status.replicas)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            try:
                scheduler.deploy_model("again", "demo", 1.5, progress=False, timeout_s=600)
            finally:
                done.set()
                watcher.join(timeout=30)
            # Observed from just before the new attempt reached the controller: the old failure may
            # show until then, never after the new attempt's first state.
            current = seen[next(i for i, s in enumerate(seen) if not s.startswith("failed")) :]
            assert current and not [s for s in current if s.startswith("failed")], seen
        finally:
            scheduler.shutdown("again")
