"""The requests a replica's HTTP server is answering, counted until their last byte is sent.

vLLM's engine counts a request only between its admission and its last token: one still being
parsed, or a stream still being written to a slow router, is not in it. A replica going to sleep by
its idle timer, or draining before a sleep, looks at both, so it never cuts a request it took.
"""

from __future__ import annotations

from typing import Any


class RequestsInFlight:
    """ASGI wrapper counting the POST requests (the routed inference calls) in progress."""

    def __init__(self, app: Any):
        self.app = app
        self.count = 0

    def __getattr__(self, name: str) -> Any:  # `state`, ... of the wrapped app
        return getattr(self.app, name)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        self.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.count -= 1
