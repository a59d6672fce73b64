"""Bounds on what an HTTP client may send the router or a replica, and for how long.

uvicorn alone bounds neither: a connection may take forever to send its headers (its keep-alive
timeout only runs between requests), a header may grow without limit, and an app that reads a
body reads all of it. One slow or huge client per connection could then hold a router, or fill its
memory, and the routers run on the head by default. So:

- headers: the server (`server_config`, its protocol `bounded_protocol`) closes a connection
  whose request headers are not complete within `client_timeout_s` of its opening (or of the
  request's first byte, on a kept-alive connection) with 408, and one whose headers pass
  `MAX_HEADER_BYTES` with 431;
- bodies: `read_body` refuses (`BodyRefused`) a body over its limit with 413 before reading it
  (Content-Length) or as soon as the bytes read pass the limit (chunked), and a body not complete
  within `client_timeout_s` with 408. Both answers close the connection, so nothing more of the
  body is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from ...core.errors import RayVramError

MIB = 1024**2
#: Most bytes of request line and headers a connection may send before its headers are complete.
MAX_HEADER_BYTES = 64 * 1024
#: Seconds a kept-alive connection may stay idle between requests (uvicorn's timeout_keep_alive).
KEEP_ALIVE_S = 30

Receive = Callable[[], Awaitable[dict[str, Any]]]


class BodyRefused(RayVramError, ValueError):
    """A request body that is too large (413) or too slow (408); the message names the limit."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)

    @property
    def kind(self) -> str:
        """The OpenAI error `type`."""
        return "RequestTooLargeError" if self.status == 413 else "RequestTimeoutError"


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:.2f} MiB"


def content_length(scope: dict[str, Any]) -> int | None:
    """The request's Content-Length, None when it sends none (chunked) or an unreadable one."""
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_body(scope: dict[str, Any], receive: Receive, limit: int, timeout_s: float, what: str) -> bytes:
    """The whole request body, at most `limit` bytes, within `timeout_s`; `what` names the limit in
    the refusal (e.g. "POST /v1/completions (serving.max_body_mb)")."""
    declared = content_length(scope)
    if declared is not None and declared > limit:
        raise BodyRefused(
            413,
            f"request body of {_mib(declared)} (Content-Length) is over the {_mib(limit)} limit of {what} "
            f"by {_mib(declared - limit)}",
        )
    chunks: list[bytes] = []
    size = 0

    async def gather() -> None:
        nonlocal size
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionResetError("client left while sending its body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyRefused(
                    413, f"request body passed the {_mib(limit)} limit of {what} ({_mib(size)} read so far)"
                )
            chunks.append(chunk)
            if not message.get("more_body"):
                return

    try:
        await asyncio.wait_for(gather(), timeout_s)
    except TimeoutError:
        raise BodyRefused(
            408,
            f"request body not complete within {timeout_s:g} s (serving.client_timeout_s): {_mib(size)} of "
            f"{_mib(declared) if declared is not None else 'an unknown size'} received",
        ) from None
    return b"".join(chunks)


def bounded_protocol(header_timeout_s: float, max_header_bytes: int = MAX_HEADER_BYTES) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing connections whose headers come too slowly (408) or
    grow too large (431) before the app sees the request."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None
            self._header_bytes = 0

        def _await_headers(self) -> None:
            if self._header_timer is None:
                self._header_bytes = 0
                self._header_timer = self.loop.call_later(header_timeout_s, self._refuse, 408, "headers too slow")

        def _headers_done(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _refuse(self, status: int, reason: str) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            message = reason.encode()
            self.transport.write(
                STATUS_LINE[status]
                + b"content-type: text/plain; charset=utf-8\r\ncontent-length: "
                + str(len(message)).encode()
                + b"\r\nconnection: close\r\n\r\n"
                + message
            )
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._await_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._headers_done()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            waiting = self._header_timer is not None
            super().data_received(data)
            if waiting and self._header_timer is not None:  # headers still not complete
                self._header_bytes += len(data)
                if self._header_bytes > max_header_bytes:
                    self._headers_done()
                    self._refuse(431, f"request headers over {max_header_bytes} bytes")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._await_headers()  # the next request of a kept-alive connection

        def on_headers_complete(self) -> None:
            self._headers_done()
            super().on_headers_complete()

    return BoundedHttpToolsProtocol


def server_config(app: Any, client_timeout_s: float) -> Any:
    """The uvicorn configuration of the router's and the replicas' HTTP servers (quiet, no lifespan)."""
    import uvicorn

    return uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http=bounded_protocol(client_timeout_s),
        timeout_keep_alive=KEEP_ALIVE_S,
    )
