"""The OpenAI-compatible front door: routes each request by its `model` to a replica's vLLM server.

It reads the body once, picks the least-busy ready replica of that model and streams vLLM's
answer back unchanged (JSON or SSE), so every OpenAI feature vLLM implements — completions,
chat, streaming, `response_format`, sampling parameters, truncation, its error bodies — works
as vLLM implements it. What the router adds: unknown model → 404, full replicas → 429 (with
Retry-After), no ready replica → 503 saying which case holds (the controller's availability on
the board: pending — not placed, why, since when; loading; failed — the last error; Retry-After
only while loading or restarting, where waiting helps), the optional bearer API key, and
`/v1/models` over the models that can answer (a ready replica registered). With
`serving.engine_metrics` on, each router counts and times the requests it
answers (`router_metrics`: `ray_vram_router_*` through Ray's metrics agent).

Images and audio are checked against what the model takes (`media_checks`) before a replica sees
them: a request for an endpoint its model does not serve (chat to a speech model, a transcription to
a text model), an image for a text-only model, too many or too large items, a path outside the
model's media directory or a download URL get a 4xx naming the model and the limit. The audio
endpoints (`/v1/audio/transcriptions`, `/v1/audio/translations`) take the multipart form OpenAI's
clients send; it is forwarded as sent, with the model's default length added when it sets none.

Only exact routes are served (`FORWARDED` and `GET /v1/models[/<name>]`): any other method or path
is 404, matched on the path as the client sent it (`raw_path`), so no trailing slash, `..`,
double slash or percent-encoding ever reaches another route of vLLM, and redirects from replicas are
never followed. Each forwarded request carries the cluster's internal key (`internal_key`), without
which replicas answer 401. A request body is bounded per route (`http_limits`: 413 before it is
read, 408 when too slow), and a client that goes away cancels its request: the connection to the
replica is closed, and vLLM aborts the generation.

A plain ASGI app on uvicorn (no framework in the request path): on a 2-core machine every
millisecond of per-request CPU shows up in throughput (bench/serving). The router runs as
`serving.router_replicas` Serve replicas, each routing by its copy of the endpoint board's table
(`endpoint_board`) and listening on the same port of its node (SO_REUSEPORT): when one dies, the
others keep answering on that port.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson

from ...core.config import ServingSettings
from ...core.contract import EndpointTable, ModelAvailability, ReplicaEndpoint
from ...core.errors import WAKE_REFUSED, wake_failure
from ..endpoint_board import WATCH_TIMEOUT_S, endpoint_board
from ..internal_key import authorization, internal_key
from ..replica.loop_thread import LoopThread
from .http_limits import MIB, BodyRefused, read_body, server_config
from .media_checks import MediaRejected, check_audio_upload, check_chat
from .metrics import BROKEN_STATUS, CLIENT_LEFT_STATUS, UNKNOWN_MODEL, Exchange, RequestMetrics, route_of
from .multipart import FormError, add_field, is_multipart, parse_form

log = logging.getLogger("ray.serve")

ROUTER_APP = "ray-vram-openai"
ROUTER_DEPLOYMENT = "OpenAIRouter"
RETRY_AFTER_BUSY_S = 1
RETRY_AFTER_LOADING_S = 5
#: How often a wake refused for want of room (busy or pinned replicas there) is tried again.
WAKE_RETRY_S = 0.5
#: How often a queued request looks for a replica with room (a few µs each).
QUEUE_POLL_S = 0.01
#: Longest the router waits to connect to a replica: a replica on a node that left answers no
#: connection attempt at all, and its requests go to another replica after this.
CONNECT_TIMEOUT_S = 5.0
#: Response header naming the replica that answered (which one took a request: logs, tests).
REPLICA_HEADER = b"x-ray-vram-replica"
#: Response header: the replicas this request was sent to, the one that answered included (2 or
#: more: the router retried it after a replica died before answering).
ATTEMPTS_HEADER = b"x-ray-vram-attempts"
#: What vLLM's error answer says when its engine died under a request (`EngineDeadError`'s message,
#: the same in 0.26 and 0.32): the request was not served there and may go to another replica.
ENGINE_DEAD_MARK = b"EngineCore encountered an issue"
#: How much of a non-streamed 5xx answer is read before it is forwarded, to look for that mark.
ERROR_PEEK_BYTES = 64 * 1024
#: The routes forwarded to replicas (POST, exact paths), the vLLM task each needs, and what to call it
#: in errors. Every other path is 404 (`exact_path`).
PATH_TASKS = {
    "/v1/chat/completions": ("generate", "chat completions"),
    "/v1/completions": ("generate", "completions"),
    "/v1/audio/transcriptions": ("transcription", "audio transcriptions"),
    "/v1/audio/translations": ("transcription", "audio translations"),
}
#: The forwarded routes whose body is a multipart upload, bounded by the models' media.max_item_mb.
UPLOAD_ROUTES = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
#: Room for a form's other fields and boundaries beside its file.
FORM_ENVELOPE_BYTES = MIB

#: The scope key of a request's `router_metrics.Exchange` (absent with metrics off).
EXCHANGE = "ray_vram.exchange"

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


@dataclass
class _Replica:
    endpoint: ReplicaEndpoint
    inflight: int = 0
    served: int = 0


@dataclass
class Registry:
    """Which replicas serve which model names, and how busy each is (this router's copy)."""

    replicas: dict[str, _Replica] = field(default_factory=dict)
    declared: dict[str, str] = field(default_factory=dict)  # name -> model_id
    max_tokens: dict[str, int] = field(default_factory=dict)  # name -> default completion length
    availability: dict[str, ModelAvailability] = field(default_factory=dict)  # name -> why it may not answer
    sleeping: dict[str, ReplicaEndpoint] = field(default_factory=dict)  # replica id -> asleep or stopped replica
    _turn: int = 0
    _queues: dict[str, list[object]] = field(default_factory=dict)  # model_id -> waiting requests, first first

    def sync(self, table: EndpointTable) -> None:
        """Take the endpoint board's table; a replica already known at the same URL keeps its counts."""
        self.declared = {name: model.model_id for model in table.models for name in model.names}
        self.max_tokens = {name: model.max_tokens for model in table.models for name in model.names}
        self.availability = {
            name: model.availability for model in table.models if model.availability for name in model.names
        }
        replicas, self.sleeping = {}, {}
        for endpoint in table.endpoints:
            if endpoint.state != "awake":
                self.sleeping[endpoint.replica_id] = endpoint
                continue
            current = self.replicas.get(endpoint.replica_id)
            if current is not None and current.endpoint.url == endpoint.url:
                current.endpoint = endpoint
                replicas[endpoint.replica_id] = current
            else:
                replicas[endpoint.replica_id] = _Replica(endpoint)
            self.max_tokens.update(dict.fromkeys(endpoint.names, endpoint.max_tokens))
        self.replicas = replicas

    def unregister(self, replica_id: str) -> bool:
        return self.replicas.pop(replica_id, None) is not None

    def model_id(self, name: str) -> str | None:
        """The model_id `name` routes to; None when no model is served by that name (per request:
        no sorted copy of every name)."""
        model_id = self.declared.get(name)
        if model_id is not None:
            return model_id
        for replica in self.replicas.values():
            if name in replica.endpoint.names:
                return replica.endpoint.model_id
        return None

    def names(self) -> list[str]:
        """Every name a request may use: declared models' and registered replicas'."""
        known = set(self.declared)
        for replica in self.replicas.values():
            known.update(replica.endpoint.names)
        return sorted(known)

    def answering(self) -> list[str]:
        """The names of models that can answer now: a ready replica registered, or one asleep that a
        request wakes."""
        names = {name for replica in self.replicas.values() for name in replica.endpoint.names}
        return sorted(names | {name for endpoint in self.sleeping.values() for name in endpoint.names})

    def sleepers(self, name: str) -> list[ReplicaEndpoint]:
        """Replicas of `name`'s model that sleep, the fastest to wake first (asleep before stopped)."""
        found = [e for e in self.sleeping.values() if name in e.names]
        return sorted(found, key=lambda e: (e.state != "asleep", e.replica_id))

    def largest_item_bytes(self) -> int:
        """The largest `media.max_item_mb` (bytes) of any replica that transcribes (0: none does)."""
        return max(
            (r.endpoint.media.max_item_bytes for r in self.replicas.values() if "transcription" in r.endpoint.tasks),
            default=0,
        )

    def candidates(self, name: str) -> list[_Replica]:
        return [r for r in self.replicas.values() if name in r.endpoint.names]

    def endpoint_of(self, name: str) -> ReplicaEndpoint | None:
        """One replica's announcement for `name` (every replica of a model announces the same tasks
        and media limits); None before any replica registered."""
        for replica in self.replicas.values():
            if name in replica.endpoint.names:
                return replica.endpoint
        return None

    def queued(self, name: str) -> int:
        """Requests waiting for a replica of `name`'s model."""
        return len(self._queues.get(self.model_id(name) or name, ()))

    def ready(self, name: str, exclude: set[str]) -> list[_Replica]:
        return [r for r in self.candidates(name) if r.endpoint.replica_id not in exclude]

    async def wait(self, name: str, exclude: set[str], max_queued: int, max_wait_s: float) -> _Replica | None:
        """Queue for a replica of `name` with room, first come first served, at most `max_wait_s`;
        None at once when the queue holds `max_queued` already or no replica is ready, and when the
        wait ends without room (or without a ready replica)."""
        queue = self._queues.setdefault(self.model_id(name) or name, [])
        if len(queue) >= max_queued or not self.ready(name, exclude):
            return None
        ticket = object()
        queue.append(ticket)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_s
        try:
            while loop.time() < deadline and self.ready(name, exclude):
                await asyncio.sleep(min(QUEUE_POLL_S, max(0.0, deadline - loop.time())))
                if queue[0] is ticket and (replica := self.pick(name, exclude)) is not None:
                    return replica
            return None
        finally:
            queue.remove(ticket)

    def pick(self, name: str, exclude: set[str]) -> _Replica | None:
        """The least-busy replica of `name` below its limit (round-robin among equals)."""
        free = [
            r
            for r in self.candidates(name)
            if r.endpoint.replica_id not in exclude and r.inflight < r.endpoint.max_ongoing_requests
        ]
        if not free:
            return None
        least = min(r.inflight for r in free)
        tied = sorted((r for r in free if r.inflight == least), key=lambda r: r.endpoint.replica_id)
        self._turn += 1
        return tied[self._turn % len(tied)]


def error_body(status: int, message: str, kind: str, param: str | None = None) -> bytes:
    """OpenAI's error shape."""
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}})


class OpenAIRouter:
    """The ASGI application (see module docstring)."""

    def __init__(
        self,
        settings: ServingSettings,
        registry: Registry | None = None,
        on_unreachable: Callable[[str], None] | None = None,
        metrics: RequestMetrics | None = None,
    ):
        self.settings = settings
        self.registry = registry or Registry()
        #: Counts and times each request but health checks (None: not recorded).
        self.metrics = metrics
        #: Told the id of a replica this router dropped for not answering (the other routers drop it too).
        self.on_unreachable = on_unreachable
        self.api_key = os.environ.get(settings.api_key_env or "", "") if settings.api_key_env else ""
        #: Sent to replicas with every request (they answer 401 without it); none: refuse to start.
        self.replica_authorization = authorization(internal_key(where="this router's node"))
        self._session: Any = None
        #: The wake in progress per model (requests for a sleeping model share it).
        self._wakes: dict[str, asyncio.Task[None]] = {}
        #: Per model, why its last wake was refused (no room now), while it is tried again.
        self._wake_refusals: dict[str, str] = {}
        #: Told each wake's report (model id, `WakeReport` as a dict): the router's wake metrics.
        self.on_wake: Callable[[str, dict[str, Any]], None] | None = None

    async def session(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_s, sock_connect=CONNECT_TIMEOUT_S),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- ASGI -------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = exact_path(scope)
        if path in ("/healthz", "/-/healthz"):
            await _respond(send, 200, b'{"status":"ok"}')
            return
        if self.metrics is None:
            await self._answer(scope, receive, send)
            return
        exchange = Exchange(send)
        scope[EXCHANGE] = exchange
        try:
            await self._answer(scope, receive, exchange.send)
        finally:
            self.metrics.record(exchange, route_of(path))

    async def _answer(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        path = exact_path(scope)
        method: str = scope["method"]
        if not self._authorised(scope):
            await _respond(
                send,
                401,
                error_body(401, "missing or wrong API key (Authorization: Bearer <key>)", "AuthenticationError"),
            )
            return
        if method == "GET" and path == "/v1/models":
            await _respond(send, 200, self._models())
            return
        if method == "GET" and path.startswith("/v1/models/"):  # answered here: the name may be percent-encoded
            name = scope["path"].removeprefix("/v1/models/")
            model_id = self.registry.model_id(name)
            _note_model(scope, model_id)
            if self.registry.candidates(name):
                await _respond(send, 200, orjson.dumps(_model_card(name)))
            elif model_id is not None:  # declared, cannot answer now: say why, as a request would hear
                await self._unavailable(send, name, set())
            else:
                await _respond(
                    send, 404, error_body(404, f"The model `{name}` does not exist.", "NotFoundError", "model")
                )
            return
        if method != "POST" or path not in PATH_TASKS:
            message = f"no route {method} {path[:200]} (served: GET /v1/models, POST {', POST '.join(PATH_TASKS)})"
            await _respond(send, 404, error_body(404, message, "NotFoundError"))
            return
        limit, setting = self.body_limit(path)
        try:
            body = await read_body(scope, receive, limit, self.settings.client_timeout_s, f"POST {path} ({setting})")
        except BodyRefused as error:  # the connection closes: the rest of the body is never read
            await _respond(send, error.status, error_body(error.status, str(error), error.kind), [CLOSE])
            return
        except ConnectionResetError:  # the client left before sending all of its body
            return
        content_type = _header(scope, b"content-type") or "application/json"
        tracked = _Tracked(send)
        if is_multipart(content_type):
            answer = self._forward_form(scope, content_type, body, tracked.send)
        else:
            answer = self._forward(scope, body, tracked.send)
        await cancelled_if_client_leaves(scope, receive, answer, tracked)

    def body_limit(self, path: str) -> tuple[int, str]:
        """The largest body `path` takes, and the setting that says so: an upload its models' largest
        media.max_item_mb and a form's overhead, JSON serving.max_body_mb."""
        largest_item = self.registry.largest_item_bytes() if path in UPLOAD_ROUTES else 0
        if largest_item:
            return largest_item + FORM_ENVELOPE_BYTES, "models' media.max_item_mb + 1 MiB of form"
        return round(self.settings.max_body_mb * MIB), "serving.max_body_mb"

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _authorised(self, scope: dict[str, Any]) -> bool:
        if not self.api_key:
            return True
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False

    def _models(self) -> bytes:
        return orjson.dumps({"object": "list", "data": [_model_card(name) for name in self.registry.answering()]})

    async def _forward(self, scope: dict[str, Any], body: bytes, send: Send) -> None:
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError as error:
            await _respond(send, 400, error_body(400, f"request body is not valid JSON: {error}", "BadRequestError"))
            return
        name = request.get("model") if isinstance(request, dict) else None
        if not await self._check_model(name, scope, send):
            return
        assert isinstance(name, str)
        endpoint = self.registry.endpoint_of(name)
        if endpoint is not None and scope["path"] == "/v1/chat/completions":
            try:
                check_chat(request, name, endpoint.media)
            except MediaRejected as error:
                await _refuse(send, error)
                return
        if "max_tokens" not in request and "max_completion_tokens" not in request and name in self.registry.max_tokens:
            # The model's default length; vLLM alone would fill the context (or cap at a configured default).
            request["max_tokens"] = self.registry.max_tokens[name]
            body = orjson.dumps(request)
        await self._route(name, scope, body, send, "application/json")

    async def _forward_form(self, scope: dict[str, Any], content_type: str, body: bytes, send: Send) -> None:
        """A multipart request (OpenAI's audio endpoints): its `model` field routes it, its file is checked."""
        try:
            form = parse_form(content_type, body)
        except FormError as error:
            await _respond(send, 400, error_body(400, f"request body: {error}", "BadRequestError"))
            return
        name = form.fields.get("model")
        if not await self._check_model(name, scope, send):
            return
        assert isinstance(name, str)
        endpoint = self.registry.endpoint_of(name)
        uploads = [upload for upload in form.files if upload.name == "file"]
        if endpoint is not None and scope["path"].startswith("/v1/audio/"):
            if not uploads:
                message = "file: field required (the audio file, as a multipart upload)"
                await _respond(send, 400, error_body(400, message, "BadRequestError", "file"))
                return
            try:
                check_audio_upload(uploads[0].data, uploads[0].filename, name, endpoint.media)
            except MediaRejected as error:
                await _refuse(send, error)
                return
        if "max_completion_tokens" not in form.fields and name in self.registry.max_tokens:
            # Whisper-like models otherwise decode up to their whole context (448 tokens) per request.
            body = add_field(content_type, body, "max_completion_tokens", str(self.registry.max_tokens[name]))
        await self._route(name, scope, body, send, content_type)

    async def _check_model(self, name: Any, scope: dict[str, Any], send: Send) -> bool:
        """Whether `name` is a served model whose replicas serve the request's path; answers the
        client when not."""
        path: str = scope["path"]
        if not isinstance(name, str) or not name:
            await _respond(
                send,
                400,
                error_body(400, "model: field required (a string naming a served model)", "BadRequestError", "model"),
            )
            return False
        model_id = self.registry.model_id(name)
        _note_model(scope, model_id)
        if model_id is None:
            known = ", ".join(self.registry.names()) or "none"
            await _respond(
                send,
                404,
                error_body(404, f"The model `{name}` does not exist (served: {known}).", "NotFoundError", "model"),
            )
            return False
        endpoint = self.registry.endpoint_of(name)
        task, what = PATH_TASKS.get(path, (None, ""))
        if endpoint is not None and task is not None and task not in endpoint.tasks:
            serves = [label for t, label in PATH_TASKS.values() if t in endpoint.tasks]
            message = (
                f"model `{name}` does not serve {what} (POST {path}); it serves "
                f"{', '.join(dict.fromkeys(serves)) or ', '.join(endpoint.tasks)}"
            )
            await _respond(send, 400, error_body(400, message, "BadRequestError", "model"))
            return False
        return True

    async def _route(self, name: str, scope: dict[str, Any], body: bytes, send: Send, content_type: str) -> None:
        tried: set[str] = set()
        exchange: Exchange | None = scope.get(EXCHANGE)
        settings = self.settings
        while True:
            # Queued requests come first: a new one takes a free slot only when nobody waits.
            replica = None if self.registry.queued(name) else self.registry.pick(name, tried)
            if replica is None:
                replica = await self.registry.wait(name, tried, settings.max_queued_requests, settings.max_queue_wait_s)
            if replica is None and not self.registry.ready(name, tried) and self.registry.sleepers(name):
                woke = await self._wake(name, tried)
                if woke is not None:  # 503 said why
                    await _respond(send, 503, error_body(503, woke[0], "ServiceUnavailableError"), woke[1])
                    return
                continue
            if replica is None:
                await self._unavailable(send, name, tried)
                return
            tried.add(replica.endpoint.replica_id)
            if exchange is not None:
                exchange.forwarded = True
            if await self._proxy(replica, scope, body, send, content_type, len(tried)):
                return
            # The replica is gone (dropped): nothing reached the client yet, and a completion has no
            # side effect, so the request goes to another replica of the model.

    async def _wake(self, name: str, tried: set[str]) -> tuple[str, list[tuple[bytes, bytes]]] | None:
        """Wake a sleeping replica of `name`'s model and hold the request until a replica is ready,
        at most `serving.max_wake_wait_s` (one wake per model at a time on this router; requests
        arriving meanwhile wait for the same one). None: ready; else the 503's message and headers."""
        model_id = self.registry.model_id(name) or name
        wake = self._wakes.get(model_id)
        limit = self.settings.max_wake_wait_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        if wake is None or wake.done():
            wake = loop.create_task(self._wake_one(name, deadline))
            self._wakes[model_id] = wake
        try:
            await asyncio.wait_for(asyncio.shield(wake), timeout=limit)
        except TimeoutError:
            refused = self._wake_refusals.get(model_id)
            why = f": the last try was refused: {refused}" if refused else " (its replicas were asleep)"
            message = f"model {name} was not awake within {limit:g}s (serving.max_wake_wait_s){why}; retry"
            return message, [(b"retry-after", str(RETRY_AFTER_LOADING_S).encode())]
        except Exception as error:
            return f"model {name} could not be woken: {wake_failure(error)}", []
        while not self.registry.ready(name, tried) and loop.time() < deadline:  # the board's update is on its way
            await asyncio.sleep(QUEUE_POLL_S)
        if self.registry.ready(name, tried):
            return None
        message = f"model {name} woke but no replica of it was ready within {limit:g}s (serving.max_wake_wait_s); retry"
        return message, [(b"retry-after", str(RETRY_AFTER_LOADING_S).encode())]

    async def _wake_one(self, name: str, deadline: float) -> None:
        """Ask the first sleeper of `name` (`Registry.sleepers`) to wake, through its Serve deployment;
        a wake refused for want of room is asked again until `deadline` (the loop's clock)."""
        from ray import serve

        endpoint = self.registry.sleepers(name)[0]
        if endpoint.app:
            handle = serve.get_deployment_handle(endpoint.replica_id, app_name=endpoint.app)
        else:
            handle = serve.get_deployment_handle(endpoint.replica_id)
        started = time.monotonic()
        while True:
            try:
                report = await handle.wake.remote()
                break
            except Exception as error:
                reason = wake_failure(error)
                if WAKE_REFUSED not in reason or asyncio.get_running_loop().time() + WAKE_RETRY_S > deadline:
                    raise  # it failed (said at once), or no room came in time
                # No room now (the replicas there are busy or pinned): requests in flight end, so
                # try again while the request waits (`_wake` bounds it).
                self._wake_refusals[endpoint.model_id] = reason
                await asyncio.sleep(WAKE_RETRY_S)
        self._wake_refusals.pop(endpoint.model_id, None)
        log.info("woke %s for model %s in %.2fs: %s", endpoint.replica_id, name, time.monotonic() - started, report)
        if self.on_wake is not None:
            self.on_wake(endpoint.model_id, report)

    async def _unavailable(self, send: Send, name: str, tried: set[str]) -> None:
        ready = self.registry.ready(name, tried)
        if ready:
            limit = sum(r.endpoint.max_ongoing_requests for r in ready)
            queued, most = self.registry.queued(name), self.settings.max_queued_requests
            why = (
                f"the queue is full ({queued} of {most} waiting, serving.max_queued_requests)"
                if queued >= most
                else f"no room within {self.settings.max_queue_wait_s:g}s in the queue (serving.max_queue_wait_s)"
            )
            message = (
                f"model {name} is at capacity ({limit} requests in flight over {len(ready)} replica(s)) and {why}; "
                "retry"
            )
            await _respond(
                send,
                429,
                error_body(429, message, "RateLimitError"),
                [(b"retry-after", str(RETRY_AFTER_BUSY_S).encode())],
            )
        else:
            message, retry = unavailable_answer(name, self.registry.availability.get(name), time.time())
            extra = [(b"retry-after", str(RETRY_AFTER_LOADING_S).encode())] if retry else []
            await _respond(send, 503, error_body(503, message, "ServiceUnavailableError"), extra)

    async def _proxy(
        self, replica: _Replica, scope: dict[str, Any], body: bytes, send: Send, content_type: str, attempt: int = 1
    ) -> bool:
        """Send the request to `replica` and its answer to the client: True once the client has an
        answer (the replica's, a 504, or a response cut short); False when the replica could not be
        reached or closed the connection before answering — either way it is gone: dropped here and
        on the board (it comes back when it announces itself again), and nothing reached the client."""
        import aiohttp

        session = await self.session()
        url = replica.endpoint.url + exact_path(scope)  # one of PATH_TASKS
        replica.inflight += 1
        replica.served += 1
        started, streaming = False, False
        upstream_response: Any = None
        replica_id = replica.endpoint.replica_id
        try:
            headers = {"content-type": content_type, "authorization": self.replica_authorization}
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as upstream:
                upstream_response = upstream
                content_type = upstream.headers.get("content-type", "application/json")
                streaming = content_type.startswith("text/event-stream")
                if streaming and (exchange := scope.get(EXCHANGE)) is not None:
                    exchange.streamed = True
                answer_headers = [
                    (b"content-type", content_type.encode()),
                    (REPLICA_HEADER, replica_id.encode()),
                    (ATTEMPTS_HEADER, str(attempt).encode()),
                ]
                head = b""
                if upstream.status >= 500 and not streaming:
                    head = await _read_up_to(upstream.content, ERROR_PEEK_BYTES)
                    if ENGINE_DEAD_MARK in head:
                        # vLLM's answer for an engine that died under the request: nothing was generated,
                        # so it goes to another replica, as a request whose connection was lost does.
                        self._drop(replica_id, "answered for a dead engine")
                        return False
                await send({"type": "http.response.start", "status": upstream.status, "headers": answer_headers})
                started = True
                if head:
                    await send({"type": "http.response.body", "body": head, "more_body": True})
                async for chunk in upstream.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return True
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
            if started:
                log.warning("replica %s: stream broken: %s", replica_id, error)
                await _end_broken(send, replica_id, error, streaming)
                if (exchange := scope.get(EXCHANGE)) is not None:
                    exchange.status = BROKEN_STATUS
                return True
            unreachable = isinstance(error, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
            if unreachable or not isinstance(error, TimeoutError):  # (a slow replica is not retried: 504)
                # Not reached (no connection within CONNECT_TIMEOUT_S: its node is gone, or refused),
                # or connected and then gone before a byte of answer (it died under the request).
                self._drop(replica_id, f"unreachable: {error}" if unreachable else f"lost before answering: {error}")
                return False
            await _respond(send, 504, error_body(504, f"replica {replica_id}: {error}", "TimeoutError"))
            return True
        except asyncio.CancelledError:  # the client left (`cancelled_if_client_leaves`)
            if upstream_response is not None:
                upstream_response.close()  # the replica sees its connection close, and vLLM aborts
            raise
        finally:
            replica.inflight -= 1

    def _drop(self, replica_id: str, why: str) -> None:
        if self.registry.unregister(replica_id):
            log.warning("replica %s %s; dropped", replica_id, why)
            if self.on_unreachable is not None:
                self.on_unreachable(replica_id)


async def _read_up_to(content: Any, limit: int) -> bytes:
    """The first `limit` bytes of a response body (all of it when shorter); the rest stays unread."""
    data = b""
    while len(data) < limit:
        chunk = await content.read(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


def unavailable_answer(name: str, known: ModelAvailability | None, now: float) -> tuple[str, bool]:
    """The 503 for model `name` without a ready replica: (message, whether a Retry-After is
    sent: only where waiting helps — a replica loading or restarting; a pending model waits for room
    an operator or a joining GPU makes, and a failed one for a fix)."""
    state = known.state if known else "loading"
    if state == "pending" and known is not None:
        since = ""
        if known.since is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(known.since))
            since = f" since {stamp} ({max(0.0, now - known.since):.0f}s)"
        message = (
            f"model {name} is pending: no replica is placed{since}: {known.detail or 'no room'}; it is placed "
            "when room appears (see GET /v1/deployments on the controller)"
        )
        return message, False
    if state == "failed" and known is not None:
        return f"model {name} has no ready replica: it failed: {known.detail or 'no reason given'}", False
    if state == "serving":  # the controller saw one ready: it restarted or was dropped since
        return f"model {name} has no ready replica right now (restarting); retry", True
    return f"model {name} has no ready replica yet: a replica is loading; retry", True


async def _end_broken(send: Send, replica_id: str, error: BaseException, streaming: bool) -> None:
    """End a response whose replica went away mid-answer so the client sees a failure, never a
    silent hang or a clean end: an SSE stream gets an OpenAI-shaped error event (OpenAI's clients
    raise on it); any other body is cut short, which no JSON parser accepts."""
    message = f"replica {replica_id} failed mid-response: {type(error).__name__}: {error}; retry the request"
    tail = b"data: " + error_body(502, message, "APIConnectionError") + b"\n\n" if streaming else b""
    try:
        await send({"type": "http.response.body", "body": tail, "more_body": False})
    except Exception as failure:  # the client left first: nothing to tell
        log.debug("could not end the broken response: %s", failure)


async def _refuse(send: Send, error: MediaRejected) -> None:
    await _respond(send, error.status, error_body(error.status, str(error), error.kind, error.param))


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _note_model(scope: dict[str, Any], model_id: str | None) -> None:
    """The model a request is counted under: its model_id, or one bucket for every unknown name."""
    exchange: Exchange | None = scope.get(EXCHANGE)
    if exchange is not None:
        exchange.model_id = UNKNOWN_MODEL if model_id is None else model_id


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "ray-vram"}


def exact_path(scope: dict[str, Any]) -> str:
    """The request's path as the client sent it (`raw_path`, without its query): uvicorn's `path` is
    percent-decoded, and `/v1/chat%2Fcompletions` must not become `/v1/chat/completions`."""
    raw = scope.get("raw_path")
    if raw is None:
        return scope["path"]
    return raw.split(b"?", 1)[0].decode("latin-1")


class _Tracked:
    """The ASGI send of one request, noting when its response has ended."""

    __slots__ = ("ended", "to")

    def __init__(self, send: Send):
        self.to = send
        self.ended = False

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.ended = True
        await self.to(message)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (its body was read before: only a disconnect comes now)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def cancelled_if_client_leaves(
    scope: dict[str, Any], receive: Receive, answer: Coroutine[Any, Any, None], tracked: _Tracked
) -> None:
    """Run `answer` (which sends through `tracked`) while watching the client: when it goes away before
    its response has ended,
    cancel `answer`, which closes the connection to the replica, and vLLM aborts the request (a stream
    or not: its server cancels a request whose client disconnects). uvicorn itself would let the
    answer run on, its sends dropped, to the last token."""
    work = asyncio.ensure_future(answer)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        watch.cancel()
        raise
    if watch in done and not work.done() and not tracked.ended:
        work.cancel()
        if (exchange := scope.get(EXCHANGE)) is not None and not exchange.status:
            exchange.status = CLIENT_LEFT_STATUS
    watch.cancel()
    await asyncio.wait({work})
    if not work.cancelled():
        work.result()


#: Answer header that closes the connection after a refusal (nothing more of its body is read).
CLOSE = (b"connection", b"close")


async def _respond(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- as a Ray Serve deployment ------------------------------------------------------------------


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port that every router replica on this node shares (SO_REUSEPORT:
    the kernel spreads new connections over the live ones; only processes of the same user may join)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, reuse_port=True, backlog=2048)


class RouterDeployment:
    """Runs `OpenAIRouter` on uvicorn at ServingSettings.host:port inside a Serve replica, routing by
    its copy of the endpoint board's table, which it follows (long-poll) for as long as it runs."""

    async def __init__(self, serving: dict[str, Any], *model_apps: Any):
        import uvicorn
        from ray import serve

        self.settings = ServingSettings.model_validate(serving)
        context = serve.get_replica_context()
        self.app = context.app_name
        metrics = RequestMetrics(context.deployment) if self.settings.engine_metrics else None
        self.router = OpenAIRouter(self.settings, on_unreachable=self._report_unreachable, metrics=metrics)
        # Requests are served on a loop of their own, apart from the one Serve calls methods on.
        self.requests = LoopThread("openai-router")
        # The whole table before the first request: a (re)started router knows every replica at once.
        table = EndpointTable.model_validate(await endpoint_board(self.app).table.remote())
        await self.requests.call(self._take(table))
        self.version = table.version
        self.server = uvicorn.Server(server_config(self.router, self.settings.client_timeout_s))
        self.sock = listen_socket(self.settings.host, self.settings.port)
        self.task = await self.requests.call(self._start())
        self.follower = asyncio.get_running_loop().create_task(self._follow())
        log.info("OpenAI endpoint listening on %s:%d", self.settings.host, self.settings.port)

    async def _take(self, table: EndpointTable) -> None:
        self.router.registry.sync(table)

    async def _start(self) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"OpenAI endpoint could not listen on {self.settings.host}:{self.settings.port}")
            await asyncio.sleep(0.02)
        return task

    async def _follow(self) -> None:
        """Take each new version of the board's table (the board answers a watch when it changes)."""
        fresh = False
        while True:
            try:
                raw = await endpoint_board(self.app, fresh).watch.remote(self.version, WATCH_TIMEOUT_S)
                table = EndpointTable.model_validate(raw)
                fresh = False
            except Exception as error:  # the board restarting: keep routing by the copy
                log.warning("endpoint board not reachable (%s); routing by the last table", error)
                fresh = True
                await asyncio.sleep(1)
                continue
            if table.version != self.version:
                self.requests.call_soon(self.router.registry.sync, table)
                self.version = table.version

    def _report_unreachable(self, replica_id: str) -> None:
        try:
            endpoint_board(self.app).unregister.remote(replica_id)
        except Exception as error:  # the replica announces itself again if it lives
            log.warning("could not tell the endpoint board about %s: %s", replica_id, error)

    async def endpoints(self) -> list[dict[str, Any]]:
        """This router's view: each replica's endpoint and its counts here."""
        return [
            r.endpoint.model_dump() | {"inflight": r.inflight, "served": r.served}
            for r in self.router.registry.replicas.values()
        ]

    async def check_health(self) -> None:
        if self.task.done():
            raise RuntimeError("the OpenAI endpoint's HTTP server stopped")

    async def __del__(self) -> None:
        self.follower.cancel()
        self.server.should_exit = True
        try:
            await self.requests.call(asyncio.wait_for(self.task, timeout=5))
        except Exception:
            self.requests.call_soon(self.task.cancel)
        await self.requests.call(self.router.close())
        if self.router.metrics is not None:
            self.requests.call_soon(self.router.metrics.flush)
        self.requests.stop()


def replicas_board(fresh: bool = False) -> Any:
    """The board a model replica announces itself on: the router application's."""
    return endpoint_board(ROUTER_APP, fresh)
