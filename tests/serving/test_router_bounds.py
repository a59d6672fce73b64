"""The router's data path on real HTTP servers (no Ray, no vLLM: the engine is not under test here):
`OpenAIRouter` on uvicorn with the configuration its Serve deployment uses (`http_limits.server_config`),
in front of an aiohttp server in a replica's place that records what reaches it. Requests are
written on raw sockets, so each path and each byte of a body goes out exactly as written.

Covers: exact routes only (no trailing slash, `..`, double slash, percent-encoding, other vLLM
routes; no redirect followed), the internal key on every forwarded request, body limits answered
413 before the body is sent, slow bodies 408, slow or huge headers, and a client that goes away
closing the connection to the replica, and vLLM's answer for a dead engine sent on to another replica.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import orjson
import pytest
import uvicorn
from aiohttp import web
from waiting import wait_until

from vram_scheduler.core.config import GIB, ServingSettings
from vram_scheduler.core.contract import EndpointTable, MediaAccepts, ReplicaEndpoint
from vram_scheduler.serving.internal_key import INTERNAL_KEY_ENV, internal_key
from vram_scheduler.serving.replica.loop_thread import LoopThread
from vram_scheduler.serving.router.http_limits import MAX_HEADER_BYTES, MIB, server_config
from vram_scheduler.serving.router.router import OpenAIRouter

#: The upload limit of the test's model (media.max_item_mb as bytes).
ITEM_BYTES = 1000


@dataclass
class Replica:
    """What reached the server in the replica's place."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # method, path, headers
    left: asyncio.Event | None = None  # set when a client of a held request is gone
    failed: set[str] = field(default_factory=set)  # the `fail_once` requests answered 500 already


@dataclass
class Running:
    port: int
    replica: Replica
    router: OpenAIRouter
    loop: LoopThread

    def wait_left(self, timeout_s: float = 60) -> bool:
        """Whether the replica saw its client (the router) go away, waiting up to `timeout_s`."""

        async def wait() -> bool:
            assert self.replica.left is not None
            try:
                await asyncio.wait_for(self.replica.left.wait(), timeout_s)
                return True
            except TimeoutError:
                return False

        return asyncio.run_coroutine_threadsafe(wait(), self.loop.loop).result()


def replica_app(replica: Replica) -> web.Application:
    async def record(request: web.Request) -> None:
        replica.requests.append((request.method, request.raw_path, dict(request.headers)))

    async def completions(request: web.Request) -> web.StreamResponse:
        await record(request)
        body = await request.json()
        if body.get("stream"):  # an endless stream: ends only when the router closes the connection
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            try:
                while True:
                    await response.write(b'data: {"choices":[{"text":"x"}]}\n\n')
                    await asyncio.sleep(0.05)
            except (ConnectionResetError, ConnectionError):
                assert replica.left is not None
                replica.left.set()
                raise
        fail = body.get("fail_once")  # a 500 the first time: vLLM's words for a dead engine, or others
        if fail and fail["id"] not in replica.failed:
            replica.failed.add(fail["id"])
            error = {"message": fail["message"], "type": "InternalServerError", "param": None, "code": 500}
            return web.json_response({"error": error}, status=500)
        if body.get("hold"):  # an answer that never comes: waits for the connection to close
            while request.transport is not None and not request.transport.is_closing():  # None once closed
                await asyncio.sleep(0.02)
            assert replica.left is not None
            replica.left.set()
            return web.Response(status=499)
        return web.json_response({"choices": [], "echo": body})

    async def redirect(request: web.Request) -> web.StreamResponse:
        await record(request)
        raise web.HTTPTemporaryRedirect("/v1/elsewhere")

    async def anything(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.json_response({"reached": request.raw_path})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", redirect)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


@contextmanager
def running(client_timeout_s: float = 60, max_body_mb: float = 1.0, replicas: int = 1) -> Iterator[Running]:
    """The router on uvicorn (as deployed) and a replica's stand-in behind it, on one loop thread;
    `replicas` > 1: that many replicas of model m on the board (m-0, m-1, ...), all at the stand-in."""
    loop = LoopThread("router-bounds")
    replica = Replica()
    settings = ServingSettings(
        host="127.0.0.1", api_key_env=None, client_timeout_s=client_timeout_s, max_body_mb=max_body_mb
    )
    router = OpenAIRouter(settings)

    async def start() -> tuple[web.AppRunner, uvicorn.Server, asyncio.Task[None], int]:
        replica.left = asyncio.Event()
        runner = web.AppRunner(replica_app(replica))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        endpoint = ReplicaEndpoint(
            replica_id="m-0",
            model_id="m",
            names=["m"],
            url=url,
            max_ongoing_requests=8,
            node="n",
            gpu_uuid="GPU-x",
            gpu_index=0,
            bytes=GIB,
            pids=[1],
            max_tokens=7,
            tasks=["generate", "transcription"],
            media=MediaAccepts(items_per_prompt={"audio": 1}, max_item_bytes=ITEM_BYTES),
        )
        endpoints = [endpoint.model_copy(update={"replica_id": f"m-{i}"}) for i in range(replicas)]
        router.registry.sync(EndpointTable(version=1, endpoints=endpoints))
        sock = socket.create_server(("127.0.0.1", 0))
        server = uvicorn.Server(server_config(router, client_timeout_s))
        task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        return runner, server, task, sock.getsockname()[1]

    async def stop(runner: web.AppRunner, server: uvicorn.Server, task: asyncio.Task[None]) -> None:
        server.should_exit = True
        await task
        await router.close()
        await runner.cleanup()

    runner, server, task, port = asyncio.run_coroutine_threadsafe(start(), loop.loop).result(60)
    try:
        yield Running(port, replica, router, loop)
    finally:
        asyncio.run_coroutine_threadsafe(stop(runner, server, task), loop.loop).result(60)
        loop.stop()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(60)  # a hang fails the test instead of blocking it
    return sock


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status and headers of a response, and what came of its body with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body (by Content-Length, chunked, or up to the close) of one response."""
    status, headers, body = read_head(sock)

    def more() -> bytes:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed mid-body: {body!r}")
        return chunk

    if headers.get("transfer-encoding") == "chunked":
        data, body = body, b""
        while True:
            while b"\r\n" not in data:
                data += more()
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line, 16)
            while len(data) < size + 2:
                data += more()
            if size == 0:
                return status, headers, body
            body, data = body + data[:size], data[size + 2 :]
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def post(path: str, body: bytes, content_type: str = "application/json", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nhost: router\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def request(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(port) as sock:
        sock.sendall(data)
        return read_response(sock)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed the connection (EOF or reset) after its answer."""
    try:
        return sock.recv(65536) == b""
    except ConnectionError:
        return True


COMPLETION = orjson.dumps({"model": "m", "prompt": "x"})


# -- exact routes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/completions/",
        "/v1/chat/completions/",
        "/v1/../v1/completions",
        "/v1/x/../completions",
        "/v1/./completions",
        "//v1/completions",
        "/v1//completions",
        "/v1/%63ompletions",
        "/v1/chat%2Fcompletions",
        "/v1/completions%2F",
        "/V1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/tokenize",
        "/v1/load_lora_adapter",
        "/health",
        "/metrics",
        "/v1/audio/transcriptions/",
    ],
)
def test_only_exact_routes_reach_a_replica(path: str) -> None:
    with running() as served:
        status, _, body = request(served.port, post(path, COMPLETION))
        assert status == 404, body
        assert "no route" in orjson.loads(body)["error"]["message"]
        assert served.replica.requests == []


def test_exact_routes_carry_the_internal_key_and_redirects_are_not_followed() -> None:
    with running() as served:
        status, headers, body = request(served.port, post("/v1/completions?x=1", COMPLETION))
        assert status == 200 and orjson.loads(body)["echo"]["model"] == "m"
        assert headers["x-ray-vram-replica"] == "m-0"
        chat = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]})
        status, _, _ = request(served.port, post("/v1/chat/completions", chat))
        assert status == 307  # passed on as the replica answered, never followed
        reached = [(method, path) for method, path, _ in served.replica.requests]
        assert reached == [("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]
        key = internal_key()
        assert all(headers["Authorization"] == f"Bearer {key}" for _, _, headers in served.replica.requests)
        for method in ("GET", "PUT", "DELETE"):
            status, _, _ = request(served.port, f"{method} /v1/completions HTTP/1.1\r\nhost: r\r\n\r\n".encode())
            assert status == 404
        assert len(served.replica.requests) == 2


def test_a_router_without_the_internal_key_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from vram_scheduler.serving.internal_key import InternalKeyMissing

    monkeypatch.delenv(INTERNAL_KEY_ENV)
    with pytest.raises(InternalKeyMissing, match=f"{INTERNAL_KEY_ENV} is not set on this router's node"):
        OpenAIRouter(ServingSettings(host="127.0.0.1", api_key_env=None))
    monkeypatch.setenv(INTERNAL_KEY_ENV, "short")
    with pytest.raises(InternalKeyMissing, match="is 5 characters, fewer than 16"):
        OpenAIRouter(ServingSettings(host="127.0.0.1", api_key_env=None))


# -- request bodies ----------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_sent() -> None:
    """300 MiB announced, nothing of it sent: the 413 comes at once and the connection closes."""
    with running(max_body_mb=1.0) as served, connect(served.port) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n"
            b"content-length: 314572800\r\n\r\n"
        )
        status, headers, body = read_response(sock)
        error = orjson.loads(body)["error"]
        assert status == 413 and error["type"] == "RequestTooLargeError", body
        assert "300.00 MiB (Content-Length) is over the 1.00 MiB limit of POST /v1/completions" in error["message"]
        assert "serving.max_body_mb" in error["message"] and "by 299.00 MiB" in error["message"]
        assert headers["connection"] == "close" and closed_by_server(sock)
        assert served.replica.requests == []


def test_a_chunked_body_is_refused_once_it_passes_the_limit() -> None:
    """A chunked body without an end: the 413 comes while the client is still sending."""
    with running(max_body_mb=1.0) as served, connect(served.port) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * (256 * 1024)
        for _ in range(5):  # 1.25 MiB, then no terminating chunk
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, _, body = read_response(sock)
        assert status == 413, body
        message = orjson.loads(body)["error"]["message"]
        assert "passed the 1.00 MiB limit of POST /v1/completions (serving.max_body_mb)" in message
        assert served.replica.requests == []


def test_an_upload_is_bounded_by_its_models_item_size_plus_a_form() -> None:
    with running(max_body_mb=64.0) as served:
        limit = ITEM_BYTES + MIB
        head = (
            "POST /v1/audio/transcriptions HTTP/1.1\r\nhost: r\r\n"
            f"content-type: multipart/form-data; boundary=b\r\ncontent-length: {limit + 1}\r\n\r\n"
        )
        status, _, body = request(served.port, head.encode())
        message = orjson.loads(body)["error"]["message"]
        assert status == 413 and "over the 1.00 MiB limit of POST /v1/audio/transcriptions" in message
        assert "media.max_item_mb" in message and served.replica.requests == []


def test_a_body_sent_too_slowly_gets_408() -> None:
    with running(client_timeout_s=1.0) as served, connect(served.port) as sock:
        sock.sendall(post("/v1/completions", COMPLETION)[: -len(COMPLETION) + 3])  # 3 bytes of the body, then nothing
        status, headers, body = read_response(sock)
        message = orjson.loads(body)["error"]["message"]
        assert status == 408 and "not complete within 1 s (serving.client_timeout_s)" in message, body
        assert headers["connection"] == "close" and closed_by_server(sock)
        assert served.replica.requests == []


# -- headers -----------------------------------------------------------------------------------------


def test_headers_sent_too_slowly_get_408_and_a_closed_connection() -> None:
    with running(client_timeout_s=1.0) as served:
        with connect(served.port) as idle:  # connects, sends nothing
            status, _, _ = read_response(idle)
            assert status == 408 and closed_by_server(idle)
        with connect(served.port) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: r\r\n")  # headers never end
            status, _, _ = read_response(slow)
            assert status == 408 and closed_by_server(slow)
        assert request(served.port, post("/v1/completions", COMPLETION))[0] == 200  # others still served


def test_headers_over_the_limit_get_431() -> None:
    with running() as served, connect(served.port) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: r\r\nx-big: ")
        try:
            for _ in range(MAX_HEADER_BYTES // 4096 + 2):
                sock.sendall(b"y" * 4096)
        except ConnectionError:
            pass  # closed by the server mid-send: its answer is still there to read
        status, _, body = read_response(sock)
        assert status == 431 and b"request headers over" in body
        assert served.replica.requests == []


# -- a client that goes away -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["stream", "hold"])
def test_a_client_that_goes_away_closes_the_connection_to_the_replica(kind: str) -> None:
    """The replica's side sees its connection close (which is what makes vLLM abort: see
    test_data_path.py for the engine itself), and the router counts the request no longer."""
    with running() as served:
        with connect(served.port) as sock:
            sock.sendall(post("/v1/completions", orjson.dumps({"model": "m", "prompt": "x", kind: True})))
            if kind == "stream":
                assert read_head(sock)[0] == 200  # the head and the first events
            else:
                # Unanswered there: the replica holds it.
                wait_until(lambda: bool(served.replica.requests), 60, "the request at the replica", every_s=0.02)
        assert served.wait_left(), "the router kept the replica's connection open after its client left"

        async def inflight() -> int:
            return served.router.registry.replicas["m-0"].inflight

        wait_until(
            lambda: asyncio.run_coroutine_threadsafe(inflight(), served.loop.loop).result() == 0,
            60,
            "the router idle",
            every_s=0.02,
        )


# -- a replica whose engine died under a request -----------------------------------------------------

ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."


def test_vllms_answer_for_a_dead_engine_goes_to_another_replica_and_other_500s_reach_the_client() -> None:
    """A non-streamed request on a replica whose engine died gets vLLM's 500 with `EngineDeadError`'s
    words (seen in tests/serving/test_faults.py's engine fault). Nothing was generated, so the
    router sends it to another replica of the model and drops the dead one; any other 500 is the
    replica's answer and reaches the client as it is."""
    with running(replicas=2) as run:
        dead = orjson.dumps({"model": "m", "prompt": "x", "fail_once": {"id": "a", "message": ENGINE_DEAD}})
        status, headers, body = request(run.port, post("/v1/completions", dead))
        assert status == 200, body
        assert headers["x-ray-vram-attempts"] == "2" and len(run.replica.requests) == 2
        assert len(run.router.registry.ready("m", set())) == 1  # the dead one is off the table

        other = orjson.dumps({"model": "m", "prompt": "x", "fail_once": {"id": "b", "message": "a bug"}})
        status, headers, body = request(run.port, post("/v1/completions", other))
        assert status == 500 and orjson.loads(body)["error"]["message"] == "a bug"
        assert headers["x-ray-vram-attempts"] == "1"
