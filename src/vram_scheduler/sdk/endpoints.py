"""Where a model is served: the base URL (ending in /v1) of the OpenAI endpoint that lists it.

In order: the ``base_url`` argument, ``$RAY_VRAM_ENDPOINT``, the serving controller
(``$RAY_VRAM_CONTROLLER``, default ``http://127.0.0.1:8080``) which names each model's endpoint,
then Ray Serve's status through the Ray dashboard (``$RAY_VRAM_DASHBOARD``, default
``http://127.0.0.1:8265``); each candidate is checked against its ``/v1/models`` so a request goes
where the model is actually served. Found endpoints are remembered for a short while.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import httpx

from ..core.contract import DeploymentList
from .controller_http import CONTROLLER_ENV, DEFAULT_CONTROLLER
from .inference_errors import EndpointNotFoundError
from .token import auth_headers as controller_auth_headers

ENDPOINT_ENV = "RAY_VRAM_ENDPOINT"
DASHBOARD_ENV = "RAY_VRAM_DASHBOARD"
API_KEY_ENV = "RAY_VRAM_API_KEY"
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"


class _EndpointCache:
    """Base URLs (ending in /v1) per model name, remembered for a short while."""

    ttl_s = 30.0

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> str | None:
        with self._lock:
            entry = self._entries.get(model)
        if entry and time.monotonic() - entry[0] < self.ttl_s:
            return entry[1]
        return None

    def put(self, model: str, base_url: str) -> None:
        with self._lock:
            self._entries[model] = (time.monotonic(), base_url)

    def forget(self, model: str | None = None) -> None:
        with self._lock:
            if model is None:
                self._entries.clear()
            else:
                self._entries.pop(model, None)


_endpoints = _EndpointCache()


def forget_endpoints(model: str | None = None) -> None:
    """Drop remembered endpoints (after a redeploy moved a model)."""
    _endpoints.forget(model)


def auth_headers(api_key: str | None) -> dict[str, str]:
    """The endpoint's API key (`api_key`, else ``$RAY_VRAM_API_KEY``) as a bearer header."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def as_v1(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def _local_host(host: str) -> str:
    return "127.0.0.1" if host in {"0.0.0.0", "::", "", "localhost"} else host


def candidates_from_controller(client: httpx.Client, controller: str, model: str) -> list[str]:
    """Endpoints the controller names: the one serving `model` (id or alias) first."""
    response = client.get(f"{controller.rstrip('/')}/v1/deployments", headers=controller_auth_headers())
    response.raise_for_status()
    found: list[str] = []
    for entry in DeploymentList.model_validate(response.json()).models:
        if entry.endpoint and (entry.serves(model) or not found):
            found.insert(0 if entry.serves(model) else len(found), entry.endpoint)
    return found


def _candidates_from_serve(client: httpx.Client, dashboard: str) -> list[str]:
    response = client.get(f"{dashboard.rstrip('/')}/api/serve/applications/")
    response.raise_for_status()
    status = response.json()
    options = status.get("http_options") or {}
    port = options.get("port")
    if not port:
        return []
    host = _local_host(str(options.get("host") or "127.0.0.1"))
    found = []
    for app in (status.get("applications") or {}).values():
        prefix = (app.get("route_prefix") or "/").rstrip("/")
        if app.get("status") == "RUNNING" and app.get("route_prefix") is not None:
            found.append(f"http://{host}:{port}{prefix}")
    return found


def _serves(client: httpx.Client, base_url: str, model: str, headers: dict[str, str]) -> bool:
    response = client.get(f"{base_url}/models", headers=headers)
    if response.status_code != 200:
        return False
    return any(item.get("id") == model for item in response.json().get("data", []))


def resolve_endpoint(model: str, base_url: str | None = None, api_key: str | None = None) -> str:
    """The base URL (ending in /v1) of the endpoint that serves `model`.

    An explicit `base_url` or ``$RAY_VRAM_ENDPOINT`` is trusted as is; otherwise the controller
    and Ray Serve's status are asked, and each candidate must list the model in /v1/models.
    """
    explicit = base_url or os.environ.get(ENDPOINT_ENV)
    if explicit:
        return as_v1(explicit)
    cached = _endpoints.get(model)
    if cached:
        return cached
    controller = os.environ.get(CONTROLLER_ENV, DEFAULT_CONTROLLER)
    dashboard = os.environ.get(DASHBOARD_ENV, DEFAULT_DASHBOARD)
    tried: list[str] = []
    with httpx.Client(timeout=5.0) as client:
        sources: list[tuple[str, Callable[[], list[str]]]] = [
            (f"controller {controller}", lambda: candidates_from_controller(client, controller, model)),
            (f"Ray Serve status at {dashboard}", lambda: _candidates_from_serve(client, dashboard)),
        ]
        for source, lookup in sources:
            try:
                candidates = [as_v1(c) for c in lookup()]
            except (httpx.HTTPError, ValueError) as error:
                tried.append(f"{source}: {type(error).__name__}: {error}")
                continue
            for candidate in candidates:
                try:
                    if _serves(client, candidate, model, auth_headers(api_key)):
                        _endpoints.put(model, candidate)
                        return candidate
                except (httpx.HTTPError, ValueError) as error:
                    tried.append(f"{candidate}: {type(error).__name__}: {error}")
                    continue
                tried.append(f"{candidate} (from {source}) does not serve {model!r}")
            if not candidates:
                tried.append(f"{source}: no endpoints listed")
    raise EndpointNotFoundError(
        f"no endpoint serves model {model!r}; tried: " + "; ".join(tried) + f". Deploy it, or set ${ENDPOINT_ENV}",
        model=model,
    )
