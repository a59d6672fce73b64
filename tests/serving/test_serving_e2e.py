"""End to end through Ray Serve with real vLLM (CPU backend) replicas of the generated demo model:
placement by the plan, the OpenAI API (completions, chat, SSE streaming, structured output, errors,
concurrency, the official client), controller convergence and a clean shutdown.

Tests run in file order on one stack (starting vLLM replicas dominates the cost); the later
ones change the deployed models.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import yaml
from pydantic import BaseModel
from ray import serve
from waiting import wait_until

from vram_scheduler.serving.app import model_app_name, model_application
from vram_scheduler.serving.controller.controller import deploy_in_background
from vram_scheduler.serving.router.router import REPLICA_HEADER

from .conftest import Stack, free_port, model, stream_outcome

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def post(stack: Stack, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(stack.base + path, json=body, timeout=timeout)


def replica_pids(model_id: str) -> dict[str, list[int]]:
    group = serve.get_app_handle(model_app_name(model_id))
    return {info["replica_id"]: info["pids"] for info in group.replica_info.remote().result(timeout_s=60)}


# -- placement -----------------------------------------------------------------------------------


def test_replicas_hold_the_planned_reservations(stack: Stack) -> None:
    status = stack.controller.status()
    models = {m.model_id: m for m in status.models}
    assert sorted(models) == ["alpha", "beta"]
    ledger = {r.replica_id: r for r in stack.controller.allocator.reservations()}
    assert sorted(ledger) == ["alpha-0", "alpha-1", "beta-0", "beta-1"]
    for entry in models.values():
        assert [r.state for r in entry.replicas] == ["ready", "ready"]
        for replica in entry.replicas:
            held = ledger[replica.replica_id]
            assert (
                (replica.gpu_uuid, replica.bytes)
                == (held.gpu_uuid, held.bytes)
                == (
                    held.gpu_uuid,
                    int(1.5 * 1024**3),
                )
            )
    # The planner packs beta's two replicas onto the 12 GiB GPU (alpha-0 took the 4 GiB one).
    beta_gpus = {r.gpu_uuid for r in models["beta"].replicas}
    assert beta_gpus == {"GPU-5e5e0000-0000-0000-0000-000000000000"}
    state = stack.controller.allocator.vram_state()
    on_gpu0 = next(g for g in state.gpus if g.index == 0)
    assert sorted(r.replica_id for r in on_gpu0.replicas) == ["alpha-1", "beta-0", "beta-1"]
    # Each replica is its own Serve deployment, named by its replica id, and reported its processes.
    for model_id in models:
        for replica_id, pids in replica_pids(model_id).items():
            assert replica_id.startswith(model_id) and pids


def test_models_endpoint_lists_ids_and_aliases(stack: Stack) -> None:
    listed = httpx.get(stack.base + "/v1/models", timeout=30).json()
    assert listed["object"] == "list"
    assert {m["id"] for m in listed["data"]} == {"alpha", "beta", "beta-alias"}


# -- the OpenAI API ------------------------------------------------------------------------------


def test_completion(stack: Stack) -> None:
    response = post(
        stack, "/v1/completions", {"model": "alpha", "prompt": "The cat", "max_tokens": 7, "ignore_eos": True}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["model"] == "alpha"
    assert body["usage"]["completion_tokens"] == 7
    assert isinstance(body["choices"][0]["text"], str)


def test_max_tokens_defaults_from_the_model_config(stack: Stack) -> None:
    for name, expected in (("alpha", 12), ("beta-alias", 10)):
        body = post(stack, "/v1/completions", {"model": name, "prompt": "hello", "ignore_eos": True}).json()
        assert body["usage"]["completion_tokens"] == expected, body


def test_chat_completion_via_alias(stack: Stack) -> None:
    response = post(
        stack,
        "/v1/chat/completions",
        {"model": "beta-alias", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in {"length", "stop"}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_is_sse_ending_with_done(stack: Stack, path: str) -> None:
    body = {"model": "alpha", "max_tokens": 6, "ignore_eos": True, "stream": True}
    body |= {"stream_options": {"include_usage": True}}
    body |= {"prompt": "Our team"} if "chat" not in path else {"messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", stack.base + path, json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    with_choices = [c for c in chunks if c["choices"]]
    assert len(with_choices) >= 2  # streamed in pieces, not one body
    assert with_choices[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6


class City(BaseModel):
    city: Literal["paris", "london"]
    ok: bool


def test_structured_output_parses_into_a_pydantic_class(stack: Stack) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["paris", "london"]}, "ok": {"type": "boolean"}},
        "required": ["city", "ok"],
        "additionalProperties": False,
    }
    response = post(
        stack,
        "/v1/chat/completions",
        {
            "model": "beta",
            "messages": [{"role": "user", "content": "a city as JSON"}],
            "max_tokens": 64,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        },
    )
    assert response.status_code == 200, response.text
    parsed = City.model_validate_json(response.json()["choices"][0]["message"]["content"])
    assert parsed.city in {"paris", "london"}


def test_errors_have_openai_shape_and_never_restart_a_replica(stack: Stack) -> None:
    before = {m: replica_pids(m) for m in ("alpha", "beta")}
    unknown = post(stack, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["param"] == "model" and "nope" in unknown.json()["error"]["message"]
    missing = post(stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 400 and "model" in missing.json()["error"]["message"]
    garbage = httpx.post(stack.base + "/v1/completions", content=b"{not json", timeout=30)
    assert garbage.status_code == 400 and "JSON" in garbage.json()["error"]["message"]
    bad_field = post(stack, "/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": "many"})
    assert bad_field.status_code == 400 and "max_tokens" in bad_field.json()["error"]["message"]
    bad_chat = post(stack, "/v1/chat/completions", {"model": "alpha", "messages": "not a list"})
    assert bad_chat.status_code == 400 and "messages" in bad_chat.json()["error"]["message"]
    too_long = post(stack, "/v1/completions", {"model": "alpha", "prompt": "hello " * 600, "max_tokens": 4})
    assert too_long.status_code == 400
    assert "512" in too_long.json()["error"]["message"]  # names the limit
    truncated = post(
        stack,
        "/v1/completions",
        {"model": "alpha", "prompt": "hello " * 600, "max_tokens": 4, "truncate_prompt_tokens": 500},
    )
    assert truncated.status_code == 200, truncated.text
    assert truncated.json()["usage"]["prompt_tokens"] == 500
    assert {m: replica_pids(m) for m in ("alpha", "beta")} == before


def test_concurrent_requests_spread_over_replicas(stack: Stack) -> None:
    body = {"model": "alpha", "prompt": "Prompt says", "max_tokens": 8, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: post(stack, "/v1/completions", body | {"prompt": f"p{i}"}), range(32)))
    assert [r.status_code for r in results] == [200] * 32
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in results)
    assert len({r.json()["id"] for r in results}) == 32
    served = Counter(r.headers[REPLICA_HEADER.decode()] for r in results)
    assert sorted(served) == ["alpha-0", "alpha-1"]
    assert all(count >= 8 for count in served.values()), served  # both replicas took a share


def test_official_openai_client(stack: Stack) -> None:
    import openai

    client = openai.OpenAI(base_url=stack.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert {m.id for m in client.models.list()} >= {"alpha", "beta"}
    completion = client.completions.create(model="alpha", prompt="hello", max_tokens=4, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 4
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
    )
    assert sum(1 for chunk in stream if chunk.choices and chunk.choices[0].delta.content is not None) >= 1
    parsed = client.chat.completions.parse(
        model="beta", messages=[{"role": "user", "content": "json"}], max_tokens=64, response_format=City
    )
    assert isinstance(parsed.choices[0].message.parsed, City)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="alpha", prompt="x", max_tokens=-3)


def test_engine_metrics_reach_rays_metrics_agent_under_the_dashboards_names(stack: Stack) -> None:
    """Every vLLM metric the Grafana dashboards query is exported, per model, where the chart scrapes."""
    external = yaml.safe_load((ROOT / "tests" / "chart" / "data" / "external-metrics.yaml").read_text())
    wanted = {name for name, entry in external.items() if entry["package"] == "vllm"}
    assert wanted, "the dashboards query vLLM's engine metrics"
    for i in range(3):
        assert post(stack, "/v1/completions", {"model": "alpha", "prompt": f"m{i}", "max_tokens": 4}).status_code == 200
    missing = wanted

    def all_exported() -> bool:
        nonlocal missing
        text = httpx.get(stack.ray_metrics, timeout=10).text
        series = {line.split("{", 1)[0] for line in text.splitlines() if 'model_name="alpha"' in line}
        missing = wanted - series
        return not missing

    # Ray's agent exports what replicas recorded every few seconds.
    wait_until(all_exported, 90, lambda: f"every dashboard metric exported for alpha; missing {sorted(missing)}", 1)


# -- failure: no reservation -------------------------------------------------------------------


def test_replica_without_reservation_fails_fast_with_the_reason(stack: Stack) -> None:
    from vram_scheduler.core.config import ModelSpec
    from vram_scheduler.core.planner import Reservation

    spec = ModelSpec.model_validate(model("greedy", replicas=1) | {"vram_gb": 2.5})
    # Planned onto the 4 GiB GPU, where alpha-0 leaves 0.5 GiB: the allocator must refuse.
    target = Reservation(
        replica_id="greedy-0",
        model_id="greedy",
        node="ci-gpu-node",
        gpu_uuid="GPU-5e5e0000-0000-0000-0000-000000000001",
        gpu_index=1,
        bytes=spec.vram_bytes,
    )
    started = time.monotonic()
    deploy_in_background(model_application(spec, [target], stack.controller.serving), "greedy")
    try:
        while True:
            app = serve.status().applications["greedy"]
            if app.status == "DEPLOY_FAILED":
                break
            assert time.monotonic() - started < 120, app
            time.sleep(0.5)
        message = app.deployments["greedy-0"].message
        assert "no reservation" in message and "short by" in message and "GPU 1" in message, message
        assert all(r.replica_id != "greedy-0" for r in stack.controller.allocator.reservations())
    finally:
        serve.delete("greedy")


# -- the controller ------------------------------------------------------------------------------


def test_controller_rerun_converges_without_touching_unchanged_models(stack: Stack, tmp_path: Path) -> None:
    """`ray-vram serve` (gunicorn) started with alpha removed and gamma added, while beta keeps answering."""
    beta_before = replica_pids("beta")
    config = {
        "models": [model("beta", router_name="beta-alias", max_tokens=10), model("gamma", replicas=1)],
        "serving": {"host": "127.0.0.1", "port": int(stack.base.rsplit(":", 1)[1])},
    }
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(config))
    stop = threading.Event()
    answers: list[int] = []

    def keep_asking() -> None:
        while not stop.is_set():
            try:
                answers.append(
                    post(stack, "/v1/completions", {"model": "beta", "prompt": "x", "max_tokens": 2}).status_code
                )
            except httpx.HTTPError:
                answers.append(-1)
            time.sleep(0.2)

    asker = threading.Thread(target=keep_asking, daemon=True)
    asker.start()
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    token = secrets.token_hex(16)
    auth = {"Authorization": f"Bearer {token}"}
    log = (tmp_path / "serve.log").open("w")
    command = [sys.executable, "-m", "vram_scheduler.cli", "serve", "-f", str(tmp_path / "models.yaml")]
    server = subprocess.Popen(
        [*command, "--ray-address", stack.gcs_address, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ | {"RAY_ADDRESS": stack.gcs_address, "RAY_VRAM_CONTROLLER_TOKEN": token},
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                status = httpx.get(api + "/v1/deployments", headers=auth, timeout=10)
                if status.status_code == 200:
                    models = {m["model_id"]: m for m in status.json()["models"]}
                    states = [r["state"] for m in models.values() for r in m["replicas"]]
                    if sorted(models) == ["beta", "gamma"] and states == ["ready"] * 3:
                        break
                    assert "failed" not in states, status.text
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "controller did not converge"
            time.sleep(1)
        stack.controller.wait_ready(timeout_s=120)
        gamma = post(stack, "/v1/completions", {"model": "gamma", "prompt": "x", "max_tokens": 3, "ignore_eos": True})
        assert gamma.status_code == 200 and gamma.json()["usage"]["completion_tokens"] == 3
        assert post(stack, "/v1/completions", {"model": "alpha", "prompt": "x"}).status_code == 404
        stop.set()
        asker.join(timeout=30)
        assert answers and set(answers) == {200}, answers
        assert replica_pids("beta") == beta_before  # same replicas, never restarted
        ledger = stack.controller.allocator.reservations()
        assert sorted(r.replica_id for r in ledger) == ["beta-0", "beta-1", "gamma-0"]
        assert model_app_name("alpha") not in serve.status().applications

        # The controller's HTTP API (served by gunicorn).
        assert httpx.get(api + "/healthz", timeout=10).json() == {"status": "ok"}
        vram = httpx.get(api + "/v1/vram", headers=auth, timeout=10).json()
        assert {g["uuid"] for g in vram["gpus"]} == {
            "GPU-5e5e0000-0000-0000-0000-000000000000",
            "GPU-5e5e0000-0000-0000-0000-000000000001",
        }
        assert httpx.get(api + "/metrics", timeout=10).status_code == 401  # Prometheus sends the token
        metrics = httpx.get(api + "/metrics", headers=auth, timeout=10).text
        assert 'ray_vram_model_replicas{model_id="gamma",state="running"} 1.0' in metrics
        assert "ray_vram_controller_reconciles_total" in metrics and "ray_vram_allocator_stale_nodes 0.0" in metrics
        bad = httpx.post(api + "/v1/deployments", json=model("delta") | {"vram_gb": -1}, headers=auth, timeout=30)
        assert bad.status_code == 400 and any("vram_gb" in p for p in bad.json()["problems"])
        huge = httpx.post(api + "/v1/deployments", json=model("delta") | {"vram_gb": 50}, headers=auth, timeout=60)
        assert huge.status_code == 409 and "delta" in huge.json()["reasons"][0], huge.text
        gone = httpx.delete(api + "/v1/deployments/never-deployed", headers=auth, timeout=30)
        assert gone.status_code == 200 and gone.json()["removed"] is False
        # gunicorn's controller requires its token too, and refuses code-loading engine arguments.
        refused = httpx.get(api + "/v1/deployments", timeout=10)
        assert refused.status_code == 401 and "RAY_VRAM_CONTROLLER_TOKEN" in refused.json()["hint"], refused.text
        remote = model("delta") | {"engine_kwargs": {"--trust-remote-code": True}}
        code = httpx.post(api + "/v1/deployments", json=remote, headers=auth, timeout=30)
        assert code.status_code == 400 and "allow_remote_code" in code.text, code.text
    finally:
        stop.set()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_delete_one_model_frees_its_reservations(stack: Stack) -> None:
    assert stack.controller.remove("gamma") is True
    assert stack.controller.remove("gamma") is False  # idempotent
    ledger = stack.controller.allocator.reservations()
    assert sorted(r.replica_id for r in ledger) == ["beta-0", "beta-1"]
    assert post(stack, "/v1/completions", {"model": "gamma", "prompt": "x"}).status_code == 404


def test_a_replica_killed_under_load_loses_no_request_silently(stack: Stack) -> None:
    """beta-0's process (engine included: no V1 multiprocessing here) is SIGKILLed while streams
    and plain requests are in flight on both replicas. Streams it was serving end with an
    OpenAI-shaped error event, never a hang or a silent end; plain requests it held are answered by
    beta-1 (a completion has no side effect, so the router sends it again); Serve brings beta-0
    back on the GPU its reservation names, and the ledger holds exactly the two reservations."""
    before = {r.replica_id: r for r in stack.controller.allocator.reservations()}
    victim = replica_pids("beta")["beta-0"][0]
    stream_body = {"model": "beta", "prompt": "Our team", "max_tokens": 200, "ignore_eos": True, "stream": True}
    plain_body = {"model": "beta", "prompt": "Our team", "max_tokens": 48, "ignore_eos": True}
    firsts = [threading.Event() for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        streams = [pool.submit(stream_outcome, stack.base, stream_body, first) for first in firsts]
        assert all(first.wait(60) for first in firsts), "streams did not start"
        plain = [pool.submit(post, stack, "/v1/completions", plain_body) for _ in range(8)]
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        outcomes = [s.result(timeout=120) for s in streams]
        answers = [p.result(timeout=300) for p in plain]
    assert not [o for o in outcomes if o in ("hung", "cut")], outcomes
    errors = [o for o in outcomes if o.startswith("error")]
    assert errors and all("replica beta-0 failed mid-response" in e for e in errors), outcomes
    assert [a.status_code for a in answers] == [200] * 8, [a.text[:300] for a in answers]
    assert all(a.json()["usage"]["completion_tokens"] == 48 for a in answers)
    # Each answer says how many replicas it was sent to; one on beta-0 when it died was sent again.
    attempts = [int(a.headers["x-ray-vram-attempts"]) for a in answers]
    assert all(n >= 1 for n in attempts) and all(
        a.headers["x-ray-vram-replica"] == "beta-1" for a, n in zip(answers, attempts, strict=True) if n > 1
    ), attempts

    replicas: dict[str, Any] = {}

    def beta_0_back() -> bool:
        nonlocal replicas
        replicas = {
            r.replica_id: r for m in stack.controller.status().models if m.model_id == "beta" for r in m.replicas
        }
        pids = replica_pids("beta") if all(r.state == "ready" for r in replicas.values()) else {}
        return bool(pids.get("beta-0")) and pids["beta-0"][0] != victim

    wait_until(beta_0_back, 300, lambda: f"beta-0 back in a new process: {replicas}", every_s=1)
    after = {r.replica_id: r for r in stack.controller.allocator.reservations()}
    assert sorted(after) == sorted(before)
    assert (after["beta-0"].gpu_uuid, after["beta-0"].bytes) == (before["beta-0"].gpu_uuid, before["beta-0"].bytes)
    infos = serve.get_app_handle(model_app_name("beta")).replica_info.remote().result(timeout_s=60)
    assert {i["replica_id"]: i["gpu_uuid"] for i in infos} == {
        k: v.gpu_uuid for k, v in after.items() if k.startswith("beta")
    }
    assert post(stack, "/v1/completions", plain_body).status_code == 200


def test_shutdown_leaves_the_ledger_empty(stack: Stack) -> None:
    stack.controller.shutdown()
    assert stack.controller.allocator.reservations() == []
    assert not [name for name in serve.status().applications if name.startswith("model-")]
