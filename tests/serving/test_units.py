"""The serving layer's pure parts: engine sizing from bytes, vLLM flags from a spec, and the
OpenAI router's own answers (auth, unknown model, bad body, overload, loading) and request
metrics over ASGI."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from vram_scheduler.core.config import GIB, ModelSpec, ServingSettings
from vram_scheduler.core.contract import EndpointTable, ReplicaEndpoint, RoutedModel
from vram_scheduler.core.errors import wake_failure
from vram_scheduler.serving.endpoint_board import EXPIRE_AFTER_S, Board
from vram_scheduler.serving.replica.engine_args import server_argv
from vram_scheduler.serving.replica.failures import engine_cause, engine_errors
from vram_scheduler.serving.replica.mps import client_env, daemon_running, node_pipe_dir
from vram_scheduler.serving.replica.pinning import gpu_present, is_cuda_uuid, pin_process
from vram_scheduler.serving.replica.sizing import CPU_RUNTIME_BYTES, BudgetTooSmall, size_engine
from vram_scheduler.serving.replica.vllm_compat import UnsupportedVLLM, check_version, installed_version
from vram_scheduler.serving.router.metrics import BROKEN_STATUS, NO_MODEL, UNKNOWN_MODEL, RequestMetrics
from vram_scheduler.serving.router.router import OpenAIRouter, Registry

# -- sizing ----------------------------------------------------------------------------------------


def test_cuda_budget_is_a_share_of_the_gpu_total_and_the_cap_is_the_reservation() -> None:
    budget = size_engine("m", 20 * GIB, "cuda", 80 * GIB, weight_bytes=3 * GIB, overhead_bytes=2 * GIB)
    assert budget.gpu_memory_utilization == pytest.approx(0.25)
    assert budget.cap_bytes == 22 * GIB
    assert budget.engine_kwargs() == {"gpu_memory_utilization": 0.25}


def test_cuda_share_never_rounds_above_the_budget() -> None:
    total = 143771 * 2**20  # an H200
    budget = size_engine("m", 14 * GIB, "cuda", total)
    assert budget.gpu_memory_utilization is not None
    assert budget.gpu_memory_utilization * total <= 14 * GIB
    assert budget.gpu_memory_utilization * total > 14 * GIB - total / 10_000


def test_mps_client_env_caps_the_reserved_gpu_by_uuid() -> None:
    env = client_env("/tmp/pipe", "GPU-1234", 22 * GIB + 5)
    assert env == {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/pipe", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "GPU-1234=22528M"}


def test_mps_is_not_running_without_its_control_socket(tmp_path: Path) -> None:
    assert not daemon_running(tmp_path)
    assert node_pipe_dir() is None or daemon_running(node_pipe_dir() or "")


def test_mps_control_socket_left_by_a_daemon_that_quit_is_not_a_running_daemon(tmp_path: Path) -> None:
    import os
    import socket

    with socket.socket(socket.AF_UNIX) as control:
        control.bind(str(tmp_path / "control"))
        pid_file = tmp_path / "nvidia-cuda-mps-control.pid"
        assert not daemon_running(tmp_path)  # no pid file
        pid_file.write_text(f"{os.getpid()}\n")
        assert daemon_running(tmp_path)
        gone = subprocess.Popen(["true"])
        gone.wait()
        pid_file.write_text(f"{gone.pid}\n")
        assert not daemon_running(tmp_path)


@pytest.mark.parametrize("version", ["0.26.0", "0.32.0", "0.32.0+cpu", "0.29.1"])
def test_supported_vllm_versions(version: str) -> None:
    check_version(version)


@pytest.mark.parametrize("version", ["0.25.2", "0.33.0", "1.0.0"])
def test_unsupported_vllm_version_names_the_range(version: str) -> None:
    with pytest.raises(UnsupportedVLLM) as error:
        check_version(version)
    assert version in str(error.value) and ">=0.26.0,<0.33.0" in str(error.value)


def test_installed_vllm_is_supported() -> None:
    assert installed_version() >= check_version("0.26.0")


def test_cpu_budget_sizes_the_kv_cache_in_bytes() -> None:
    budget = size_engine("m", 2 * GIB, "cpu", 24 * GIB, weight_bytes=100 * 2**20)
    assert budget.kv_cache_memory_bytes == 2 * GIB - 100 * 2**20 - CPU_RUNTIME_BYTES
    assert budget.engine_kwargs() == {"kv_cache_memory_bytes": budget.kv_cache_memory_bytes}


@pytest.mark.parametrize(
    ("device", "budget", "weights", "words"),
    [
        ("cpu", GIB, 0, ["model m", "budget 1.00 GiB", "short by", "raise vram_gb"]),
        ("cuda", 4 * GIB, 5 * GIB, ["weights 5.00 GiB", "short by"]),
        ("cuda", 90 * GIB, 0, ["exceeds the device's total 80.00 GiB"]),
    ],
)
def test_budget_too_small_names_the_numbers(device: str, budget: int, weights: int, words: list[str]) -> None:
    with pytest.raises(BudgetTooSmall) as error:
        size_engine("m", budget, device, 80 * GIB, weights)  # type: ignore[arg-type]
    for word in words:
        assert word in str(error.value)


# -- vLLM flags ------------------------------------------------------------------------------------


def test_server_argv_carries_spec_budget_and_engine_kwargs() -> None:
    spec = ModelSpec(
        model_id="m",
        model="demo",
        vram_gb=2,
        router_name="alias",
        max_model_len=512,
        max_tokens=33,
        engine_kwargs={"enforce_eager": True, "enable_prefix_caching": False, "structured_outputs_config": {"a": 1}},
    )
    argv = server_argv(spec, "/models/m", size_engine("m", spec.vram_bytes, "cpu", 24 * GIB))
    joined = " ".join(argv)
    assert "--model /models/m" in joined and "--served-model-name m alias" in joined
    assert "--max-model-len 512" in joined and "max_new_tokens" not in joined
    assert "--kv-cache-memory-bytes" in joined and "--gpu-memory-utilization" not in joined
    assert "--enforce-eager" in argv and "--no-enable-prefix-caching" in argv
    assert '--structured-outputs-config {"a": 1}' in joined
    assert "--disable-log-stats" not in argv  # engine metrics on by default
    quiet = server_argv(spec, "/models/m", size_engine("m", spec.vram_bytes, "cpu", 24 * GIB), engine_metrics=False)
    assert "--disable-log-stats" in quiet


# -- pinning ---------------------------------------------------------------------------------------


def test_declared_gpu_missing_here_runs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert is_cuda_uuid("GPU-5e5e0000-0000-0000-0000-000000000000") and not is_cuda_uuid("host-node")
    if gpu_present("GPU-5e5e0000-0000-0000-0000-000000000000"):
        pytest.skip("a GPU with this uuid exists here")
    assert pin_process("GPU-5e5e0000-0000-0000-0000-000000000000") == "cpu"
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


# -- router ----------------------------------------------------------------------------------------


def endpoint(replica_id: str, names: list[str], limit: int = 2) -> ReplicaEndpoint:
    return ReplicaEndpoint(
        replica_id=replica_id,
        model_id=names[0],
        names=names,
        url="http://127.0.0.1:9",
        max_ongoing_requests=limit,
        node="n",
        gpu_uuid="GPU-x",
        gpu_index=0,
        bytes=GIB,
        pids=[1],
        max_tokens=7,
    )


def table(version: int, *endpoints: ReplicaEndpoint, models: tuple[RoutedModel, ...] = ()) -> EndpointTable:
    return EndpointTable(version=version, models=list(models), endpoints=list(endpoints))


def test_registry_picks_least_busy_and_keeps_counts_across_tables() -> None:
    registry = Registry()
    registry.sync(table(1, endpoint("a-0", ["a"]), endpoint("a-1", ["a"])))
    first = registry.pick("a", set())
    assert first is not None
    first.inflight = 1
    second = registry.pick("a", set())
    assert second is not None and second is not first
    second.inflight = 2
    first.inflight = 2
    assert registry.pick("a", set()) is None  # both at their limit
    moved = endpoint("a-1", ["a"]).model_copy(update={"url": "http://127.0.0.1:10"})
    registry.sync(table(2, endpoint("a-0", ["a"]), moved))  # a-1 restarted elsewhere: a new entry
    kept = registry.replicas["a-0"]
    assert kept in (first, second) and kept.inflight == 2  # same replica, same URL: its counts stay
    assert registry.replicas["a-1"].inflight == 0
    registry.sync(table(3, moved))
    assert list(registry.replicas) == ["a-1"]


def test_sleeping_replicas_are_not_routed_to_but_woken_asleep_before_stopped() -> None:
    registry = Registry()
    asleep = endpoint("a-1", ["a", "alias"]).model_copy(update={"state": "asleep", "url": ""})
    stopped = endpoint("a-0", ["a", "alias"]).model_copy(update={"state": "stopped", "url": ""})
    registry.sync(table(1, stopped, asleep, endpoint("b-0", ["b"])))
    assert list(registry.replicas) == ["b-0"] and registry.pick("a", set()) is None
    assert [e.replica_id for e in registry.sleepers("alias")] == ["a-1", "a-0"]  # asleep wakes faster
    assert registry.answering() == ["a", "alias", "b"]  # a request wakes them: listed in /v1/models
    registry.sync(table(2, stopped, asleep.model_copy(update={"state": "awake", "url": "http://127.0.0.1:9"})))
    assert list(registry.replicas) == ["a-1"] and [e.replica_id for e in registry.sleepers("a")] == ["a-0"]


def test_a_failed_wake_is_told_in_the_replicas_own_words() -> None:
    error = RuntimeError(
        "ray::ServeReplica:model-b:b-0.handle_request()\n  File x\nvram_scheduler.serving.replica.ReplicaWakeError: "
        "replica b-0 of model b: cannot wake: no room\n"
    )
    assert wake_failure(error) == "replica b-0 of model b: cannot wake: no room"
    assert wake_failure(TimeoutError()) == "TimeoutError"


def test_the_endpoint_board_changes_its_version_only_on_a_change() -> None:
    board = Board()
    assert board.register(endpoint("a-0", ["a"]), now=0) and board.version == 1
    assert not board.register(endpoint("a-0", ["a"]), now=1) and board.version == 1  # a heartbeat
    assert board.register(endpoint("a-1", ["a"]), now=EXPIRE_AFTER_S) and board.version == 2
    models = [RoutedModel(model_id="a", names=["a", "b"], max_tokens=7)]
    assert board.declare(models) and not board.declare(models) and board.version == 3
    assert board.expire(EXPIRE_AFTER_S + 2) == ["a-0"] and board.version == 4  # silent since 1
    assert not board.unregister("a-0") and board.unregister("a-1") and board.version == 5
    board.register(endpoint("a-2", ["a"]), now=0)
    stored = board.table()
    reloaded = Board.load(EndpointTable.model_validate_json(stored.model_dump_json()), now=100)
    assert reloaded.table() == stored and reloaded.version == 6  # a restarted board goes on counting
    assert reloaded.expire(100 + EXPIRE_AFTER_S) == []  # reloaded endpoints count as just heard from


def call(router: OpenAIRouter, method: str, path: str, **kwargs: object) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=router)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            return await client.request(method, path, **kwargs)  # type: ignore[arg-type]

    return asyncio.run(go())


def test_router_answers_for_itself() -> None:
    router = OpenAIRouter(ServingSettings(host="127.0.0.1", api_key_env=None, max_queued_requests=0))
    models = (
        RoutedModel(model_id="a", names=["a", "b"], max_tokens=7),
        RoutedModel(model_id="c", names=["c"], max_tokens=7),
    )
    router.registry.sync(table(1, endpoint("a-0", ["a", "b"], limit=1), models=models))
    assert call(router, "GET", "/healthz").status_code == 200
    # Only models that can answer are listed: c is declared, with no replica registered.
    assert [m["id"] for m in call(router, "GET", "/v1/models").json()["data"]] == ["a", "b"]
    unknown = call(router, "POST", "/v1/completions", json={"model": "zzz", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotFoundError"
    not_json = call(router, "POST", "/v1/completions", content=b"[1,")
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == 400
    no_model = call(router, "POST", "/v1/completions", json={"prompt": "x"})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    loading = call(router, "POST", "/v1/completions", json={"model": "c", "prompt": "x"})
    assert loading.status_code == 503 and loading.headers["retry-after"] == "5"
    router.registry.replicas["a-0"].inflight = 1
    busy = call(router, "POST", "/v1/chat/completions", json={"model": "b", "messages": []})
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert "capacity" in busy.json()["error"]["message"]
    assert "the queue is full (0 of 0 waiting, serving.max_queued_requests)" in busy.json()["error"]["message"]
    router.registry.replicas["a-0"].inflight = 0
    dead = call(router, "POST", "/v1/completions", json={"model": "a", "prompt": "x"})
    assert dead.status_code == 503  # port 9 refuses: the replica is dropped, none is left
    assert "a-0" not in router.registry.replicas


def test_router_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_RAY_VRAM_KEY", "s3cret")
    router = OpenAIRouter(ServingSettings(api_key_env="TEST_RAY_VRAM_KEY"))
    assert call(router, "GET", "/v1/models").status_code == 401
    assert call(router, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert call(router, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert call(router, "GET", "/healthz").status_code == 200


class Recorded:
    """Stands in for one of Ray's metrics: keeps each (value, tags) the router records."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append((value, tags))

    observe = inc


def recording_metrics() -> RequestMetrics:
    metrics = RequestMetrics("OpenAIRouter-1")
    metrics.requests, metrics.duration, metrics.first_byte = Recorded(), Recorded(), Recorded()  # type: ignore[assignment]
    return metrics


def counted(metrics: RequestMetrics) -> dict[tuple[str, str, str], float]:
    metrics.flush()
    calls = metrics.requests.calls  # type: ignore[attr-defined]
    assert {tags["router"] for _, tags in calls} <= {"OpenAIRouter-1"}
    return {(tags["model_id"], tags["route"], tags["code"]): value for value, tags in calls}


def timed(histogram: object) -> list[tuple[str, str]]:
    return [(tags["model_id"], tags["route"]) for _, tags in histogram.calls]  # type: ignore[attr-defined]


def test_router_counts_its_own_answers_under_bounded_labels() -> None:
    """Refusals are counted by model_id (an alias counts as its model), route and code; names no
    model has share one bucket; only a request sent on to a replica is timed; health checks are
    not counted."""
    metrics = recording_metrics()
    router = OpenAIRouter(ServingSettings(host="127.0.0.1", api_key_env=None), metrics=metrics)
    models = (
        RoutedModel(model_id="a", names=["a", "alias"], max_tokens=7),
        RoutedModel(model_id="c", names=["c"], max_tokens=7),
    )
    router.registry.sync(table(1, endpoint("a-0", ["a", "alias"]), models=models))
    for i in range(3):
        assert call(router, "POST", "/v1/completions", json={"model": f"typo-{i}", "prompt": "x"}).status_code == 404
    assert call(router, "POST", "/v1/completions", content=b"[1,").status_code == 400
    assert call(router, "GET", "/v1/models").status_code == 200
    assert call(router, "GET", "/v1/models/alias").status_code == 200
    assert call(router, "POST", "/v1/chat/completions", json={"model": "c", "messages": []}).status_code == 503
    assert call(router, "POST", "/v1/any/path", json={"model": "alias"}).status_code == 404  # no such route
    assert call(router, "POST", "/v1/chat/completions", json={"model": "alias"}).status_code == 503  # unreachable
    assert call(router, "GET", "/healthz").status_code == 200
    assert counted(metrics) == {
        (UNKNOWN_MODEL, "completions", "404"): 3,
        (NO_MODEL, "completions", "400"): 1,
        (NO_MODEL, "models", "200"): 1,
        ("a", "models", "200"): 1,
        ("c", "chat", "503"): 1,
        (NO_MODEL, "other", "404"): 1,
        ("a", "chat", "503"): 1,
    }
    assert timed(metrics.duration) == [("a", "chat")] and timed(metrics.first_byte) == []


def test_router_times_what_replicas_answer() -> None:
    """A replica's answer, streamed or not, is counted with its status and timed to its end; a
    stream also to its first body byte; a stream its replica breaks counts as BROKEN_STATUS."""
    from aiohttp import web

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"choices": []})
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(0.05)
        await response.write(b"data: {}\n\n")
        if body.get("break"):  # the replica dies mid-answer
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    metrics = recording_metrics()
    router = OpenAIRouter(ServingSettings(host="127.0.0.1", api_key_env=None), metrics=metrics)

    async def go() -> list[httpx.Response]:
        app = web.Application()
        app.router.add_post("/v1/completions", complete)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        router.registry.sync(table(1, endpoint("a-0", ["a"]).model_copy(update={"url": url})))
        try:
            transport = httpx.ASGITransport(app=router)
            async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
                request = {"model": "a", "prompt": "x"}
                return [
                    await client.post("/v1/completions", json=request),
                    await client.post("/v1/completions", json=request | {"stream": True}),
                    await client.post("/v1/completions", json=request | {"stream": True, "break": True}),
                ]
        finally:
            await router.close()
            await runner.cleanup()

    plain, streamed, broken = asyncio.run(go())
    assert plain.status_code == streamed.status_code == broken.status_code == 200
    assert streamed.text.endswith("[DONE]\n\n") and '"code":502' in broken.text
    assert counted(metrics) == {("a", "completions", "200"): 2, ("a", "completions", str(BROKEN_STATUS)): 1}
    assert timed(metrics.duration) == [("a", "completions")] * 3
    assert timed(metrics.first_byte) == [("a", "completions")] * 2  # the streams only
    whole = [seconds for seconds, _ in metrics.duration.calls]  # type: ignore[attr-defined]
    first = [seconds for seconds, _ in metrics.first_byte.calls]  # type: ignore[attr-defined]
    assert all(0.05 <= f <= w for f, w in zip(first, whole[1:], strict=True))


# -- an engine process's own error lines ------------------------------------------------------------

ENGINE_LOG = """\
(EngineCore pid=3301) INFO 11-27 13:14:02 [gpu_worker.py:301] Available KV cache memory: 1.20 GiB
(EngineCore pid=3301) ERROR 11-27 13:14:05 [core.py:712] EngineCore failed to start.
(EngineCore pid=3301) ERROR 11-27 13:14:05 [core.py:712] Traceback (most recent call last):
(EngineCore pid=3301) ERROR [core.py:712] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 12.00 GiB.
(EngineCore pid=3301) ERROR [core.py:712] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 12.00 GiB.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}
"""


def test_engine_errors_finds_the_engine_processes_own_root_cause(tmp_path: Path) -> None:
    assert engine_errors(ENGINE_LOG) == ["OutOfMemoryError: CUDA out of memory. Tried to allocate 12.00 GiB."]
    log = tmp_path / "worker.err"
    log.write_text("an older failure: ValueError: not this one\n")
    mark = (str(log), log.stat().st_size)
    with log.open("a") as out:
        out.write(ENGINE_LOG)
    assert engine_cause(mark) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 12.00 GiB."
    assert engine_cause(None) == "" and engine_cause((str(tmp_path / "gone"), 0)) == ""


# -- the controller's status ---------------------------------------------------------------------


def test_a_model_without_a_ready_replica_gets_a_503_saying_which_case_holds() -> None:
    """pending (why, since when; no Retry-After: waiting alone does not make room), loading (Retry-After),
    failed (the last error; no Retry-After); an undeclared model is still a 404."""
    from vram_scheduler.core.contract import ModelAvailability

    router = OpenAIRouter(ServingSettings(host="127.0.0.1", api_key_env=None))
    reason = "1 replica of model p needs 7.00 GiB per replica; the largest free slot is 2.00 GiB on node n, GPU 0"
    since = time.time() - 90
    models = (
        RoutedModel(
            model_id="p",
            names=["p", "p-alias"],
            max_tokens=7,
            availability=ModelAvailability(state="pending", detail=reason, since=since),
        ),
        RoutedModel(model_id="l", names=["l"], max_tokens=7, availability=ModelAvailability(state="loading")),
        RoutedModel(
            model_id="f", names=["f"], max_tokens=7, availability=ModelAvailability(state="failed", detail="f-0: OOM")
        ),
    )
    router.registry.sync(table(1, models=models))
    assert call(router, "GET", "/v1/models").json()["data"] == []
    for name in ("p", "p-alias"):
        pending = call(router, "POST", "/v1/chat/completions", json={"model": name, "messages": []})
        assert pending.status_code == 503 and "retry-after" not in pending.headers
        message = pending.json()["error"]["message"]
        assert message.startswith(f"model {name} is pending: no replica is placed since ")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
        assert f"since {stamp} (" in message and message.endswith(
            f"s): {reason}; it is placed when room appears (see GET /v1/deployments on the controller)"
        ), message
    card = call(router, "GET", "/v1/models/p")  # declared, cannot answer: the same 503, not a card
    assert card.status_code == 503 and reason in card.json()["error"]["message"]
    loading = call(router, "POST", "/v1/completions", json={"model": "l", "prompt": "x"})
    assert loading.status_code == 503 and loading.headers["retry-after"] == "5"
    assert "a replica is loading" in loading.json()["error"]["message"]
    failed = call(router, "POST", "/v1/completions", json={"model": "f", "prompt": "x"})
    assert failed.status_code == 503 and "retry-after" not in failed.headers
    assert failed.json()["error"]["message"] == "model f has no ready replica: it failed: f-0: OOM"
    assert call(router, "POST", "/v1/completions", json={"model": "zzz", "prompt": "x"}).status_code == 404


def test_controller_status_carries_the_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server writes the same `ModelStatus` the SDK reads: `router_name` included."""
    from types import SimpleNamespace

    from vram_scheduler.core.planner import Reservation
    from vram_scheduler.serving.controller import controller as ctl

    spec = ModelSpec(model_id="beta", model="x", vram_gb=1, router_name="beta-alias")
    where = {"node": "n", "gpu_uuid": "GPU-0", "gpu_index": 0, "bytes": GIB}
    record = ctl.Deployed(spec=spec, reservations=[Reservation(replica_id="beta-0", model_id="beta", **where)])
    monkeypatch.setattr(ctl.Controller, "deployed", staticmethod(lambda: {"beta": record}))
    monkeypatch.setattr(ctl.serve, "status", lambda: SimpleNamespace(applications={}))
    controller = object.__new__(ctl.Controller)
    controller.serving = ServingSettings()
    controller.endpoint_host = None
    controller.allocator = SimpleNamespace(reservations=lambda: [])
    (status,) = controller.status().models
    assert (status.model_id, status.router_name, status.replicas[0].state) == ("beta", "beta-alias", "reserved")


def test_controller_status_lists_pending_replicas_and_routers_hear_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record's pending replicas take the lowest numbers its reservations leave (those the planner
    gives them once placed), each with the reason and since when; a model with none placed is
    pending to the routers, one with a replica starting is loading."""
    from types import SimpleNamespace

    from vram_scheduler.core.contract import DeploymentList
    from vram_scheduler.core.planner import Reservation
    from vram_scheduler.serving.controller import controller as ctl

    where = {"node": "n", "gpu_uuid": "GPU-0", "gpu_index": 0, "bytes": GIB}
    some = ctl.Deployed(
        spec=ModelSpec(model_id="some", model="x", vram_gb=1, replicas=3),
        reservations=[Reservation(replica_id="some-1", model_id="some", **where)],
        pending=ctl.Pending(count=2, reason="no room for some", since=100.0),
    )
    none = ctl.Deployed(
        spec=ModelSpec(model_id="none", model="x", vram_gb=1),
        reservations=[],
        pending=ctl.Pending(count=1, reason="bigger GPU needed", too_big=True, since=200.0),
    )
    monkeypatch.setattr(ctl.Controller, "deployed", staticmethod(lambda: {"some": some, "none": none}))
    monkeypatch.setattr(ctl.serve, "status", lambda: SimpleNamespace(applications={}))
    controller = object.__new__(ctl.Controller)
    controller.serving = ServingSettings()
    controller.endpoint_host = None
    controller.allocator = SimpleNamespace(reservations=lambda: [])
    models = {m.model_id: m for m in controller.status().models}
    assert [(r.replica_id, r.state, r.reason, r.since) for r in models["some"].replicas] == [
        ("some-1", "reserved", None, None),
        ("some-0", "pending", "no room for some", 100.0),
        ("some-2", "pending", "no room for some", 100.0),
    ]
    assert models["some"].unplaced == ["no room for some"] and not models["some"].answers
    assert [(r.replica_id, r.state, r.where) for r in models["none"].replicas] == [("none-0", "pending", "not placed")]
    told = ctl.availability(DeploymentList(models=list(models.values())))
    assert (told["some"].state, told["none"].state) == ("loading", "pending")
    assert (told["none"].detail, told["none"].since) == ("bigger GPU needed", 200.0)


def test_the_routers_are_one_deployment_each_pinned_to_its_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller deploys the router application (the one deploy path: no Serve application is
    built from values by path): one deployment per router, each pinned to its node."""
    from vram_scheduler.serving import app

    monkeypatch.setattr(app, "router_addresses", lambda serving: ["10.0.0.1", "10.0.0.2"])
    separate = app.router_application(ServingSettings())
    keys = ("health_check_period_s", "logging_config", "max_ongoing_requests", "num_replicas")

    def routers(application: object) -> list[dict]:
        ingress = application._bound_deployment  # type: ignore[attr-defined]
        others = [a._bound_deployment for a in ingress.init_args[1:]]
        return [
            {k: getattr(d._deployment_config, k) for k in keys} | {"name": d.name, "actor": d.ray_actor_options}
            for d in [ingress, *others]
        ]

    assert not [name for name in vars(app) if name.startswith("build_")]
    first, second = routers(separate)
    assert (first["name"], second["name"]) == ("OpenAIRouter", "OpenAIRouter-1")
    assert first["health_check_period_s"] == 5 and first["num_replicas"] == 1
    assert first["actor"]["resources"] == {"node:10.0.0.1": 0.001}
    assert second["actor"]["resources"] == {"node:10.0.0.2": 0.001}
    on_head = routers(app.router_application(ServingSettings(router_placement="head"), [None, None, None]))
    assert [r["actor"]["resources"] for r in on_head] == [{"node:__internal_head__": 0.001}] * 3


def test_routers_go_one_per_node_and_leave_a_node_that_left(monkeypatch: pytest.MonkeyPatch) -> None:
    from vram_scheduler.serving.replica import placement

    nodes = [
        {"Alive": True, "NodeManagerAddress": "10.0.0.9", "Resources": {"node:__internal_head__": 1.0}},
        {"Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {}},
        {"Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {}},
    ]
    monkeypatch.setattr(placement.ray, "nodes", lambda: nodes)
    spread = ServingSettings(router_replicas=3)
    assert placement.router_addresses(spread) == ["10.0.0.9", "10.0.0.2", "10.0.0.9"]  # the head first
    assert placement.router_addresses(spread, ["10.0.0.2", "10.0.0.3", "10.0.0.2"]) == [
        "10.0.0.2",
        "10.0.0.9",  # its node left
        "10.0.0.2",
    ]
    assert placement.router_addresses(spread, ["10.0.0.2", "10.0.0.2", "10.0.0.2"]) == [
        "10.0.0.2",
        "10.0.0.2",
        "10.0.0.9",  # two routers fewer on the head than on 10.0.0.2: one moves
    ]
    nodes[1]["Alive"] = False
    assert placement.router_addresses(ServingSettings(), ["10.0.0.9", "10.0.0.2"]) == ["10.0.0.9", "10.0.0.9"]
    assert placement.router_addresses(ServingSettings(router_placement="head")) == [None, None]


def test_routers_go_only_to_router_hosts_and_to_each_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes labelled `ray-vram.io/router-host=true` (the pods the chart's Service reaches) take
    every router, each at least one: max(router_replicas, hosts) routers."""
    from vram_scheduler.serving.replica import placement

    host = {"ray-vram.io/router-host": "true"}
    nodes = [
        {"Alive": True, "NodeManagerAddress": "10.0.0.9", "Resources": {"node:__internal_head__": 1.0}, "Labels": host},
        {"Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {}, "Labels": host},
        {"Alive": True, "NodeManagerAddress": "10.0.0.3", "Resources": {}, "Labels": host},
        {"Alive": True, "NodeManagerAddress": "10.0.0.5", "Resources": {}, "Labels": {}},  # a GPU pod
    ]
    monkeypatch.setattr(placement.ray, "nodes", lambda: nodes)
    assert placement.router_addresses(ServingSettings()) == ["10.0.0.9", "10.0.0.2", "10.0.0.3"]
    assert placement.router_addresses(ServingSettings(router_replicas=4)) == [
        "10.0.0.9",
        "10.0.0.2",
        "10.0.0.3",
        "10.0.0.9",
    ]
    # A CPU pod joined while both routers were on the head: one moves there, and the new pod gets one.
    moved = placement.router_addresses(ServingSettings(), ["10.0.0.9", "10.0.0.9"])
    assert moved[0] == "10.0.0.9" and sorted(moved) == ["10.0.0.2", "10.0.0.3", "10.0.0.9"]
    nodes[1]["Alive"] = nodes[2]["Alive"] = False
    assert placement.router_addresses(ServingSettings(), ["10.0.0.2", "10.0.0.3"]) == ["10.0.0.9", "10.0.0.9"]


def test_a_replica_deployment_built_the_same_keeps_its_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller moves one replica of a model by deploying the model again: only a deployment
    whose version changed restarts (the faults suite checks Serve keeps the others running)."""
    from vram_scheduler.core.planner import Reservation
    from vram_scheduler.serving.replica import placement
    from vram_scheduler.serving.replica.replica import replica_deployment

    monkeypatch.setattr(placement, "ray_node_address", lambda node: None)  # a declared node, not a Ray one

    spec = ModelSpec(model_id="a", model="x", vram_gb=1)
    where = {"model_id": "a", "node": "n", "gpu_uuid": "GPU-0", "gpu_index": 0, "bytes": GIB}
    reservation = Reservation(replica_id="a-0", **where)

    def version(r: Reservation) -> str:
        return replica_deployment(spec, r, ServingSettings(), {})._bound_deployment.version

    assert version(reservation) == version(reservation.model_copy())
    assert version(reservation) != version(reservation.model_copy(update={"gpu_uuid": "GPU-1", "gpu_index": 1}))


def test_a_serve_config_race_is_retried_and_other_errors_are_not() -> None:
    from vram_scheduler.serving.controller.controller import serve_race_retried

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ValueError("<module 'ray.serve._private.request_router'> is not registered for pickle by value")
        return "app"

    assert serve_race_retried(flaky) == "app" and len(calls) == 3

    def broken() -> str:
        raise ValueError("num_replicas must be positive")

    with pytest.raises(ValueError, match="num_replicas"):
        serve_race_retried(broken)


def test_a_request_beyond_capacity_waits_in_the_queue_then_gets_429() -> None:
    """At max_ongoing_requests a request queues; it is refused with 429 and Retry-After when the
    queue is full (at once) or when no slot frees within max_queue_wait_s."""
    registry = Registry()
    registry.sync(table(1, endpoint("a-0", ["a"], limit=1)))
    registry.replicas["a-0"].inflight = 1

    async def scenario() -> tuple[object, object, object]:
        first = asyncio.ensure_future(registry.wait("a", set(), max_queued=1, max_wait_s=30))
        await asyncio.sleep(0.05)
        assert registry.queued("a") == 1
        full = await registry.wait("a", set(), max_queued=1, max_wait_s=30)  # the queue is full: at once
        registry.replicas["a-0"].inflight = 0  # a slot frees: the queued request takes it
        got = await first
        assert registry.queued("a") == 0
        registry.replicas["a-0"].inflight = 1
        late = await registry.wait("a", set(), max_queued=1, max_wait_s=0.05)  # no slot in time
        return full, got, late

    full, got, late = asyncio.run(scenario())
    assert full is None and got is registry.replicas["a-0"] and late is None
    router = OpenAIRouter(ServingSettings(host="127.0.0.1", api_key_env=None, max_queue_wait_s=0.05))
    router.registry.sync(table(1, endpoint("a-0", ["a"], limit=1)))
    router.registry.replicas["a-0"].inflight = 1
    busy = call(router, "POST", "/v1/completions", json={"model": "a", "prompt": "x"})
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert "no room within 0.05s in the queue (serving.max_queue_wait_s)" in busy.json()["error"]["message"]


def test_secrets_never_go_into_a_replicas_runtime_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime env is stored in the GCS in plain text: replicas inherit secrets from their node."""
    from vram_scheduler.core.replica_env import replica_env, without_secrets

    secrets = {
        "RAY_VRAM_API_KEY": "k1",
        "RAY_VRAM_INTERNAL_KEY": "k2",
        "RAY_VRAM_CONTROLLER_TOKEN": "k3",
        "HF_TOKEN": "k4",
        "HUGGING_FACE_HUB_TOKEN": "k5",
        "VLLM_API_KEY": "k6",
        "RAY_VRAM_S3_SECRET": "k7",
    }
    kept = {"HF_HOME": "/cache/hf", "VLLM_MAX_TOKENS_PER_EXPERT": "4", "RAY_AUTH_TOKEN_PATH": "/t", "RAY_VRAM_X": "1"}
    for name, value in (secrets | kept).items():
        monkeypatch.setenv(name, value)
    env = replica_env()
    assert not set(secrets) & set(env) and kept.items() <= env.items()
    serving = ServingSettings(api_key_env="RAY_VRAM_X")  # whatever variable holds the API key
    assert "RAY_VRAM_X" not in without_secrets(env, serving)


def test_a_pending_reason_is_written_again_only_when_the_room_changed_materially() -> None:
    """Host memory drifts by megabytes between polls: the stored reason (a GCS write and a new board
    version each time) follows only a change of count, kind, place or ≥ 256 MiB of free room."""
    from vram_scheduler.core.planner import Unplaced
    from vram_scheduler.serving.controller.controller import REASON_REFRESH_BYTES, _pending, _room_changed

    def unplaced(free: int, where: str = "node n, GPU 0", count: int = 1) -> Unplaced:
        return Unplaced(
            model_id="m", count=count, need_bytes=8 << 30, largest_free_bytes=free, largest_free_gpu=where, reason="r"
        )

    stored = _pending(unplaced(3 << 30), None)
    assert stored is not None
    assert not _room_changed(stored, unplaced((3 << 30) + REASON_REFRESH_BYTES - 1))
    assert _room_changed(stored, unplaced((3 << 30) + REASON_REFRESH_BYTES))
    assert _room_changed(stored, unplaced(3 << 30, where="node n, GPU 1"))
    assert _room_changed(stored, unplaced(3 << 30, count=2))
    assert _pending(unplaced(1 << 30), stored).since == stored.since  # still pending since the first time


def test_a_failed_look_at_the_engine_is_logged_once_and_never_ends_the_heartbeat() -> None:
    """The heartbeat also announces the replica to the routers: when counting the engine's requests
    failed (vLLM 0.26's AsyncLLM lacks the call 0.32 has), the heartbeat task died and ready replicas
    were never routed. Now each kind of failure is logged once and the heartbeat goes on."""
    from vram_scheduler.serving.replica import replica
    from vram_scheduler.serving.replica.replica import VLLMReplica

    class Watcher:
        _watch_use_logged = VLLMReplica._watch_use_logged

        def __init__(self) -> None:
            self.replica_id, self.looks = "m-0", 0
            self._watch_failures: set[str] = set()

        async def _watch_use(self) -> None:
            self.looks += 1
            raise AttributeError("'AsyncLLM' object has no attribute 'get_num_unfinished_requests'")

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    replica.log.addHandler(handler)  # Serve's logger: it does not reach pytest's capture
    try:
        watcher = Watcher()
        for _ in range(3):
            asyncio.run(watcher._watch_use_logged())
    finally:
        replica.log.removeHandler(handler)
    assert watcher.looks == 3
    logged = [r for r in records if "tracking its requests failed" in r.getMessage()]
    assert len(logged) == 1 and "m-0" in logged[0].getMessage() and "AttributeError" in logged[0].getMessage()
