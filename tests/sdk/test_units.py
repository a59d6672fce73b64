"""SDK pieces that need no running stack: lazy public API, planning on a ledger state, parsing."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from pydantic import BaseModel

from vram_scheduler import (
    ArgumentOrderError,
    RayVramError,
    a_inference,
    a_inference_batch,
    inference,
    inference_batch,
    stream,
    streaming_batch,
)
from vram_scheduler.core.config import ModelSpec, PlacementSettings, gib_to_bytes
from vram_scheduler.core.contract import GPUState, ReplicaState, VRAMState
from vram_scheduler.sdk import chat_request, endpoints
from vram_scheduler.sdk.client import plan_on_state
from vram_scheduler.sdk.inference_errors import StructuredOutputError

GIB = 1024**3
#: The cluster's overhead in these states (replica states without their own take it).
SETTINGS = PlacementSettings(replica_overhead_gb=2)
OVERHEAD = gib_to_bytes(2)


def test_public_api_imports_neither_ray_nor_vllm() -> None:
    code = (
        "import sys\n"
        "from vram_scheduler import VRAMScheduler, inference, a_inference, inference_batch, a_inference_batch, "
        "streaming_batch, a_streaming_batch, get_vram_allocator, StructuredOutputError, VRAMState\n"
        "from vram_scheduler.sdk import inference as module\n"
        "assert inference is module.inference and a_inference is module.a_inference\n"
        "print(sorted(m for m in ('ray', 'vllm', 'torch') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def gpu(index: int, total_gb: float, replicas: list[ReplicaState], unmanaged_gb: float = 0) -> GPUState:
    reserved = sum(r.bytes + OVERHEAD for r in replicas)
    unmanaged = int(unmanaged_gb * GIB)
    return GPUState(
        node="n",
        index=index,
        uuid=f"GPU-{index}",
        name="Test",
        total_bytes=int(total_gb * GIB),
        used_bytes=unmanaged,
        unmanaged_bytes=unmanaged,
        reserved_bytes=reserved,
        free_bytes=int(total_gb * GIB) - unmanaged - reserved,
        healthy=True,
        stale=False,
        replicas=replicas,
    )


def replica(replica_id: str, model_id: str, gb: float) -> ReplicaState:
    return ReplicaState(
        replica_id=replica_id, model_id=model_id, bytes=int(gb * GIB), pid=None, pids=[], used_bytes=None, owner=None
    )


def state(*gpus: GPUState) -> VRAMState:
    return VRAMState(
        timestamp=0,
        gpus=list(gpus),
        nodes=[],
        stale_nodes=[],
        orphaned=[],
        startup_locks={},
        settings=SETTINGS,
    )


def test_plan_on_state_counts_other_models_and_unmanaged_memory_as_taken() -> None:
    current = state(gpu(0, 10.5, [replica("other-0", "other", 3)], unmanaged_gb=1), gpu(1, 5, []))
    result = plan_on_state(current, [ModelSpec(model_id="m", model="x", vram_gb=2.5, replicas=3)])
    # Each replica needs 2.5 + 2 = 4.5. GPU 0: 10.5 − 1 unmanaged − (3 + 2) = 4.5 free → exactly one;
    # GPU 1: 5 → one
    assert sorted(r.gpu_index for r in result.new) == [0, 1]
    (unplaced,) = result.unplaced
    assert unplaced.count == 1 and unplaced.model_id == "m"


def test_plan_on_state_keeps_the_models_own_replicas() -> None:
    current = state(gpu(0, 7, [replica("m-0", "m", 1.5)]))  # 2 × (1.5 + 2) = 7: room for m-1 exactly
    result = plan_on_state(current, [ModelSpec(model_id="m", model="x", vram_gb=1.5, replicas=2)])
    assert [r.replica_id for r in result.kept] == ["m-0"]
    assert [r.replica_id for r in result.new] == ["m-1"]
    assert result.complete


class Point(BaseModel):
    x: int


def test_structured_parse_accepts_raw_control_characters_and_names_bad_json() -> None:
    class Label(BaseModel):
        text: str

    assert chat_request.parse_structured('{"text":"a\x03b"}', Label, "m", "u", "stop").text == "a\x03b"
    with pytest.raises(StructuredOutputError, match="not JSON for Point") as caught:
        chat_request.parse_structured('{"x": 1', Point, "m", "u", "length")
    assert "max_tokens" in str(caught.value) and caught.value.raw == '{"x": 1'
    with pytest.raises(StructuredOutputError, match="does not validate as Point"):
        chat_request.parse_structured('{"x": "nine"}', Point, "m", "u", "stop")


def test_request_body_carries_schema_truncation_and_sampling() -> None:
    body = chat_request.build_request(
        "m", "hi", structured_output=Point, max_tokens=5, truncate_prompt_tokens=-1, sampling={"seed": 3}
    )
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["response_format"]["json_schema"]["schema"]["properties"] == {"x": {"title": "X", "type": "integer"}}
    assert (body["max_tokens"], body["truncate_prompt_tokens"], body["seed"]) == (5, -1, 3)


def test_deploy_progress_draws_a_bar_per_replica_on_a_terminal() -> None:
    import io

    from rich.console import Console

    from vram_scheduler.core.contract import DeploymentStatus, ReplicaStatus
    from vram_scheduler.sdk.deploy_progress import DeployProgress

    console = Console(file=io.StringIO(), force_terminal=True, width=120)

    def status(*states: str) -> DeploymentStatus:
        replicas = [ReplicaStatus(replica_id=f"m-{i}", state=s, node="n", gpu_index=i) for i, s in enumerate(states)]
        return DeploymentStatus(model_id="m", model="x", vram_gb=1, replicas=replicas)

    with DeployProgress(console) as view:
        assert view.live
        for states in (("reserved", "reserved"), ("loading", "reserved"), ("ready", "loading"), ("ready", "ready")):
            view.update(status(*states))
    text = console.file.getvalue()
    assert "m-0" in text and "m-1" in text and "node n, GPU 1" in text and "ready" in text


# -- the controller's answers, read by alias ------------------------------------------------------


def deployments_body() -> dict[str, object]:
    """What the controller's `GET /v1/deployments` sends: a model served under an alias too."""
    from vram_scheduler.core.contract import DeploymentList, ModelStatus, ReplicaStatus

    models = [
        ModelStatus(model_id="other", model="x", vram_gb=1, endpoint="http://other:8000/v1"),
        ModelStatus(
            model_id="beta",
            model="x",
            vram_gb=1,
            router_name="beta-alias",
            replicas=[ReplicaStatus(replica_id="beta-0", state="ready")],
            endpoint="http://beta:8000/v1",
        ),
    ]
    return DeploymentList(models=models).model_dump(mode="json")


def test_deployment_is_found_by_its_alias() -> None:
    import httpx

    from vram_scheduler.sdk.client import SchedulerError, VRAMScheduler

    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=deployments_body()))
    with VRAMScheduler("http://controller:8080") as scheduler:
        scheduler.api._client = httpx.Client(base_url=scheduler.address, transport=transport)
        assert scheduler.deployment("beta-alias").model_id == "beta"
        assert scheduler.deployment("beta").router_name == "beta-alias"
        with pytest.raises(SchedulerError, match="'gamma' is not deployed"):
            scheduler.deployment("gamma")


def test_inference_prefers_the_endpoint_of_the_alias() -> None:
    import httpx

    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=deployments_body()))
    with httpx.Client(transport=transport) as client:
        found = endpoints.candidates_from_controller(client, "http://controller:8080", "beta-alias")
    assert found == ["http://beta:8000/v1", "http://other:8000/v1"]


async def awaited(coroutine):
    return await coroutine


#: An address where nothing listens: a call that reached the network would fail to connect instead.
NOWHERE = "http://127.0.0.1:9/v1"
DOCUMENTED = "The documented order is {name}({first}, model_id, ...)"


@pytest.mark.parametrize(
    ("call", "name", "first", "says"),
    [
        (
            lambda: inference("demo", "Say hello", base_url=NOWHERE),
            "inference",
            "prompt",
            "model_id 'Say hello' is not a model name (a model name has no whitespace)",
        ),
        (
            lambda: inference("demo", [{"role": "user", "content": "hi"}], base_url=NOWHERE),
            "inference",
            "prompt",
            "model_id must be a model name (str), got list [{'role': 'user'",
        ),
        (
            lambda: asyncio.run(awaited(a_inference("demo", "Say hi", base_url=NOWHERE))),
            "a_inference",
            "prompt",
            "model_id 'Say hi' is not a model name",
        ),
        (
            lambda: list(stream("demo", "Say hi", base_url=NOWHERE)),
            "stream",
            "prompt",
            "model_id 'Say hi' is not a model name",
        ),
        (
            lambda: inference_batch("demo", ["a", "b"], base_url=NOWHERE),
            "inference_batch",
            "prompts",
            "prompts must be a list of prompts, got str 'demo' (and model_id is a list: that is the old order "
            "inference_batch(model_id, prompts); swap the two arguments)",
        ),
        (
            lambda: asyncio.run(awaited(a_inference_batch("demo", ["a"], base_url=NOWHERE))),
            "a_inference_batch",
            "prompts",
            "prompts must be a list of prompts, got str 'demo' (and model_id is a list",
        ),
        (
            lambda: streaming_batch("demo", ["a"], base_url=NOWHERE),
            "streaming_batch",
            "prompts",
            "prompts must be a list of prompts, got str 'demo' (and model_id is a list",
        ),
        (
            lambda: inference_batch(["a"], "big model", base_url=NOWHERE),
            "inference_batch",
            "prompts",
            "model_id 'big model' is not a model name",
        ),
    ],
)
def test_the_old_argument_order_is_refused_naming_the_argument_and_the_documented_order(
    call, name: str, first: str, says: str
) -> None:
    """No guessing by network calls: the values alone refuse the old (model_id, prompt) order, before
    anything is sent (the endpoint given is one where nothing listens)."""
    with pytest.raises(ArgumentOrderError) as caught:
        call()
    message = str(caught.value)
    assert message.startswith(f"{name}: {says}"), message
    assert DOCUMENTED.format(name=name, first=first) in message
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, RayVramError)


def test_an_old_order_with_a_one_word_prompt_says_to_swap() -> None:
    with pytest.raises(ArgumentOrderError, match=r"inference\(model_id, prompt\) is the old order: swap the two"):
        inference("demo", "Say hello", base_url=NOWHERE)
    with pytest.raises(ArgumentOrderError) as caught:  # a prompt with spaces in the model's place: no hint to swap
        inference("Say it", "Say hello", base_url=NOWHERE)
    assert "swap" not in str(caught.value)
