"""The controller API of a real local stack (`ray-vram up`'s, no models: no engine to wait for) only
answers its token holders and never a web page: every route but /healthz (/metrics included) needs the
installation's token, a wrong one is refused, cross-site requests (Origin, Host, text/plain) are
refused with or without it, code-loading engine arguments are refused, and the SDK and CLI find the
token themselves or say where it is."""

from __future__ import annotations

import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import stack
import yaml
from stack import run_cli

from vram_scheduler.core.loopback import free_port
from vram_scheduler.sdk.client import ControllerAuthError, VRAMScheduler

ROUTES = [
    ("GET", "/v1/deployments"),
    ("GET", "/v1/vram"),
    ("DELETE", "/v1/deployments"),
    ("DELETE", "/v1/deployments/x"),
]


@pytest.fixture(scope="module")
def bare() -> Iterator[stack.LocalStack]:
    with stack.LocalStack([]) as running:
        yield running


def call(bare: stack.LocalStack, method: str, path: str, **kwargs: object) -> httpx.Response:
    return httpx.request(method, bare.controller + path, timeout=60, **kwargs)


def test_the_token_file_is_private(bare: stack.LocalStack) -> None:
    path = bare.config_home / "ray-vram" / "controller-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(bare.token) == 64


def test_every_route_but_health_needs_the_token(bare: stack.LocalStack) -> None:
    assert call(bare, "GET", "/healthz").status_code == 200
    assert "ray_vram_controller_reconciles_total" in call(bare, "GET", "/metrics", headers=bare.headers).text
    token_file = str(bare.config_home / "ray-vram" / "controller-token")
    for method, path in [*ROUTES, ("GET", "/metrics"), ("POST", "/v1/deployments")]:
        missing = call(bare, method, path, json={})
        assert missing.status_code == 401, (method, path, missing.text)
        assert token_file in missing.json()["hint"] and missing.headers["www-authenticate"].startswith("Bearer")
        wrong = call(bare, method, path, json={}, headers={"Authorization": "Bearer " + "0" * 64})
        assert wrong.status_code == 401 and wrong.json()["error"] == "wrong controller token"
    for method, path in ROUTES:
        assert call(bare, method, path, headers=bare.headers).status_code == 200, (method, path)


def test_cross_site_requests_are_refused_even_with_the_token(bare: stack.LocalStack) -> None:
    host = bare.controller.removeprefix("http://")
    page = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    # What a web page's form or fetch() can send to 127.0.0.1 without a preflight:
    forged = call(bare, "POST", "/v1/deployments", content=b'{"model_id": "x"}', headers=page)
    assert forged.status_code == 403 and "Origin 'http://evil.example'" in forged.json()["error"]
    with_token = call(bare, "DELETE", "/v1/deployments", headers=page | bare.headers)
    assert with_token.status_code == 403
    rebound = call(
        bare, "GET", "/v1/deployments", headers=bare.headers | {"Host": f"evil.example:{bare.controller_port}"}
    )
    assert rebound.status_code == 403 and "Host 'evil.example:" in rebound.json()["error"]
    fetched = call(bare, "GET", "/v1/vram", headers=bare.headers | {"Sec-Fetch-Site": "cross-site"})
    assert fetched.status_code == 403
    plain = call(bare, "POST", "/v1/deployments", content=b"{}", headers=bare.headers | {"Content-Type": "text/plain"})
    assert plain.status_code == 415 and "application/json" in plain.json()["error"]
    # The controller's own origin and names, and clients without Origin, pass.
    own = call(bare, "GET", "/v1/deployments", headers=bare.headers | {"Origin": f"http://{host}"})
    assert own.status_code == 200
    named = call(bare, "GET", "/v1/vram", headers=bare.headers | {"Host": f"localhost:{bare.controller_port}"})
    assert named.status_code == 200


def test_code_loading_and_dashed_budget_arguments_are_refused(bare: stack.LocalStack) -> None:
    spec = stack.demo_model_spec("sneaky")
    for extra, said in (
        ({"--trust-remote-code": True}, "allow_remote_code"),
        ({"worker-extension-cls": "evil.Ext"}, "allow_remote_code"),
        ({"gpu-memory-utilization": 0.95}, "gpu_memory_utilization: ray-vram sets it from vram_gb"),
        ({"--device-memory-utilization": 0.95}, "vLLM's gpu_memory_utilization"),
    ):
        body = spec | {"engine_kwargs": spec["engine_kwargs"] | extra}
        refused = call(bare, "POST", "/v1/deployments", json=body, headers=bare.headers)
        assert refused.status_code == 400 and said in refused.text, refused.text
    assert call(bare, "GET", "/v1/deployments", headers=bare.headers).json()["models"] == []


def test_sdk_and_cli_send_the_token_and_say_where_it_is(bare: stack.LocalStack, monkeypatch) -> None:
    monkeypatch.delenv("RAY_VRAM_CONTROLLER_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(bare.config_home))
    with VRAMScheduler(bare.controller) as found:  # from the installation's token file
        assert found.deployments() == []
    with VRAMScheduler(bare.controller, token="0" * 64) as wrong, pytest.raises(ControllerAuthError) as refused:
        wrong.get_vram_state()
    message = str(refused.value)
    assert "HTTP 401" in message and str(bare.config_home / "ray-vram" / "controller-token") in message
    assert "kubectl -n NAMESPACE get secret" in message
    env = {"RAY_VRAM_CONTROLLER": bare.controller, "XDG_CONFIG_HOME": str(bare.config_home)}
    assert run_cli("status", "--output", "json", env=env).returncode == 0
    cli = run_cli("status", "--token", "0" * 64, env=env)
    assert cli.returncode == 1 and "refused GET /v1/vram (HTTP 401)" in cli.stderr and "controller-token" in cli.stderr
    by_env = run_cli("status", env=env | {"XDG_CONFIG_HOME": "/nonexistent", "RAY_VRAM_CONTROLLER_TOKEN": bare.token})
    assert by_env.returncode == 0, by_env.stderr


def test_ray_vram_serve_requires_the_token_too(bare: stack.LocalStack, tmp_path: Path) -> None:
    """`ray-vram serve` (gunicorn, as the chart runs it) joined to the stack's cluster: the token from
    the environment, the hint the chart sets, and the extra host names it is told."""
    values = tmp_path / "values.yaml"
    serving = {"host": "127.0.0.1", "port": bare.serving_port}
    values.write_text(yaml.safe_dump({"models": [], "serving": serving}))
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    token = secrets.token_hex(32)
    env = os.environ | {
        "RAY_ADDRESS": bare.gcs_address,
        "RAY_VRAM_CONTROLLER_TOKEN": token,
        "RAY_VRAM_CONTROLLER_TOKEN_HINT": "the Secret rv-ray-vram-auth",
        "XDG_CONFIG_HOME": str(tmp_path / "nowhere"),
    }
    log = tmp_path / "serve.log"
    command = [
        sys.executable,
        "-m",
        "vram_scheduler.cli",
        "serve",
        "-f",
        str(values),
        "--ray-address",
        bare.gcs_address,
    ]
    with log.open("w") as out:
        server = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port), "--allowed-host", "ctl.example"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        stack.wait_http(api + "/healthz", 300, server, log)
        auth = {"Authorization": f"Bearer {token}"}
        refused = httpx.get(api + "/v1/deployments", timeout=30)  # refused even while it starts
        assert refused.status_code == 401 and refused.json()["hint"] == "the Secret rv-ray-vram-auth"
        deadline = time.monotonic() + 300
        while (answer := httpx.get(api + "/v1/deployments", headers=auth, timeout=30)).status_code == 503:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert answer.status_code == 200, answer.text
        named = httpx.get(api + "/v1/vram", headers=auth | {"Host": f"ctl.example:{port}"}, timeout=30)
        assert named.status_code == 200
        other = httpx.get(api + "/v1/vram", headers=auth | {"Host": f"other.example:{port}"}, timeout=30)
        assert other.status_code == 403 and "ctl.example" in other.json()["error"]
        spec = stack.demo_model_spec("sneaky")
        body = spec | {"engine_kwargs": spec["engine_kwargs"] | {"--trust-remote-code": True}}
        code = httpx.post(api + "/v1/deployments", json=body, headers=auth, timeout=60)
        assert code.status_code == 400 and "allow_remote_code" in code.text, code.text
        assert not (tmp_path / "nowhere").exists(), "a token from the environment writes no file"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
