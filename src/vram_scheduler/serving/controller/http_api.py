"""The serving controller's HTTP API (a WSGI app: gunicorn in `ray-vram serve`, a thread in `up`).

Every route but /healthz (/metrics included) needs the controller token, and cross-site requests are
refused: `serving.controller.auth.GuardedApp` wraps this app in both. POST bodies must be application/json.

GET    /healthz                    liveness
GET    /metrics                    Prometheus (CONTRIBUTING.md "Serving controller")
GET    /v1/vram                    the allocator's VRAM state, per GPU
GET    /v1/deployments             every model with its replicas' state and placement
POST   /v1/deployments             a ModelSpec: plan and deploy/replace that model → 202 + plan,
                                   409 + reasons when nothing fits (nothing declared), 400 naming the
                                   bad field
DELETE /v1/deployments/{model_id}  shut one model down, free its reservations (idempotent)
DELETE /v1/deployments             every model
POST   /v1/deployments/{model_id}/sleep   put its awake replicas to sleep → 200 + each replica's state
POST   /v1/deployments/{model_id}/wake    wake its replicas (a cold start where stopped) → 200 + WakeReports;
                                   409 with the reason when one cannot (pinned, no room, wake failed)
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import ValidationError

from ...core.config import ConfigError, ModelSpec, describe_validation_error
from ...core.contract import DeployAnswer
from ...core.errors import Unplaceable, wake_failure
from .actor import ControllerClient

log = logging.getLogger(__name__)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS |= {409: "Conflict", 413: "Payload Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error"}
MAX_BODY_BYTES = 1 << 20


class _ControllerCollector:
    """Serving-controller metrics, computed at scrape time from the controller and the ledger."""

    def __init__(self, controller: ControllerClient):
        self.controller = controller

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        replicas = GaugeMetricFamily(
            "ray_vram_model_replicas", "Replicas per model by state", labels=["model_id", "state"]
        )
        for model in self.controller.status().models:
            # planned: replicas holding a place (any state but pending); running: ready; pending: no room.
            states = [r.state for r in model.replicas]
            pending = states.count("pending")
            replicas.add_metric([model.model_id, "planned"], len(states) - pending)
            replicas.add_metric([model.model_id, "running"], states.count("ready"))
            replicas.add_metric([model.model_id, "pending"], pending)
        yield replicas
        reconciles = CounterMetricFamily(
            "ray_vram_controller_reconciles", "Reconcile rounds by result", labels=["result"]
        )
        for result, count in self.controller.reconciles.items():
            reconciles.add_metric([result], count)
        yield reconciles
        state = self.controller.allocator.vram_state()
        per_node: dict[str, int] = {node.node: 0 for node in state.nodes}
        for gpu in state.gpus:
            per_node[gpu.node] = per_node.get(gpu.node, 0) + len(gpu.replicas)
        reservations = GaugeMetricFamily("ray_vram_allocator_reservations", "Reservations per node", labels=["node"])
        for node, count in sorted(per_node.items()):
            reservations.add_metric([node], count)
        yield reservations
        stale = GaugeMetricFamily("ray_vram_allocator_stale_nodes", "Nodes whose inventory is stale")
        stale.add_metric([], len(state.stale_nodes))
        yield stale


class ControllerAPI:
    """WSGI application over a `Controller`."""

    def __init__(self, controller: ControllerClient):
        self.controller = controller
        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(_ControllerCollector(controller))

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "/").rstrip("/") or "/"
        try:
            status, body, content_type = self._route(method, path, environ)
        except Exception as error:
            log.error("%s %s failed: %s", method, path, traceback.format_exc())
            status, body, content_type = 500, _json({"error": f"{type(error).__name__}: {error}"}), "application/json"
        start_response(
            f"{status} {_REASONS.get(status, '')}",
            [("Content-Type", content_type), ("Content-Length", str(len(body)))],
        )
        return [body]

    def _route(self, method: str, path: str, environ: dict[str, Any]) -> tuple[int, bytes, str]:
        if path == "/healthz":
            return 200, _json({"status": "ok"}), "application/json"
        if path == "/metrics" and method == "GET":
            return 200, generate_latest(self.metrics), "text/plain; version=0.0.4; charset=utf-8"
        if path == "/v1/vram" and method == "GET":
            return 200, _json(self.controller.allocator.vram_state().model_dump(mode="json")), "application/json"
        if path == "/v1/deployments":
            if method == "GET":
                return 200, _json(self.controller.status().model_dump(mode="json")), "application/json"
            if method == "POST":
                return self._post(environ)
            if method == "DELETE":
                return 200, _json({"removed": self.controller.remove_all()}), "application/json"
            return 405, _json({"error": f"{method} not allowed on {path}"}), "application/json"
        if path.startswith("/v1/deployments/") and path.endswith(("/sleep", "/wake")):
            model_id, action = path.removeprefix("/v1/deployments/").rsplit("/", 1)
            if method != "POST":
                return 405, _json({"error": f"{method} not allowed on {path}"}), "application/json"
            call = self.controller.sleep_model if action == "sleep" else self.controller.wake_model
            try:
                replicas = call(model_id)
            except KeyError as error:
                return 404, _json({"error": error.args[0]}), "application/json"
            except Exception as error:  # the replica's reason (never sleeps, no room to wake, failed)
                return 409, _json({"error": wake_failure(error), "model_id": model_id}), "application/json"
            answers = [r.model_dump(mode="json") for r in replicas]
            return 200, _json({"model_id": model_id, "replicas": answers}), "application/json"
        if path.startswith("/v1/deployments/"):
            model_id = path.removeprefix("/v1/deployments/")
            if method == "DELETE":
                removed = self.controller.remove(model_id)
                return 200, _json({"model_id": model_id, "removed": removed}), "application/json"
            return 405, _json({"error": f"{method} not allowed on {path}"}), "application/json"
        return 404, _json({"error": f"no route {method} {path}"}), "application/json"

    def _post(self, environ: dict[str, Any]) -> tuple[int, bytes, str]:
        content_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            # Browsers send text/plain and forms cross-site without a preflight; JSON needs one.
            error = f"POST /v1/deployments takes Content-Type application/json, not {content_type or 'none'!r}"
            return 415, _json({"error": error}), "application/json"
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length > MAX_BODY_BYTES:
            return 413, _json({"error": f"body of {length} bytes exceeds {MAX_BODY_BYTES}"}), "application/json"
        raw = environ["wsgi.input"].read(length) if length else b""
        try:
            data = json.loads(raw or b"null")
        except json.JSONDecodeError as error:
            return 400, _json({"error": f"body is not valid JSON: {error}"}), "application/json"
        if not isinstance(data, dict):
            return 400, _json({"error": "body must be a ModelSpec object"}), "application/json"
        try:
            spec = ModelSpec.model_validate(data)
        except ValidationError as error:
            problems = describe_validation_error(error)
            return 400, _json({"error": "invalid ModelSpec", "problems": problems}), "application/json"
        try:
            plan = self.controller.deploy(spec)
        except ConfigError as error:
            body = {"error": f"invalid ModelSpec: {error.source}", "problems": error.problems}
            return 400, _json(body), "application/json"
        except Unplaceable as error:
            body = {"error": str(error), "model_id": spec.model_id, "reasons": error.reasons}
            if spec.max_replicas:
                return 202, _json(body | {"plan": None}), "application/json"
            return 409, _json(body), "application/json"
        return 202, _json(DeployAnswer.of(spec.model_id, plan).model_dump(mode="json")), "application/json"


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()
