"""Declared is what runs, end to end with real vLLM (CPU) replicas on a declared inventory: a model
without room is pending with the planner's reason on every surface (the controller's status, its
HTTP API and metrics, the router's 503, the `helm test` script); removing another model places it
and it answers, with no restart; a node whose inventory joins later gets the pending replicas; a
model larger than every GPU stays pending saying it needs a bigger one; the ledger agrees with the
controller after every step.

Tests run in file order on one stack (a step's state is the next one's start).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx
import pytest
import ray
import yaml
from waiting import wait_until

from vram_scheduler.core.contract import DeploymentStatus
from vram_scheduler.core.loopback import free_port

from .conftest import deployed, model, start_monitor, with_demo_models

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HELM_TEST = ROOT / "charts" / "ray-vram" / "files" / "helm-test.py"
NODE, LATE_NODE = "ci-gpu-node", "ci-late-node"
# One 12 GiB GPU: big (6.5 GiB + 2 overhead = 8.5) leaves 3.5 GiB, where late (5 + 2 = 7) does not
# fit; huge (30 + 2 = 32) fits on no GPU at all. The node joining later has an 8 GiB GPU.
INVENTORY = {
    "nodes": [{"node": NODE, "gpus": [{"index": 0, "uuid": "GPU-pend-0", "name": "Test 12GB", "total_gb": 12}]}]
}
LATE_INVENTORY = {
    "nodes": [{"node": LATE_NODE, "gpus": [{"index": 0, "uuid": "GPU-pend-1", "name": "Test 8GB", "total_gb": 8}]}]
}
LATE_REASON = (
    "1 replica of model late needs 7.00 GiB per replica (5 GiB budget + 2.00 GiB overhead); the largest free "
    "slot is 3.50 GiB on node ci-gpu-node, GPU 0 (short by 3.50 GiB)"
)
HUGE_REASON = (
    "1 replica of model huge needs 32.00 GiB per replica (30 GiB budget + 2.00 GiB overhead), more than any GPU "
    "holds: the largest is 12.00 GiB (Test 12GB) on node ci-gpu-node, GPU 0; it needs a bigger GPU, not a free one"
)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


@dataclass
class Pending:
    controller: Any
    base: str  # the OpenAI endpoint
    api: str  # the controller's HTTP API
    gcs_address: str
    work: Path
    monitors: list[tuple[Any, threading.Thread]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pending]:
    from vram_scheduler.core.config import parse_config
    from vram_scheduler.core.ray_names import NAMESPACE
    from vram_scheduler.serving.controller.http_api import ControllerAPI

    work = tmp_path_factory.mktemp("pending")
    inventory = work / "inventory.yaml"
    inventory.write_text(yaml.safe_dump(INVENTORY))
    port = free_port()
    models = [
        model("big", replicas=1, vram_gb=6.5),
        model("late", replicas=1, vram_gb=5),
        model("huge", replicas=1, vram_gb=30),
    ]
    # A 2 GiB overhead for every model (placement.replica_overhead_gb), so the reasons' arithmetic is round.
    values = {"models": models, "placement": {"replica_overhead_gb": 2}, "serving": {"host": "127.0.0.1", "port": port}}
    config = parse_config(values, "pending tests")
    ray.init(
        address="local",
        namespace=NAMESPACE,
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    monitors = [start_monitor(NODE, ray.get_runtime_context().gcs_address, inventory)]  # a test adds one
    try:
        with deployed(config) as controller:
            server = make_server("127.0.0.1", free_port(), ControllerAPI(controller), handler_class=_Quiet)
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            try:
                yield Pending(
                    controller,
                    f"http://127.0.0.1:{port}",
                    f"http://127.0.0.1:{server.server_port}",
                    ray.get_runtime_context().gcs_address,
                    work,
                    monitors,
                )
            finally:
                server.shutdown()
    finally:
        for monitor, thread in monitors:
            monitor.stop()
            thread.join(timeout=10)
        ray.shutdown()


def models(stack: Pending) -> dict[str, DeploymentStatus]:
    return {m.model_id: m for m in stack.controller.status().models}


def consistent(stack: Pending) -> dict[str, DeploymentStatus]:
    """The ledger agrees with the controller: each reservation is a placed replica's, on the GPU and
    with the bytes the controller lists; no pending replica holds one; every ready replica holds
    one; no GPU is reserved past its total. Returns the models."""
    status = models(stack)
    held = {r.replica_id: r for r in stack.controller.allocator.reservations()}
    placed = {r.replica_id: r for m in status.values() for r in m.replicas if r.state != "pending"}
    pending = {r.replica_id for m in status.values() for r in m.pending}
    assert not pending & set(held), f"pending replicas hold reservations: {sorted(pending & set(held))}"
    assert set(held) <= set(placed), f"reservations of no placed replica: {sorted(set(held) - set(placed))}"
    for replica_id, reservation in held.items():
        assert (reservation.gpu_uuid, reservation.bytes) == (
            placed[replica_id].gpu_uuid,
            placed[replica_id].bytes,
        )
    ready = {rid for rid, r in placed.items() if r.state == "ready"}
    assert ready <= set(held), f"ready replicas without a reservation: {sorted(ready - set(held))}"
    for gpu in stack.controller.allocator.vram_state().gpus:
        assert gpu.free_bytes >= 0, gpu
    return status


def until(what: str, check: Any, timeout_s: float = 300) -> Any:
    return wait_until(check, timeout_s, what, every_s=0.5)


def chat(stack: Pending, name: str) -> httpx.Response:
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(stack.base + "/v1/chat/completions", json=body, timeout=120)


def test_a_model_without_room_is_pending_with_the_planners_reason(stack: Pending) -> None:
    status = consistent(stack)
    assert sorted(status) == ["big", "huge", "late"]  # none forgotten
    assert [r.state for r in status["big"].replicas] == ["ready"]
    (late,) = status["late"].replicas
    assert (late.replica_id, late.state, late.node, late.reason) == ("late-0", "pending", None, LATE_REASON)
    assert late.since is not None and status["late"].unplaced == [LATE_REASON]
    assert [e.message for e in status["late"].events if e.kind == "pending"] == [LATE_REASON]
    (huge,) = status["huge"].replicas
    assert (huge.state, huge.reason) == ("pending", HUGE_REASON)


def test_every_surface_tells_the_same_reason(stack: Pending) -> None:
    listed = httpx.get(stack.api + "/v1/deployments", timeout=30).json()
    by_id = {m["model_id"]: m for m in listed["models"]}
    assert [(r["replica_id"], r["state"], r["reason"]) for r in by_id["late"]["replicas"]] == [
        ("late-0", "pending", LATE_REASON)
    ]
    metrics = httpx.get(stack.api + "/metrics", timeout=30).text
    for line in (
        'ray_vram_model_replicas{model_id="late",state="pending"} 1.0',
        'ray_vram_model_replicas{model_id="huge",state="pending"} 1.0',
        'ray_vram_model_replicas{model_id="big",state="pending"} 0.0',
        'ray_vram_model_replicas{model_id="big",state="running"} 1.0',
    ):
        assert line in metrics, metrics
    # The router: a 503 naming the case, the reason and since when, without Retry-After; /v1/models
    # lists the model that answers only.
    answer = until(
        "the router tells late is pending",
        lambda: (r := chat(stack, "late")).status_code == 503 and "pending" in r.text and r,
    )
    message = answer.json()["error"]["message"]
    assert message.startswith("model late is pending: no replica is placed since ") and LATE_REASON in message
    assert "retry-after" not in answer.headers
    assert HUGE_REASON in chat(stack, "huge").json()["error"]["message"]
    assert [m["id"] for m in httpx.get(stack.base + "/v1/models", timeout=30).json()["data"]] == ["big"]
    # `helm test`'s script fails at once, naming each pending replica and why.
    config = stack.work / "config.json"
    config.write_text('{"models": [{"model_id": "big"}, {"model_id": "late"}, {"model_id": "huge"}]}')
    env = {
        "OPENAI_URL": stack.base,
        "CONTROLLER_URL": stack.api,
        "CONFIG_JSON": str(config),
        "TIMEOUT_S": "120",
        "PATH": os.environ["PATH"],
    }
    result = subprocess.run([sys.executable, str(HELM_TEST)], env=env, capture_output=True, text=True, timeout=150)
    assert result.returncode == 1, result
    assert "FAIL 2 declared replica(s) are pending (not placed):" in result.stderr, result.stderr
    assert (
        f"late: late-0 pending: {LATE_REASON}" in result.stderr
        and f"huge: huge-0 pending: {HUGE_REASON}" in result.stderr
    )


def test_removing_a_model_places_the_pending_one_and_it_answers(stack: Pending) -> None:
    assert httpx.delete(stack.api + "/v1/deployments/big", timeout=300).json() == {"model_id": "big", "removed": True}
    status = consistent(stack)
    assert "big" not in status
    (late,) = status["late"].replicas
    assert (late.replica_id, late.node, late.gpu_index) == ("late-0", NODE, 0) and late.state != "pending"
    placed = [e.message for e in status["late"].events if e.kind == "placed"]
    assert len(placed) == 1 and placed[0].startswith("placed late-0 on node ci-gpu-node, GPU 0: room appeared after ")
    assert placed[0].endswith(f"s pending (was: {LATE_REASON})")
    stack.controller.wait_ready(["late"], timeout_s=600)
    answer = until("late answers", lambda: (r := chat(stack, "late")).status_code == 200 and r)
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"
    status = consistent(stack)
    assert status["late"].unplaced == [] and [r.state for r in status["late"].replicas] == ["ready"]
    assert 'ray_vram_model_replicas{model_id="late",state="pending"} 0.0' in httpx.get(stack.api + "/metrics").text


def test_a_node_that_joins_later_gets_the_pending_replicas(stack: Pending) -> None:
    from vram_scheduler.core.config import parse_config

    # A third model that does not fit beside late (12 - 7 = 5 GiB left; it needs 6.5), then a node joins.
    config = parse_config(
        {
            "models": [
                model("late", replicas=1, vram_gb=5),
                model("third", replicas=1, vram_gb=4.5),
                model("huge", replicas=1, vram_gb=30),
            ],
            "placement": {"replica_overhead_gb": 2},
            "serving": {"host": "127.0.0.1", "port": int(stack.base.rsplit(":", 1)[1])},
        },
        "pending tests",
    )
    applied = stack.controller.apply(with_demo_models(config))
    assert (applied.kept, applied.deployed, applied.removed) == (["late", "huge"], ["third"], [])
    assert applied.unplaced["huge"] == [HUGE_REASON]
    assert applied.unplaced["third"] == [
        "1 replica of model third needs 6.50 GiB per replica (4.5 GiB budget + 2.00 GiB overhead); the largest free "
        "slot is 5.00 GiB on node ci-gpu-node, GPU 0 (short by 1.50 GiB)"
    ]
    assert consistent(stack)["third"].replicas[0].state == "pending"
    late_inventory = stack.work / "late-inventory.yaml"
    late_inventory.write_text(yaml.safe_dump(LATE_INVENTORY))
    stack.monitors.append(start_monitor(LATE_NODE, stack.gcs_address, late_inventory))
    third = until(
        "third is placed on the node that joined",
        lambda: next((r for r in models(stack)["third"].replicas if r.state != "pending"), None),
    )
    assert (third.replica_id, third.node, third.gpu_uuid) == ("third-0", LATE_NODE, "GPU-pend-1")
    stack.controller.wait_ready(["third"], timeout_s=600)
    assert until("third answers", lambda: chat(stack, "third").status_code == 200)
    status = consistent(stack)
    assert [r.state for r in status["late"].replicas] == ["ready"]  # never moved nor restarted
    assert [r.state for r in status["huge"].replicas] == ["pending"]  # still: no GPU here is large enough
    assert status["huge"].replicas[0].reason == HUGE_REASON  # the 12 GiB GPU is still the largest
