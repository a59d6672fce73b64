"""The cluster's internal key: what a replica's HTTP server requires of every request.

A replica's vLLM server listens on its node's address (the pod IP on Kubernetes), where any pod
can reach it. Without a credential anyone there could skip the router, its API key and its media
checks. So every replica answers 401 to a request that does not carry the cluster's internal key
(`Authorization: Bearer <key>`), on every path, health and metrics included (nothing but the
router calls a replica over HTTP; Serve checks a replica's health through Ray), and the router
adds the key to each request it forwards.

The key comes from the environment of the Ray node (`INTERNAL_KEY_ENV`), which every process of
the node inherits: on Kubernetes the chart sets it on every Ray container from a Secret; local mode
makes one per run (`ensure_internal_key`) before Ray starts. It never travels through a Ray
runtime env (those are stored in the GCS in plain text; see `core.replica_env`). A replica or router
on a node without it refuses to start (`InternalKeyMissing`) rather than serve open.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import MutableMapping
from typing import Any

from ..core.errors import RayVramError
from ..core.replica_env import INTERNAL_KEY_ENV

#: Shortest key accepted: 16 characters (`ensure_internal_key` makes 64 hex digits).
MIN_KEY_LENGTH = 16
_UNAUTHORISED = (
    b'{"error":{"message":"this is a ray-vram replica: send requests to the OpenAI endpoint (the router)",'
    b'"type":"AuthenticationError","param":null,"code":401}}'
)


class InternalKeyMissing(RayVramError, RuntimeError):
    """No usable internal key on this node: a replica would serve anyone who reaches its port."""


def internal_key(environ: MutableMapping[str, str] = os.environ, where: str = "this node") -> str:
    """The cluster's internal key from `environ`; InternalKeyMissing naming the variable and the fix."""
    key = environ.get(INTERNAL_KEY_ENV, "").strip()
    if len(key) >= MIN_KEY_LENGTH:
        return key
    problem = "is not set" if not key else f"is {len(key)} characters, fewer than {MIN_KEY_LENGTH}"
    raise InternalKeyMissing(
        f"{INTERNAL_KEY_ENV} {problem} on {where}: replicas refuse to serve without the cluster's internal "
        "key. Set the same random value on every Ray node (the Helm chart does, from its Secret; "
        f"`ray-vram up` makes one), e.g. `export {INTERNAL_KEY_ENV}=$(openssl rand -hex 32)` before `ray start`"
    )


def ensure_internal_key(environ: MutableMapping[str, str] = os.environ) -> str:
    """The internal key in `environ`, made (64 random hex digits) when unset: for a cluster whose every
    process descends from this one (local mode), called before Ray starts."""
    if not environ.get(INTERNAL_KEY_ENV, "").strip():
        environ[INTERNAL_KEY_ENV] = secrets.token_hex(32)
    return internal_key(environ)


def authorization(key: str) -> str:
    """The header value the router sends with the key."""
    return f"Bearer {key}"


class InternalKeyGuard:
    """ASGI wrapper: every HTTP request and websocket without `Authorization: Bearer <key>` gets 401
    (compared in constant time) before the wrapped app sees it; lifespan messages pass."""

    def __init__(self, app: Any, key: str):
        self.app = app
        self._expected = authorization(key).encode("latin-1")

    def __getattr__(self, name: str) -> Any:  # `state`, ... of the wrapped app
        return getattr(self.app, name)

    def allows(self, scope: dict[str, Any]) -> bool:
        given = b""
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                given = value
                break
        return hmac.compare_digest(given, self._expected)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self.allows(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": _UNAUTHORISED})
