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
from conftest import ALIAS, MODEL
from rich.console import Console

from vram_scheduler import (
    ConfigError,
    ControllerUnavailableError,
    DeploymentError,
    PlacementError,
    VRAMScheduler,
    VRAMState,
    inference,
)
from vram_scheduler.client import render_vram

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
    assert state.gpus[1].free_bytes == int(0.5 * GIB)  # 4 − (1.5 + 2)
    assert VRAMState.model_validate(json.loads(json.dumps(state.model_dump()))) == state


def test_display_shows_every_gpu_and_the_models(local_stack: stack.LocalStack) -> None:
    console = recording_console()
    with VRAMScheduler(local_stack.controller) as scheduler:
        scheduler.display_vram_state(console)
    text = console.file.getvalue()
    assert "NVIDIA Test 8GB" in text and "NVIDIA Test 4GB" in text
    assert "tiny-0 1.50" in text and "1/1 ready" in text


def test_over_budget_is_red(local_stack: stack.LocalStack) -> None:
    with VRAMScheduler(local_stack.controller) as scheduler:
        state = scheduler.get_vram_state()
    gpu = state.gpus[1]
    over = gpu.model_copy(update={"replicas": [gpu.replicas[0].model_copy(update={"used_bytes": 2 * GIB})]})
    console = Console(file=io.StringIO(), width=160, force_terminal=True, color_system="standard")
    console.print(render_vram(state.model_copy(update={"gpus": [state.gpus[0], over]})))
    text = console.file.getvalue()
    assert "OVER" in text and "\x1b[1;31m" in text  # bold red


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
    from vram_scheduler.client import model_spec

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
