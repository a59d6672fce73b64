"""One model replica: a Ray Serve deployment that owns a vLLM engine inside its reservation.

Start-up order is the product's promise: reserve on the planned GPU (fail fast with the
allocator's reason) → pin the process to that GPU → size vLLM from the reservation's bytes and
cap the engine at the reservation (MPS, see `mps`) → take the GPU's startup lock → load vLLM →
release the lock → report its processes to the ledger → start vLLM's own OpenAI HTTP layer on
this node, answering only requests that carry the cluster's internal key (`internal_key`: the
router adds it; a node without one fails the replica before anything is reserved) → announce
itself on the endpoint board, which every router replica follows. On shutdown or on any failure
along the way, everything taken is given back.

This actor process never creates a CUDA context: vLLM's engine runs in its own EngineCore
process (V1 multiprocessing), which inherits the pinning and the cap from this process's
environment.

The engine is vLLM's `AsyncLLM`; requests are served by vLLM's own OpenAI serving classes (the
FastAPI app `vllm serve` builds) on a port of this replica's node, which the router calls
directly: one HTTP hop from router to engine, no Ray object transfer per request (measured in
bench/serving; see docs/benchmarks.md "Serving path on CPU").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from typing import Any

import ray
from ray import serve

from ...allocator.actor import AsyncAllocatorClient
from ...core.config import ModelSpec, ServingSettings, format_gib
from ...core.contract import (
    BUSY_REPORT_INTERVAL_S,
    Eviction,
    MediaAccepts,
    ReplicaEndpoint,
    Reservation,
    WakeOutcome,
    WakeReport,
)
from ...core.errors import RayVramError, ReplicaWakeError
from ...core.model_limits import checkpoint_bytes, local_config
from ..internal_key import InternalKeyGuard, InternalKeyMissing, internal_key
from ..options import deployment_options, keep_if_unchanged
from ..router.http_limits import server_config
from ..router.router import replicas_board
from .engine_args import parse_server_args, server_argv
from .engine_processes import engine_processes, wait_gone
from .failures import ENGINE_DIED, checked_spec, engine_cause, root_cause, stderr_position
from .in_flight import RequestsInFlight
from .loop_thread import LoopThread
from .media_budget import media_need
from .mps import PIPE_DIR_ENV, client_env, node_pipe_dir
from .pinning import pin_process, visible_device_total_bytes
from .sizing import EngineBudget, size_engine
from .sleep_metrics import SleepMetrics
from .vllm_compat import (
    build_openai_app,
    engine_sleep,
    engine_wake,
    init_openai_app_state,
    supported_modalities,
    unfinished_requests,
)

log = logging.getLogger("ray.serve")

#: How often a ready replica re-announces itself on the endpoint board (a restarted board relearns it).
HEARTBEAT_S = 2.0
#: How often the replica looks at its engine between announcements: a dead engine is withdrawn
#: from the routers within this, not at Serve's next health check (5 s period, 3 failures).
ENGINE_WATCH_S = 0.25
#: Address replicas serve HTTP on (default: the node's IP as Ray knows it); local mode sets 127.0.0.1.
REPLICA_HOST_ENV = "RAY_VRAM_REPLICA_HOST"
#: Longest a replica waits for its GPU's startup lock before giving up.
STARTUP_LOCK_TIMEOUT_S = 900.0
#: "0" turns the per-GPU startup lock off: only to reproduce the start-up race it prevents (vllm#55827).
STARTUP_LOCK_ENV = "RAY_VRAM_GPU_STARTUP_LOCK"
#: "1" refuses to start a GPU replica on a node without an MPS daemon (no hard cap) instead of warning.
REQUIRE_MPS_ENV = "RAY_VRAM_REQUIRE_MPS"
#: Longest a replica going to sleep waits for its engine's requests in flight to finish.
DRAIN_TIMEOUT_S = 60.0


class ReplicaStartupError(RayVramError, RuntimeError):
    """A replica could not start; the message says which step and why (shown in Serve status)."""


def _reason(error: BaseException) -> str:
    """The root cause's own message on one line (vLLM's or the allocator's), without Ray's traceback."""
    return root_cause(error)


def node_ip_address() -> str:
    """This Ray node's address as Ray knows it (127.0.0.1 for a loopback-only local cluster)."""
    node_id = ray.get_runtime_context().get_node_id()
    for info in ray.nodes():
        if info.get("NodeID") == node_id:
            return info["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


def _host_memory_total() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


class VLLMReplica:
    """Serve deployment body (wrapped with `serve.deployment` by `app.build_model_app`)."""

    async def __init__(self, spec: dict[str, Any], reservation: dict[str, Any], serving: dict[str, Any]):
        self.spec = ModelSpec.model_validate(spec)
        self.planned = Reservation.model_validate(reservation)
        self.serving = ServingSettings.model_validate(serving)
        self.replica_id = self.planned.replica_id
        self.engine: Any = None
        self.server: Any = None
        self.server_task: asyncio.Task[None] | None = None
        self.heartbeat_task: asyncio.Task[None] | None = None
        self.endpoint: ReplicaEndpoint | None = None
        self.requests: LoopThread | None = None
        self.allocator = AsyncAllocatorClient()
        self._reserved = False
        self._stderr_mark = stderr_position()
        # Sleep and wake (docs/operations.md "More models than VRAM"): the state the ledger holds it in, one
        # transition at a time, and when its engine last had requests.
        self.state = "awake"
        self._transition = asyncio.Lock()
        self._last_active = time.monotonic()
        self._reported_busy: tuple[bool, float] = (False, 0.0)
        self._watch_failures: set[str] = set()  # kinds of `_watch_use` failure logged already
        self._engine_sleep_level = 1  # the level its engine last slept at: level 2 reloads weights to wake
        self.sleep_metrics: SleepMetrics | None = None
        self.http_requests: RequestsInFlight | None = None
        started = time.monotonic()
        try:
            await self._start()
        except BaseException as error:
            engine = engine_processes()
            self._stop_engine()
            await asyncio.to_thread(wait_gone, engine)  # its memory is free before the reservation is
            await self._release()
            if isinstance(error, ReplicaStartupError):
                log.error("%s", error)
                raise
            reason = _reason(error)
            if ENGINE_DIED in reason:  # vLLM's engine process died: its own words are in our stderr
                reason = engine_cause(self._stderr_mark) or reason
            raise ReplicaStartupError(f"replica {self.replica_id}: start failed: {reason}") from error
        log.info("replica %s ready in %.1fs at %s", self.replica_id, time.monotonic() - started, self.endpoint)

    # -- start ------------------------------------------------------------------------------

    async def _start(self) -> None:
        try:
            self.key = internal_key(where=f"the node of replica {self.replica_id}")
        except InternalKeyMissing as error:  # never serve open: before anything is reserved
            raise ReplicaStartupError(f"replica {self.replica_id}: {error}") from None
        owner = ray.get_runtime_context().get_actor_id()
        model_source = self.spec.model
        self.spec = await asyncio.to_thread(checked_spec, self.spec, self.replica_id)  # before reserving
        try:
            self.reservation = await self.allocator.reserve(
                self.replica_id,
                self.spec.model_id,
                self.spec.vram_bytes,
                gpu_uuid=self.planned.gpu_uuid,
                owner=owner,
                overhead_bytes=self.planned.overhead_bytes,
                state=self.planned.state,
                sleep=self.planned.sleep,
            )
        except Exception as error:
            raise ReplicaStartupError(f"replica {self.replica_id}: no reservation: {_reason(error)}") from None
        self._reserved = True
        self.model_source = model_source
        if self.serving.engine_metrics:
            self.sleep_metrics = SleepMetrics(self.spec.model_id, self.replica_id)
            self.sleep_metrics.set_state(self.reservation.state)
        if self.reservation.state != "awake":  # placed beyond the room awake: its first request starts it
            self.state = self.reservation.state
            self.endpoint = self._sleeping_endpoint()
            self.heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat())
            return
        await self._boot()

    async def _boot(self) -> None:
        """Start the engine and its HTTP server inside the reservation, and announce them."""
        model_source = self.model_source
        gpu_uuid = self.reservation.gpu_uuid
        device = pin_process(gpu_uuid)
        total = visible_device_total_bytes() if device == "cuda" else _host_memory_total()
        # The overhead the ledger holds beside the budget is on the reservation: the engine's cap.
        overhead = (self.reservation.overhead_bytes or 0) if device == "cuda" else 0
        media = media_need(self.spec, await asyncio.to_thread(local_config, model_source))
        budget = size_engine(
            self.spec.model_id, self.spec.vram_bytes, device, total, checkpoint_bytes(model_source), overhead, media
        )
        log.info(
            "replica %s: %s on %s (%s), budget %s: %s",
            self.replica_id,
            self.spec.model_id,
            self.reservation.node,
            gpu_uuid,
            format_gib(budget.budget_bytes),
            budget.engine_kwargs(),
        )
        self.device, self.budget = device, budget
        if device == "cuda":
            # The engine in its own process: no CUDA context here, and the cap reaches it (`mps`).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
            self._cap_engine(gpu_uuid, budget)
        self.prepare(model_source, budget)
        use_lock = os.environ.get(STARTUP_LOCK_ENV, "1") != "0"
        if use_lock:
            locked = await self.allocator.acquire_startup_lock(gpu_uuid, self.replica_id, STARTUP_LOCK_TIMEOUT_S)
            if not locked:
                raise ReplicaStartupError(
                    f"replica {self.replica_id}: startup lock of GPU {gpu_uuid} not granted within "
                    f"{STARTUP_LOCK_TIMEOUT_S:g}s (another replica is still initialising there)"
                )
        try:
            await self.load()
        finally:
            if use_lock:
                await self.allocator.release_startup_lock(gpu_uuid, self.replica_id)
        pids = self._engine_pids()
        for pid in pids:
            await self.allocator.attach_process(self.replica_id, pid)
        tasks, accepts = await self.capabilities()
        url = await self.serve_http(accepts)
        self.endpoint = ReplicaEndpoint(
            replica_id=self.replica_id,
            model_id=self.spec.model_id,
            names=self.spec.names,
            url=url,
            max_ongoing_requests=self.serving.max_ongoing_requests,
            max_tokens=self.spec.max_tokens,
            node=self.reservation.node,
            gpu_uuid=gpu_uuid,
            gpu_index=self.reservation.gpu_index,
            bytes=self.reservation.bytes,
            pids=pids,
            tasks=tasks,
            media=accepts,
            app=_app_name(),
        )
        self.state = "awake"
        self._last_active = time.monotonic()
        if self.heartbeat_task is None or self.heartbeat_task.done():
            self.heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat())

    def _cap_engine(self, gpu_uuid: str, budget: EngineBudget) -> None:
        """Make the engine process an MPS client capped at the reservation (inherited at its start)."""
        pipe_dir = node_pipe_dir()
        cap = budget.cap_bytes or budget.budget_bytes
        if pipe_dir is None:
            message = (
                f"replica {self.replica_id}: no MPS daemon on this node (${PIPE_DIR_ENV} unset or not running): "
                f"its engine is sized to {format_gib(cap)} but not hard-capped"
            )
            if os.environ.get(REQUIRE_MPS_ENV) == "1":
                raise ReplicaStartupError(message)
            log.warning("%s", message)
            return
        os.environ.update(client_env(pipe_dir, gpu_uuid, cap))
        log.info("replica %s: engine capped at %s by MPS on %s", self.replica_id, format_gib(cap), gpu_uuid)

    # -- the engine (overridable: the GPU tests run this start-up path with a stand-in engine) --

    def prepare(self, model_source: str, budget: EngineBudget) -> None:
        """Check the engine configuration before taking the startup lock (fail early, hold nothing long)."""
        argv = server_argv(self.spec, model_source, budget, self.serving.engine_metrics, self.serving.allow_remote_code)
        if budget.device == "cuda" and self.planned.sleep is not None and "--enable-sleep-mode" not in argv:
            argv.append("--enable-sleep-mode")  # its model sleeps: vLLM's sleep and wake, in this process
        self.args = parse_server_args(argv)
        # vLLM's own guards, at the model's limits (the router checks first; see media_checks).
        os.environ["VLLM_MAX_IMAGE_PIXELS"] = str(self.spec.media.max_image_pixels)
        os.environ["VLLM_MAX_AUDIO_CLIP_FILESIZE_MB"] = str(math.ceil(self.spec.media.max_item_mb))
        if budget.device == "cpu":
            # vLLM's CPU backend lets this variable override kv_cache_memory_bytes: the reservation decides.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)

    async def load(self) -> None:
        """Load the engine on the pinned device (runs holding the GPU's startup lock).

        The engine and its HTTP server live on a loop of their own (`LoopThread`), not on the loop
        Ray Serve runs this replica's methods on.
        """
        self.requests = LoopThread(f"{self.replica_id}-requests")
        self.engine = await self.requests.call(self._start_engine(self.args))

    async def capabilities(self) -> tuple[list[str], MediaAccepts]:
        """What the loaded model serves (vLLM's tasks) and takes besides text, within the spec's `media`."""
        assert self.requests is not None
        tasks, supported = await self.requests.call(self._vllm_capabilities())
        media = self.spec.media
        limits = {"image": media.images_per_prompt, "audio": media.audios_per_prompt}
        items = {
            kind: min(limits[kind], cap or limits[kind]) for kind, cap in supported.items() if limits.get(kind, 0) > 0
        }
        if sorted(items) != sorted(self.budget.media.modalities):
            log.warning(
                "replica %s: vLLM takes %s besides text, its config.json suggested %s: the budget %s the encoder "
                "and caches",
                self.replica_id,
                sorted(items) or "nothing",
                self.budget.media.modalities or "nothing",
                "counts" if self.budget.media.modalities else "does not count",
            )
        accepts = MediaAccepts(
            items_per_prompt=items,
            max_item_bytes=media.max_item_bytes,
            max_image_pixels=media.max_image_pixels,
            local_media_dir=media.local_media_dir,
            media_domains=media.media_domains,
        )
        return tasks, accepts

    async def _vllm_capabilities(self) -> tuple[list[str], dict[str, int | None]]:
        tasks = [str(task) for task in await self.engine.get_supported_tasks()]
        try:
            return tasks, await asyncio.to_thread(supported_modalities, self.engine.model_config)
        except Exception as error:  # a vLLM whose processor API differs: fall back to config.json's encoders
            log.warning("replica %s: vLLM's input kinds unknown (%s); using config.json's", self.replica_id, error)
            return tasks, dict.fromkeys(self.budget.media.modalities)

    async def serve_http(self, accepts: MediaAccepts) -> str:
        """Start serving on this node; returns the URL the router calls."""
        assert self.requests is not None
        return await self.requests.call(self._start_http(self.args, accepts))

    async def _start_engine(self, args: Any) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = AsyncEngineArgs.from_cli_args(args)
        config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        stat_loggers = None
        if not args.disable_log_stats:
            # vLLM's metrics recorded with Ray's metrics API: every Ray node's metrics agent exports
            # them (ray_vllm_*), where the chart's scrape objects already look; vLLM's own /metrics
            # would sit on this replica's ephemeral port, which nothing scrapes.
            from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

            stat_loggers = [RayPrometheusStatLogger]
        return AsyncLLM.from_vllm_config(
            vllm_config=config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=stat_loggers,
            enable_log_requests=False,
            disable_log_stats=args.disable_log_stats,
        )

    def _engine_pids(self) -> list[int]:
        """This process and the engine processes it started (their memory is the replica's)."""
        import psutil

        me = psutil.Process()
        return [me.pid, *sorted(child.pid for child in me.children(recursive=True))]

    async def _start_http(self, args: Any, accepts: MediaAccepts) -> str:
        import uvicorn

        from ..router.local_media import LocalMediaGuard

        tasks = await self.engine.get_supported_tasks()
        app = build_openai_app(args, tasks, self.engine.model_config)
        await init_openai_app_state(self.engine, app.state, args, tasks)
        host = os.environ.get(REPLICA_HOST_ENV) or node_ip_address()
        sock = socket.create_server((host, 0), reuse_port=False)
        served = LocalMediaGuard(app, self.spec.model_id, accepts) if accepts.local_media_dir else app
        self.http_requests = RequestsInFlight(served)  # until their last byte: the idle timer and drains
        guarded = InternalKeyGuard(self.http_requests, self.key)  # every path: the router's requests only
        self.server = uvicorn.Server(server_config(guarded, self.serving.client_timeout_s))
        app.state.server = self.server
        self.server_task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self.server_task.done():
                self.server_task.result()
                raise ReplicaStartupError(f"replica {self.replica_id}: HTTP server on {host} exited at start")
            await asyncio.sleep(0.02)
        port = sock.getsockname()[1]
        return f"http://{host}:{port}"

    # -- announcing itself to the routers -----------------------------------------------------

    async def _heartbeat(self) -> None:
        """Announce this replica every HEARTBEAT_S while its engine lives; once the engine is dead
        (its process killed, or failed), withdraw at once instead (`_withdraw`)."""
        fresh, announce_at = False, 0.0
        while True:
            if self.state == "awake" and self.engine is not None and self.engine.errored:
                await self._withdraw()
                return
            if self.state == "awake" and self.engine is not None and not self._transition.locked():
                await self._watch_use_logged()
            if time.monotonic() >= announce_at:
                try:
                    await replicas_board(fresh).register.remote(self.endpoint.model_dump())
                    fresh = False
                except Exception as error:  # the board restarting: try again
                    log.debug("replica %s: endpoint board not reachable: %s", self.replica_id, error)
                    fresh = True
                announce_at = time.monotonic() + HEARTBEAT_S
            await asyncio.sleep(ENGINE_WATCH_S)

    async def _withdraw(self) -> None:
        """Leave the routers' table and stop taking connections: a request sent here now would only
        get vLLM's EngineDeadError, while the routers send it to another replica when this one
        refuses the connection. Serve's health check then restarts the replica."""
        cause = self.engine.dead_error
        log.error("replica %s: vLLM engine died (%s): withdrawn from the routers", self.replica_id, cause)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(replicas_board().unregister.remote(self.replica_id), timeout=5)
        if self.server is not None:
            self.server.should_exit = True

    # -- Serve hooks ------------------------------------------------------------------------

    async def check_health(self) -> None:
        if self.state != "awake" or self._transition.locked():
            return  # asleep or stopped on purpose, or waking: nothing to restart
        if self.engine is not None and self.engine.errored:
            raise RuntimeError(f"replica {self.replica_id}: vLLM engine died: {self.engine.dead_error}")
        if self.server_task is not None and self.server_task.done():
            raise RuntimeError(f"replica {self.replica_id}: its HTTP server stopped")

    async def info(self) -> dict[str, Any]:
        """Its announcement, with the overhead and cap its reservation holds (for measurements)."""
        if self.endpoint is None:
            return {"replica_id": self.replica_id}
        held = {"overhead_bytes": self.reservation.overhead_bytes, "cap_bytes": self.reservation.cap_bytes}
        return self.endpoint.model_dump() | held | {"state": self.state}

    async def engine_requests(self) -> int:
        """Requests the engine holds now, running or waiting: one whose client went away and was
        aborted no longer counts."""
        return 0 if self.engine is None else unfinished_requests(self.engine)

    async def __del__(self) -> None:
        if self.heartbeat_task is not None:
            self.heartbeat_task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(replicas_board().unregister.remote(self.replica_id), timeout=5)
        await self._shut_engine()
        await self._release()

    async def _shut_engine(self) -> None:
        """Stop the HTTP server, the engine and their loop; return once the engine's processes are
        gone (its memory goes with them)."""
        engine = engine_processes()
        if self.server is not None:
            self.server.should_exit = True
            if self.server_task is not None and self.requests is not None:
                with contextlib.suppress(Exception):
                    await self.requests.call(asyncio.wait_for(self.server_task, timeout=5))
        self.server = self.server_task = None
        self._stop_engine()
        if self.requests is not None:
            self.requests.stop()
            self.requests = None
        await asyncio.to_thread(wait_gone, engine)

    # -- sleep and wake -----------------------------------------------------------------------
    # The ledger decides (`Ledger.sleep` / `wake`), the engine follows. On CPU, or when the ledger
    # stops it, the engine is shut down (its next wake starts it again: scale to zero); on a GPU
    # with sleep mode, vLLM's own sleep and wake run on the engine in this process. One transition
    # at a time (`_transition`); while it runs, routers see the replica asleep and hold requests.

    def _sleeping_endpoint(self) -> ReplicaEndpoint:
        """What routers see while it sleeps: its names and where to wake it, no URL to call."""
        known = self.endpoint
        return ReplicaEndpoint(
            replica_id=self.replica_id,
            model_id=self.spec.model_id,
            names=self.spec.names,
            url="",
            max_ongoing_requests=self.serving.max_ongoing_requests,
            max_tokens=self.spec.max_tokens,
            node=self.reservation.node,
            gpu_uuid=self.reservation.gpu_uuid,
            gpu_index=self.reservation.gpu_index,
            bytes=self.reservation.bytes,
            pids=[],
            tasks=known.tasks if known is not None else ["generate"],
            media=known.media if known is not None else MediaAccepts(),
            state="stopped" if self.state == "stopped" else "asleep",
            app=_app_name(),
        )

    async def _announce(self, endpoint: ReplicaEndpoint) -> None:
        """Tell the routers now (not at the next heartbeat)."""
        self.endpoint = endpoint
        with contextlib.suppress(Exception):
            await asyncio.wait_for(replicas_board().register.remote(endpoint.model_dump()), timeout=10)

    def _uses_sleep_mode(self) -> bool:
        """Whether its engine sleeps in place (CUDA with `enable_sleep_mode`) rather than stopping."""
        return getattr(self, "device", "cpu") == "cuda" and bool(getattr(self.args, "enable_sleep_mode", False))

    async def _watch_use_logged(self) -> None:
        """`_watch_use`, whose failure is logged (once per kind) and never ends the heartbeat: a
        replica that cannot count its requests still serves and stays on the routers' table (on the
        GPU machine, vLLM 0.26's missing `get_num_unfinished_requests` once killed the heartbeat, and
        the ready replicas were never routed)."""
        try:
            await self._watch_use()
        except Exception as error:
            kind = type(error).__name__
            if kind not in self._watch_failures:
                self._watch_failures.add(kind)
                log.exception("replica %s: tracking its requests failed (%s); it keeps serving", self.replica_id, kind)

    async def _watch_use(self) -> None:
        """Track the engine's requests: report busy/idle to the allocator (a wake never evicts a busy
        replica, and evicts the least recently used first), and go to sleep once idle for the
        model's `after_idle_s`."""
        in_flight = self._in_flight()
        now = time.monotonic()
        busy = in_flight > 0
        if busy:
            self._last_active = now
        was_busy, reported_at = self._reported_busy
        if busy != was_busy or (busy and now - reported_at >= BUSY_REPORT_INTERVAL_S):
            self._reported_busy = (busy, now)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.allocator.report_use(self.replica_id, in_flight), timeout=5)
        terms = self.reservation.sleep
        if terms is not None and not busy and now - self._last_active >= terms.after_idle_s:
            asyncio.get_running_loop().create_task(self.sleep_now("idle"))

    def _in_flight(self) -> int:
        """Requests in flight: in the engine, or still in its HTTP server (parsed, or a stream being
        written), whichever counts more."""
        engine = 0 if self.engine is None else unfinished_requests(self.engine)
        return max(engine, self.http_requests.count if self.http_requests is not None else 0)

    async def sleep_now(self, why: str = "operator") -> dict[str, Any]:
        """Go to sleep (`why`: idle, evicted by another replica's wake, operator): leave the routers,
        let requests in flight finish, then sleep or stop the engine as the ledger decides. Returns `info()`."""
        if self.reservation.sleep is None:
            raise ReplicaWakeError(
                f"replica {self.replica_id}: model {self.spec.model_id} never sleeps (pinned, or no sleep policy: set "
                "the model's sleep or placement.sleep.after_idle_s)"
            )
        async with self._transition:
            if self.state != "awake":
                return await self.info()
            if why == "idle" and self._in_flight():  # a request came after the timer looked: not idle
                self._last_active = time.monotonic()
                return await self.info()
            started = time.monotonic()
            self.state = "asleep"
            await self._announce(self._sleeping_endpoint())
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while self._in_flight() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self._uses_sleep_mode():
                held = await self._sleep_engine()
            else:
                await self._shut_engine()  # the ledger holds its reservation until the engine is gone
                held = await self.allocator.stop(self.replica_id)
            self.reservation = held
            self.state = held.state
            if self.sleep_metrics is not None:
                self.sleep_metrics.slept(held.state, why)
            await self._announce(self._sleeping_endpoint())
            log.info(
                "replica %s: %s (level %s) in %.2fs",
                self.replica_id,
                held.state,
                held.asleep_level,
                time.monotonic() - started,
            )
            return await self.info()

    async def _sleep_engine(self) -> Reservation:
        """vLLM's sleep at the level the ledger chose; the ledger keeps the whole reservation
        (settling) until the sleep returned. The ledger may stop it instead (its GPU's sleepers are
        full): the engine shuts down first. A sleep that fails shuts the engine down too, and the
        replica is stopped: its reservation is freed once its engine is gone, not before."""
        held = await self.allocator.sleep(self.replica_id)
        if held.state == "asleep":
            assert self.requests is not None
            try:
                self._engine_sleep_level = held.asleep_level or 1
                await self.requests.call(engine_sleep(self.engine, self._engine_sleep_level))
            except Exception as error:
                log.error("replica %s: vLLM sleep failed (%s): stopping its engine", self.replica_id, _reason(error))
            else:
                return await self.allocator.settle(self.replica_id)
        await self._shut_engine()
        return await self.allocator.stop(self.replica_id)

    async def wake(self) -> dict[str, Any]:
        """Wake (or start) the engine: the ledger first takes the whole reservation back, then the
        engine wakes under the GPU's startup lock. When the GPU is short, the ledger names idle
        replicas to evict instead: they go to sleep (holding their reservations until their engines
        let go) and the ledger is asked again. A failed wake stops the engine and frees the
        reservation, and raises `ReplicaWakeError` saying why. Returns a `WakeReport` as a dict."""
        async with self._transition:
            if self.state == "awake":
                return WakeReport(replica_id=self.replica_id, state="awake", seconds=0.0).model_dump()
            started, cold = time.monotonic(), self.engine is None
            outcome = await self._take_reservation()
            try:
                if cold:
                    await self._boot()
                else:
                    await self._wake_engine()
            except BaseException as error:
                reason = _reason(error)
                await self._shut_engine()
                with contextlib.suppress(Exception):
                    self.reservation = await self.allocator.stop(self.replica_id)
                self.state = "stopped"
                if self.sleep_metrics is not None:
                    self.sleep_metrics.wake_failed(time.monotonic() - started)
                await self._announce(self._sleeping_endpoint())
                raise ReplicaWakeError(
                    f"replica {self.replica_id} of model {self.spec.model_id}: wake failed: {reason}; its engine is "
                    "stopped and its reservation freed (the next request starts it again)"
                ) from None
            self.state = "awake"
            self._last_active = time.monotonic()
            assert self.endpoint is not None
            await self._announce(self.endpoint.model_copy(update={"state": "awake"}))
            seconds = time.monotonic() - started
            if self.sleep_metrics is not None:
                self.sleep_metrics.woke(seconds, cold, len(outcome.evicted))
            log.info("replica %s: awake in %.2fs (%s)", self.replica_id, seconds, "started" if cold else "woken")
            evicted = [e.replica_id for e in outcome.evicted]
            return WakeReport(
                replica_id=self.replica_id, state="awake", seconds=seconds, cold=cold, evicted=evicted
            ).model_dump()

    async def _take_reservation(self) -> WakeOutcome:
        """The whole reservation from the ledger; while the GPU is short, the replicas it evicts
        sleep first (each round evicts others: the ledger never evicts a settling replica twice).
        Returns the outcome with every replica evicted on the way."""
        evicted: list[Eviction] = []
        while True:
            try:
                outcome = await self.allocator.wake(self.replica_id)
            except Exception as error:
                raise ReplicaWakeError(
                    f"replica {self.replica_id} of model {self.spec.model_id}: cannot wake: {_reason(error)}"
                ) from None
            self.reservation = outcome.reservation
            evicted += outcome.evicted
            if outcome.reservation.state == "awake":
                return outcome.model_copy(update={"evicted": evicted})
            for eviction in outcome.evicted:
                await _sleep_replica(eviction.replica_id, eviction.model_id)

    async def _wake_engine(self) -> None:
        """vLLM's wake on the sleeping engine, under the GPU's startup lock (one wake per GPU at a time)."""
        gpu_uuid = self.reservation.gpu_uuid
        locked = await self.allocator.acquire_startup_lock(gpu_uuid, self.replica_id, STARTUP_LOCK_TIMEOUT_S)
        if not locked:
            raise ReplicaStartupError(f"startup lock of GPU {gpu_uuid} not granted within {STARTUP_LOCK_TIMEOUT_S:g}s")
        try:
            assert self.requests is not None
            await self.requests.call(engine_wake(self.engine, self._engine_sleep_level))
        finally:
            await self.allocator.release_startup_lock(gpu_uuid, self.replica_id)

    def _stop_engine(self) -> None:
        if self.engine is not None and hasattr(self.engine, "shutdown"):
            with contextlib.suppress(Exception):
                self.engine.shutdown()
        self.engine = None

    async def _release(self) -> None:
        if not self._reserved:
            return
        try:
            await self.allocator.release(self.replica_id)
            self._reserved = False
        except Exception as error:  # the allocator reclaims it once this actor is gone
            log.warning("replica %s: release failed (%s); the allocator reclaims it", self.replica_id, error)


def _app_name() -> str | None:
    """The Serve application this replica runs in (None outside Serve)."""
    with contextlib.suppress(Exception):
        return serve.get_replica_context().app_name
    return None


async def _sleep_replica(replica_id: str, model_id: str) -> None:
    """Ask another replica (evicted by a wake) to sleep, through its Serve deployment in the
    application it announced on the endpoint board."""
    try:
        table = await replicas_board().table.remote()
        apps = [e.get("app") for e in table.get("endpoints", []) if e.get("replica_id") == replica_id]
        app = apps[0] if apps and apps[0] else None
        handle = (
            serve.get_deployment_handle(replica_id, app_name=app) if app else serve.get_deployment_handle(replica_id)
        )
        await handle.sleep_now.remote("evicted")
    except Exception as error:  # it may be gone meanwhile; the ledger already holds it asleep
        log.warning("replica %s of model %s: could not be put to sleep: %s", replica_id, model_id, error)


def replica_deployment(
    spec: ModelSpec,
    reservation: Reservation,
    serving: ServingSettings,
    env: dict[str, str],
) -> Any:
    """A Serve deployment for one planned replica (named by its replica id, one Serve replica);
    built again the same, it is the same deployment (`keep_if_unchanged`)."""
    from .placement import actor_options

    options = deployment_options(
        "replica",
        reservation.replica_id,
        ray_actor_options=actor_options(reservation, env),
        max_ongoing_requests=serving.max_ongoing_requests,
    )
    args = (spec.model_dump(mode="json"), reservation.model_dump(mode="json"), serving.model_dump(mode="json"))
    # Its state (awake, asleep, stopped, settling) changes while it runs: not a reason to restart it.
    steady = reservation.model_dump(mode="json", exclude={"state", "asleep_level", "settling"})
    identity = [f"{VLLMReplica.__module__}.{VLLMReplica.__qualname__}", options, args[0], steady, args[2]]
    return keep_if_unchanged(serve.deployment(VLLMReplica, **options), identity).bind(*args)
