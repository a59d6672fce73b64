"""The data path end to end, with real vLLM (CPU) replicas behind the real router: a client that goes
away aborts its generation in the engine, replicas answer only requests carrying the cluster's
internal key (and refuse to start without one), paths that are not exact routes never reach a
replica, and no secret goes into a replica's runtime env (stored in the GCS) while replicas work.

The stack is started with secrets in the environment (an API key, a controller token, Hugging Face
tokens), as a pod would have them from its Secrets: Ray's processes inherit them, and none may
appear where Ray stores or shows runtime envs.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import orjson
import pytest
from ray import serve
from ray.experimental import internal_kv
from waiting import wait_until

from vram_scheduler.core.ray_names import NAMESPACE
from vram_scheduler.serving.app import model_app_name
from vram_scheduler.serving.controller.controller import SPEC_KEY_PREFIX, deploy_in_background
from vram_scheduler.serving.internal_key import INTERNAL_KEY_ENV, internal_key

from .conftest import Stack, model, running_stack

pytestmark = pytest.mark.slow

API_KEY = "datapath-api-key-0123456789"
SECRETS = {
    "RAY_VRAM_API_KEY": API_KEY,
    "RAY_VRAM_CONTROLLER_TOKEN": "datapath-controller-token-0123456789",
    "HF_TOKEN": "hf_datapath0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_datapath_hub0123456789",
}
AUTH = {"Authorization": f"Bearer {API_KEY}"}
#: Tokens of the long generations: far more than arrive before the client leaves.
LONG = 400


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """alpha (1 replica) for the checks, quiet (1 replica) for the aborted generations alone: its vLLM
    metrics count nothing else."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in SECRETS.items():
            patch.setenv(name, value)
        with running_stack([model("alpha", replicas=1), model("quiet", replicas=1)]) as started:
            yield started


def replica_url(model_id: str) -> str:
    infos = serve.get_app_handle(model_app_name(model_id)).replica_info.remote().result(timeout_s=60)
    return infos[0]["url"]


def engine_requests(replica_id: str) -> int:
    model_id = replica_id.rsplit("-", 1)[0]
    handle = serve.get_deployment_handle(replica_id, app_name=model_app_name(model_id))
    return handle.engine_requests.remote().result(timeout_s=60)


def vllm_counter(stack: Stack, name: str, model_id: str, label: str = "") -> float:
    """The sum of vLLM counter `name` over model `model_id`'s series (with `label` in them), as
    Ray's metrics agent exports it."""
    total = 0.0
    for line in httpx.get(stack.ray_metrics, timeout=10).text.splitlines():
        if line.startswith(name + "{") and f'model_name="{model_id}"' in line and label in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- a client that goes away ---------------------------------------------------------------------


def test_a_client_that_goes_away_aborts_its_generation_in_the_engine(stack: Stack) -> None:
    """A stream and a plain request, each of LONG tokens (`ignore_eos`), left by their client after
    it started: the engine holds neither any more. Proof that they were aborted rather than finished:
    after both, a marker request of 5 tokens; once vLLM's counters show the marker, they show every
    token generated before it, and only the marker finished ("length"), with far fewer than LONG
    tokens generated in all."""
    body = {"model": "quiet", "prompt": "count", "max_tokens": LONG, "ignore_eos": True}
    with httpx.stream("POST", stack.base + "/v1/completions", json=body | {"stream": True}, headers=AUTH) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(line for line in lines if line).startswith("data: ")  # generating
        assert engine_requests("quiet-0") == 1
    wait_until(lambda: engine_requests("quiet-0") == 0, 120, "the stream aborted in the engine")

    plain = orjson.dumps(body)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: r\r\nauthorization: Bearer {API_KEY}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(plain)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", int(stack.base.rsplit(":", 1)[1]))) as sock:
        sock.sendall(head.encode() + plain)
        wait_until(lambda: engine_requests("quiet-0") == 1, 120, "the plain request in the engine")
    wait_until(lambda: engine_requests("quiet-0") == 0, 120, "the plain request aborted in the engine")

    marker = httpx.post(
        stack.base + "/v1/completions",
        json={"model": "quiet", "prompt": "m", "max_tokens": 5, "ignore_eos": True},
        headers=AUTH,
        timeout=120,
    )
    assert marker.status_code == 200 and marker.json()["usage"]["completion_tokens"] == 5
    finished = 'finished_reason="length"'
    wait_until(
        lambda: vllm_counter(stack, "ray_vllm_request_success_total", "quiet", finished) >= 1,
        120,
        "the finished requests exported",
    )
    assert vllm_counter(stack, "ray_vllm_request_success_total", "quiet", finished) == 1  # the marker alone
    generated = vllm_counter(stack, "ray_vllm_generation_tokens_total", "quiet")
    assert 5 <= generated < LONG, f"{generated} tokens generated: a request ran on after its client left"


# -- the internal key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/health"),
        ("GET", "/metrics"),
        ("GET", "/v1/models"),
        ("GET", "/version"),
        ("POST", "/tokenize"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/responses"),
    ],
)
def test_a_replica_answers_401_to_anyone_without_the_internal_key(stack: Stack, method: str, path: str) -> None:
    url = replica_url("alpha") + path
    body = {"model": "alpha", "prompt": "x", "max_tokens": 2}
    for headers in ({}, AUTH, {"Authorization": f"Bearer {internal_key()}x"}):
        answer = httpx.request(method, url, json=body, headers=headers, timeout=60)
        assert answer.status_code == 401, (headers, answer.text)
        assert answer.json()["error"]["type"] == "AuthenticationError"


def test_a_replica_serves_requests_with_the_internal_key_and_the_router_sends_it(stack: Stack) -> None:
    key = {"Authorization": f"Bearer {internal_key()}"}
    assert httpx.get(replica_url("alpha") + "/health", headers=key, timeout=60).status_code == 200
    body = {"model": "alpha", "prompt": "x", "max_tokens": 2}
    direct = httpx.post(replica_url("alpha") + "/v1/completions", json=body, headers=key, timeout=120)
    assert direct.status_code == 200, direct.text
    routed = httpx.post(stack.base + "/v1/completions", json=body, headers=AUTH, timeout=120)
    assert routed.status_code == 200, routed.text


def test_a_replica_without_the_internal_key_refuses_to_start(stack: Stack) -> None:
    from vram_scheduler.core.config import ModelSpec, with_source
    from vram_scheduler.core.planner import Reservation
    from vram_scheduler.serving.replica.replica import replica_deployment

    spec = with_source(ModelSpec.model_validate(model("keyless", replicas=1)), stack.controller.serving)
    target = Reservation(
        replica_id="keyless-0",
        model_id="keyless",
        node="ci-gpu-node",
        gpu_uuid="GPU-5e5e0000-0000-0000-0000-000000000000",
        gpu_index=0,
        bytes=spec.vram_bytes,
    )
    # The node's key blanked for this replica alone (a node without one).
    deploy_in_background(replica_deployment(spec, target, stack.controller.serving, {INTERNAL_KEY_ENV: ""}), "keyless")
    try:
        failed = "keyless to fail its deploy"
        wait_until(lambda: serve.status().applications["keyless"].status == "DEPLOY_FAILED", 120, failed)
        message = serve.status().applications["keyless"].deployments["keyless-0"].message
        assert f"replica keyless-0: {INTERNAL_KEY_ENV} is not set on the node of replica keyless-0" in message, message
        assert "replicas refuse to serve without the cluster's internal key" in message
        assert all(r.replica_id != "keyless-0" for r in stack.controller.allocator.reservations())
    finally:
        serve.delete("keyless")


# -- exact routes --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions/", "/v1/../v1/chat/completions", "/v1/chat%2Fcompletions"])
def test_paths_that_are_not_exact_routes_never_reach_a_replica(stack: Stack, path: str) -> None:
    """Where main followed vLLM's redirect or normalised the path, past the media checks."""
    shadow = {"type": "image_url", "image_url": {"url": "file:///etc/shadow"}}
    chat = {"model": "alpha", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, shadow]}]}
    payload = orjson.dumps(chat)
    head = (
        f"POST {path} HTTP/1.1\r\nhost: r\r\nauthorization: Bearer {API_KEY}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", int(stack.base.rsplit(":", 1)[1])), timeout=60) as sock:
        sock.sendall(head.encode() + payload)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404 "), answer[:300]
    exact = httpx.post(stack.base + "/v1/chat/completions", json=chat, headers=AUTH, timeout=60)
    assert exact.status_code == 400 and "does not take image input" in exact.json()["error"]["message"]


# -- secrets -------------------------------------------------------------------------------------


def live_runtime_envs() -> dict[str, str]:
    """Each live actor's runtime env as Ray stores it in the GCS (its actor table), by class name."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = state._connect_and_get_accessor().get_actor_table(None, "ALIVE")
    actors = [gcs_pb2.ActorTableData.FromString(raw) for raw in table]
    return {f"{actor.class_name} {actor.actor_id.hex()}": actor.serialized_runtime_env for actor in actors}


def test_no_secret_is_in_a_runtime_env_or_the_controllers_records_while_replicas_serve(stack: Stack) -> None:
    secrets = [*SECRETS.values(), internal_key()]
    envs = live_runtime_envs()
    wanted = ("ServeReplica:model-alpha:alpha-0", "ServeReplica:model-quiet:quiet-0")
    replicas = {name: env for name, env in envs.items() if name.split()[0] in wanted}
    assert len(replicas) == 2, sorted(envs)
    for name, shown in envs.items():
        leaked = [variable for variable in [*SECRETS, INTERNAL_KEY_ENV] if variable in shown]
        leaked += [f"the value of a secret ({value[:6]}…)" for value in secrets if value in shown]
        assert not leaked, f"{name}: runtime env carries {leaked}"
    assert all("HF_HUB_OFFLINE" in env for env in replicas.values()), replicas  # the rest is passed on
    for key in internal_kv._internal_kv_list(SPEC_KEY_PREFIX, namespace=NAMESPACE):
        record = internal_kv._internal_kv_get(key, namespace=NAMESPACE).decode()
        assert not [value for value in secrets if value in record], f"{key!r} stores a secret"
    body = {"model": "alpha", "prompt": "x", "max_tokens": 2}
    assert httpx.post(stack.base + "/v1/completions", json=body, headers=AUTH, timeout=120).status_code == 200
