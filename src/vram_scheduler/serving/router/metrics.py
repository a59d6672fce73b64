"""The routers' request metrics, recorded through Ray's metrics API: each Ray node's metrics agent
exports them (Ray puts `ray_` before each name), on the port the chart's scrape objects read.

The routers answer HTTP themselves, so Serve's own request counters never see a request; these
count every request a router answers (its own refusals included: 401, 400, 404, 429, 503, media
checks) by model, route, HTTP status code and router, and time the requests it sends on to a
replica. Label values are bounded: a model name no router serves counts as `UNKNOWN_MODEL`, a
request naming none as `NO_MODEL`, a path outside `ROUTES` as route `other`.

Per request the counter costs a dict update: counts are summed here and handed to Ray once a
second (Ray's agent exports every few seconds anyway); the latency histograms are recorded as they
happen (about 7 µs of CPU each, in Ray's C++ core, measured in a Ray worker on a 2-core machine).
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Any

#: Series names as Prometheus shows them (what the dashboards and docs name).
REQUESTS = "ray_vram_router_requests_total"
DURATION = "ray_vram_router_request_duration_seconds"
FIRST_BYTE = "ray_vram_router_time_to_first_byte_seconds"
#: Every series name the three metrics give in Prometheus.
SERIES = frozenset({REQUESTS, *(f"{h}_{s}" for h in (DURATION, FIRST_BYTE) for s in ("bucket", "sum", "count"))})

#: `model_id` of a request naming a model no router serves (a client's typo must not make a series).
UNKNOWN_MODEL = "(unknown)"
#: `model_id` of a request that names no model (`/v1/models`, a body without one, a refused API key).
NO_MODEL = "(none)"
#: `route` label per path; any other path is `other`. `/v1/models/<name>` counts as `models`.
ROUTES = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/audio/transcriptions": "transcriptions",
    "/v1/audio/translations": "translations",
    "/v1/models": "models",
}
#: Status of a response cut short after its status went out (its replica failed mid-answer): the
#: code of the error event the router ends a stream with.
BROKEN_STATUS = 502
#: Status of a request whose client went away before any answer (nginx's "client closed request"):
#: the router cancelled it, and its replica aborted the generation.
CLIENT_LEFT_STATUS = 499
#: Latency buckets (seconds): from a short answer to a long generation, up to the default request timeout.
BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
#: Seconds counts are summed before they go to Ray.
FLUSH_S = 1.0


def route_of(path: str) -> str:
    route = ROUTES.get(path)
    if route is not None:
        return route
    return "models" if path.startswith("/v1/models/") else "other"


class Exchange:
    """One request as the metrics see it: the router notes its model and whether it went to a
    replica; `send` (the ASGI send it is handed instead of uvicorn's) notes the status and the
    first body byte."""

    __slots__ = ("_send", "first_byte_at", "forwarded", "model_id", "started", "status", "streamed")

    def __init__(self, send: Any):
        self._send = send
        self.started = perf_counter()
        self.model_id = NO_MODEL
        self.status = 0
        self.first_byte_at = 0.0
        self.forwarded = False
        self.streamed = False

    async def send(self, message: dict[str, Any]) -> None:
        if not self.first_byte_at:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message.get("body"):
                self.first_byte_at = perf_counter()
        await self._send(message)


class RequestMetrics:
    """A router's three metrics (`router`: its Serve deployment's name). Used from the router's
    event loop only."""

    def __init__(self, router: str, flush_s: float = FLUSH_S):
        from ray.util.metrics import Counter, Histogram

        self.router = router
        self.flush_s = flush_s
        self.requests = Counter(
            REQUESTS.removeprefix("ray_").removesuffix("_total"),
            "Requests a ray-vram router answered, by model, route and HTTP status code.",
            ("model_id", "route", "code", "router"),
        )
        timed = ("model_id", "route", "router")
        self.duration = Histogram(
            DURATION.removeprefix("ray_"),
            "Seconds from a request's arrival at a router to the end of its response (requests sent to a replica).",
            BUCKETS,
            timed,
        )
        self.first_byte = Histogram(
            FIRST_BYTE.removeprefix("ray_"),
            "Seconds from a request's arrival at a router to the first byte of its streamed (SSE) body.",
            BUCKETS,
            timed,
        )
        self._pending: dict[tuple[str, str, int], int] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timed_tags: dict[tuple[str, str], dict[str, str]] = {}

    def record(self, exchange: Exchange, route: str) -> None:
        """Count a finished request, and time it if a replica was asked."""
        status = exchange.status or 500  # nothing sent: the server answers 500 for the app
        key = (exchange.model_id, route, status)
        self._pending[key] = self._pending.get(key, 0) + 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_s, self.flush)
        if exchange.forwarded:
            tags = self._timed_tags.get(key[:2])
            if tags is None:
                tags = self._timed_tags[key[:2]] = {"model_id": key[0], "route": route, "router": self.router}
            self.duration.observe(perf_counter() - exchange.started, tags)
            if exchange.streamed and exchange.first_byte_at:
                self.first_byte.observe(exchange.first_byte_at - exchange.started, tags)

    def flush(self) -> None:
        """Hand the summed counts to Ray (by the timer `record` sets, and when the router stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for (model_id, route, status), count in pending.items():
            tags = {"model_id": model_id, "route": route, "code": str(status), "router": self.router}
            self.requests.inc(count, tags)
