"""VRAMScheduler against the real local stack: typed state, plan-first refusals, deploy with
progress, failures, idempotent shutdown. Inventory: GPU 0 = 8 GiB, GPU 1 = 4 GiB; `tiny`
(1.5 GiB + the default 2 GiB overhead) sits on GPU 1, and two more such replicas fit on GPU 0."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import stack
from rich.console import Console
from stack import ALIAS, MODEL

from vram_scheduler import (
    ConfigError,
    ControllerUnavailableError,
    DeploymentError,
    PlacementError,
    VRAMScheduler,
    VRAMState,
    inference,
)
from vram_scheduler.sdk.client import render_vram

pytestmark = pytest.mark.slow
GIB = 1024**3


def recording_console() -> Console:
    return Console(file=io.StringIO(), width=160, force_terminal=False)


def ledger(scheduler: VRAMScheduler) -> list[str]:
    return sorted(r.replica_id for g in scheduler.get_vram_state().gpus for r in g.replicas)


def test_vram_state_is_typed_and_json_serialisable(local_stack: stack.LocalStack) -> None:
    with VRAMScheduler(local_stack.controller) as scheduler:
        state = scheduler.get_vram_state()
    assert isinstance(state, VRAMState)
    assert [(g.index, g.total_bytes) for g in state.gpus] == [(0, 8 * GIB), (1, 4 * GIB)]
    (replica,) = state.gpus[1].replicas
    assert (replica.replica_id, replica.bytes) == ("tiny-0", int(1.5 * GIB))
    # the stack's placement.replica_overhead_gb (2): held beside the budget, and the engine's cap
    assert (replica.overhead_bytes, replica.cap_bytes) == (2 * GIB, int(3.5 * GIB))
    assert state.gpus[1].free_bytes == int(0.5 * GIB)  # 4 − (1.5 + 2)
    assert VRAMState.model_validate(json.loads(json.dumps(state.model_dump()))) == state


def test_display_shows_every_gpu_and_the_models(local_stack: stack.LocalStack) -> None:
    console = recording_console()
    with VRAMScheduler(local_stack.controller) as scheduler:
        scheduler.display_vram_state(console)
    text = console.file.getvalue()
    assert "NVIDIA Test 8GB" in text and "NVIDIA Test 4GB" in text
    assert "tiny-0 1.50+2.00" in text and "1/1 ready" in text  # no use known (a declared inventory): no verdict
    # the models table: what the controller resolved (overhead and where it came from, max_model_len)
    assert "1.5 + 2.00 (placement.replica_overhead_gb)" in text and "│ 512 " in text


def test_over_reservation_is_red_over_budget_is_not(local_stack: stack.LocalStack) -> None:
    with VRAMScheduler(local_stack.controller) as scheduler:
        state = scheduler.get_vram_state()
    gpu = state.gpus[1]
    replica = gpu.replicas[0]

    def shown(used: int) -> str:
        using = gpu.model_copy(update={"replicas": [replica.model_copy(update={"used_bytes": used})]})
        console = Console(file=io.StringIO(), width=160, force_terminal=True, color_system="standard")
        console.print(render_vram(state.model_copy(update={"gpus": [state.gpus[0], using]})))
        return console.file.getvalue()

    normal = shown(2 * GIB)  # over its 1.5 GiB budget, within budget + overhead: how a CUDA engine runs
    assert "within reservation" in normal and "\x1b[1;31m" not in normal
    over = shown(4 * GIB)
    assert "over reservation by" in over and "\x1b[1;31m" in over  # bold red


def test_model_that_does_not_fit_is_refused_before_deploying(local_stack: stack.LocalStack) -> None:
    with VRAMScheduler(local_stack.controller, console=recording_console()) as scheduler:
        before = ledger(scheduler)
        with pytest.raises(PlacementError) as caught:
            scheduler.deploy_model("huge", "demo", 8.0)
        assert "huge" in str(caught.value) and "10.00 GiB" in str(caught.value)
        assert caught.value.placed == 0 and caught.value.requested == 1
        with pytest.raises(PlacementError) as partial:
            scheduler.deploy_model("many", "demo", 1.5, replicas=3)
        assert partial.value.placed == 2 and partial.value.requested == 3
        assert "2 of 3" in str(partial.value) and "nothing was deployed" in str(partial.value)
        assert ledger(scheduler) == before
        assert [d.model_id for d in scheduler.deployments()] == [MODEL]


def test_invalid_fields_are_named(local_stack: stack.LocalStack) -> None:
    with VRAMScheduler(local_stack.controller) as scheduler:
        with pytest.raises(ConfigError, match=r"vram_gb = -1"):
            scheduler.deploy_model("bad", "demo", -1)
        with pytest.raises(ConfigError, match="model_id"):
            scheduler.deploy_model("Bad Name", "demo", 1)
        with pytest.raises(ConfigError, match="gpu_memory_utilization"):
            scheduler.deploy_model("bad", "demo", 1, gpu_memory_utilization=0.5)


def test_deploy_shows_progress_lands_where_planned_and_shuts_down(local_stack: stack.LocalStack) -> None:
    console = recording_console()
    with VRAMScheduler(local_stack.controller, console=console) as scheduler:
        planned = scheduler.plan([stack_spec("second")]).replicas_of("second")
        try:
            result = scheduler.deploy_model("second", "demo", 1.5, max_model_len=512, **stack.ENGINE_KWARGS)
            assert result.ready and [r.replica_id for r in result.replicas] == ["second-0"]
            assert (result.replicas[0].node, result.replicas[0].gpu_index) == ("sdk-node", 0)
            assert [(r.node, r.gpu_index) for r in planned] == [("sdk-node", 0)]
            progress = console.file.getvalue()
            assert "second: second-0 (node sdk-node, GPU 0) loading → ready" in progress, progress
            assert isinstance(inference("hi", "second", base_url=local_stack.endpoint, max_tokens=2), str)
            again = scheduler.deploy_model("second", "demo", 1.5, max_model_len=512, **stack.ENGINE_KWARGS)
            assert [r.replica_id for r in again.replicas] == ["second-0"]  # same spec: nothing restarted
        finally:
            removed = scheduler.shutdown("second")
        assert removed == ["second"]
        assert scheduler.shutdown("second") == []  # idempotent
        assert ledger(scheduler) == ["tiny-0"]


def test_replica_that_cannot_start_is_a_deployment_error(local_stack: stack.LocalStack) -> None:
    with VRAMScheduler(local_stack.controller, console=recording_console()) as scheduler:
        try:
            with pytest.raises(DeploymentError, match="broken"):
                scheduler.deploy_model("broken", "demo", 0.5, max_model_len=512, timeout_s=300, **stack.ENGINE_KWARGS)
        finally:
            scheduler.shutdown("broken")
        assert ledger(scheduler) == ["tiny-0"]


def test_router_name_is_listed(local_stack: stack.LocalStack) -> None:
    with VRAMScheduler(local_stack.controller) as scheduler:
        assert scheduler.deployment(MODEL).model_id == MODEL
        assert inference("x", ALIAS, base_url=local_stack.endpoint, max_tokens=1) is not None


def test_unreachable_controller_is_named() -> None:
    address = f"http://127.0.0.1:{stack.free_port()}"
    with VRAMScheduler(address) as scheduler, pytest.raises(ControllerUnavailableError, match=address):
        scheduler.get_vram_state()


def stack_spec(model_id: str):
    from vram_scheduler.sdk.client import model_spec

    return model_spec(model_id, "demo", 1.5, max_model_len=512, **stack.ENGINE_KWARGS)


def test_a_ray_address_drives_the_cluster_in_process(local_stack: stack.LocalStack) -> None:
    code = (
        "import json, sys\n"
        "from vram_scheduler import VRAMScheduler, PlacementError\n"
        "s = VRAMScheduler(sys.argv[1])\n"
        "state = s.get_vram_state()\n"
        "try:\n"
        "    s.deploy_model('huge', 'demo', 8.0)\n"
        "    refused = ''\n"
        "except PlacementError as error:\n"
        "    refused = str(error)\n"
        "print(json.dumps({'gpus': len(state.gpus), 'models': [d.model_id for d in s.deployments()],\n"
        "                  'refused': refused, 'removed': s.shutdown('not-deployed')}))\n"
    )
    env = os.environ | {"RAY_TMPDIR": str(local_stack.work), "RAY_AUTH_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-c", code, local_stack.gcs_address], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["gpus"] == 2 and data["models"] == [MODEL] and data["removed"] == []
    assert "huge needs 10.00 GiB" in data["refused"]


CONCURRENT_CLIENT = """
import json, sys
from vram_scheduler import PlacementError, VRAMScheduler
address, model_id = sys.argv[1], sys.argv[2]
with VRAMScheduler(address) as scheduler:
    try:
        result = scheduler.deploy_model(model_id, "demo", 0.5, max_model_len=512, wait=False, progress=False)
        outcome = {"placed": [(r.node, r.gpu_index) for r in result.replicas]}
    except PlacementError as error:
        outcome = {"refused": str(error)}
    outcome["removed"] = scheduler.shutdown(model_id)
print(json.dumps(outcome))
"""

CLUSTER_VIEW = """
import json, sys, ray
from vram_scheduler.allocator.actor import AllocatorClient
from vram_scheduler.core.loopback import prepare_ray_join
from vram_scheduler.core.ray_names import NAMESPACE
from ray import serve
prepare_ray_join(sys.argv[1])
ray.init(address=sys.argv[1], namespace=NAMESPACE, log_to_driver=False, logging_level="ERROR")
actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == "ray-vram-controller"]
held = sorted(r.replica_id for r in AllocatorClient().reservations())
apps = sorted(serve.status().applications)
print(json.dumps({"controllers": actors, "held": held, "apps": apps}))
"""


def test_concurrent_deploys_from_several_processes_share_one_controller(local_stack: stack.LocalStack) -> None:
    """Four processes at once — two through the controller's HTTP API, two through a Ray address —
    each deploy a model (room for two: 2.5 GiB reservations on 4.5 and 4 GiB free) and remove it.
    Every call lands on the cluster's one controller actor: no second controller, no double booking,
    refusals name the shortfall, and nothing is left reserved or deployed afterwards."""
    env = os.environ | {"RAY_TMPDIR": str(local_stack.work), "RAY_AUTH_MODE": "disabled"}
    addresses = [local_stack.controller, local_stack.gcs_address] * 2
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_CLIENT, address, f"concurrent-{i}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, address in enumerate(addresses)
    ]
    outcomes = []
    for client in clients:
        out, err = client.communicate(timeout=600)
        assert client.returncode == 0, err[-3000:]
        outcomes.append(json.loads(out.strip().splitlines()[-1]))
    placed = [o["placed"] for o in outcomes if "placed" in o]
    assert 1 <= len(placed) <= 4, outcomes
    assert all(len(p) == 1 for p in placed), outcomes
    for refused in (o["refused"] for o in outcomes if "refused" in o):
        assert "needs 2.50 GiB" in refused and "short by" in refused, refused
    assert [o["removed"] for o in outcomes] == [
        [f"concurrent-{i}"] if "placed" in o else [] for i, o in enumerate(outcomes)
    ]
    view = subprocess.run(
        [sys.executable, "-c", CLUSTER_VIEW, local_stack.gcs_address],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert view.returncode == 0, view.stderr[-3000:]
    cluster = json.loads(view.stdout.strip().splitlines()[-1])
    assert len(cluster["controllers"]) == 1, cluster["controllers"]
    assert cluster["held"] == ["tiny-0"], cluster
    assert not [a for a in cluster["apps"] if a.startswith("model-concurrent")], cluster["apps"]
    with VRAMScheduler(local_stack.controller) as scheduler:
        assert [d.model_id for d in scheduler.deployments()] == [MODEL]
