"""The serving controller's HTTP API, from the client side: typed calls, and errors that name the
URL and the controller's own reason. Needs only httpx, so a laptop drives a remote cluster."""

from __future__ import annotations

from typing import Any

import httpx

from ..core.config import ConfigError, ModelSpec
from ..core.contract import DeployAnswer, DeploymentList, DeploymentStatus, SleepReport, VRAMState, WakeReport
from .scheduler_errors import ControllerAuthError, ControllerUnavailableError, PlacementError, SchedulerError
from .token import auth_headers, where_to_find_token

#: Longest a sleep or wake call waits for the controller (a wake of a stopped replica loads its model).
WAKE_TIMEOUT_S = 900.0

CONTROLLER_ENV = "RAY_VRAM_CONTROLLER"
DEFAULT_CONTROLLER = "http://127.0.0.1:8080"


class HTTPControllerClient:
    """Thin typed calls to the serving controller; errors name the URL and the controller's reason.
    `token`: the controller token (default: $RAY_VRAM_CONTROLLER_TOKEN, else the local token file)."""

    def __init__(self, url: str, timeout_s: float = 30.0, token: str | None = None):
        self.url = url.rstrip("/")
        self._client = httpx.Client(base_url=self.url, timeout=timeout_s, headers=auth_headers(token))

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ControllerUnavailableError(
                f"serving controller at {self.url} did not answer {method} {path}: {type(error).__name__}: {error}. "
                f"Is `ray-vram up` or `ray-vram serve` running? (set ${CONTROLLER_ENV} or pass address=)"
            ) from None
        if response.status_code in {401, 403}:
            data = _safe_json(response)
            hint = data.get("hint") if isinstance(data, dict) else None
            where = f"The controller says the token is in {hint}. " if hint else ""
            raise ControllerAuthError(
                f"serving controller at {self.url} refused {method} {path} (HTTP {response.status_code}): "
                f"{_reason(response)}. {where}To call it, {where_to_find_token()}"
            )
        return response

    def _json(self, response: httpx.Response, what: str) -> Any:
        if response.status_code >= 400:
            raise SchedulerError(f"{what} at {self.url} failed (HTTP {response.status_code}): {_reason(response)}")
        return response.json()

    def healthz(self) -> bool:
        return self._call("GET", "/healthz").status_code == 200

    def vram(self) -> VRAMState:
        return VRAMState.model_validate(self._json(self._call("GET", "/v1/vram"), "GET /v1/vram"))

    def deployments(self) -> list[DeploymentStatus]:
        data = self._json(self._call("GET", "/v1/deployments"), "GET /v1/deployments")
        return DeploymentList.model_validate(data).models

    def deploy(self, spec: ModelSpec, timeout_s: float | None = None) -> DeployAnswer:
        """POST a model; the controller may hold the request until its replicas started."""
        extra = {"timeout": timeout_s} if timeout_s is not None else {}
        body = spec.model_dump(mode="json", exclude={"replicas"} if spec.max_replicas else None)
        response = self._call("POST", "/v1/deployments", json=body, **extra)
        if response.status_code == 409:
            reasons = _reasons(response)
            raise PlacementError(
                f"model {spec.model_id!r} does not fit: " + "; ".join(reasons), reasons, 0, spec.replicas
            )
        if response.status_code in {400, 422}:
            data = _safe_json(response)
            problems = data.get("problems") if isinstance(data, dict) else None
            raise ConfigError(f"model {spec.model_id!r} (refused by {self.url})", problems or [_reason(response)])
        return DeployAnswer.model_validate(self._json(response, f"POST /v1/deployments ({spec.model_id})"))

    def remove(self, model_id: str) -> bool:
        response = self._call("DELETE", f"/v1/deployments/{model_id}")
        if response.status_code == 404:
            return False
        data = self._json(response, f"DELETE /v1/deployments/{model_id}")
        return bool(data.get("removed", True)) if isinstance(data, dict) else True

    def sleep(self, model_id: str) -> list[SleepReport]:
        return [SleepReport.model_validate(a) for a in self._sleep_or_wake(model_id, "sleep")]

    def wake(self, model_id: str) -> list[WakeReport]:
        return [WakeReport.model_validate(a) for a in self._sleep_or_wake(model_id, "wake")]

    def _sleep_or_wake(self, model_id: str, action: str) -> list[Any]:
        path = f"/v1/deployments/{model_id}/{action}"
        response = self._call("POST", path, timeout=WAKE_TIMEOUT_S)
        if response.status_code in {404, 409}:
            raise SchedulerError(f"{action} {model_id}: {_reason(response)}")
        data = self._json(response, f"POST {path}")
        return list(data.get("replicas", [])) if isinstance(data, dict) else []

    def remove_all(self) -> list[str]:
        data = self._json(self._call("DELETE", "/v1/deployments"), "DELETE /v1/deployments")
        return list(data.get("removed", [])) if isinstance(data, dict) else []


def _reason(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(data, dict):
        if isinstance(data.get("problems"), list):
            return f"{data.get('error', 'invalid')}: " + "; ".join(str(p) for p in data["problems"])
        error = data.get("error", data)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or error.get("reasons") or error)
        return str(error)
    return str(data)


def _safe_json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _reasons(response: httpx.Response) -> list[str]:
    try:
        data = response.json()
    except ValueError:
        return [response.text[:500]]
    for holder in (data, data.get("error") if isinstance(data, dict) else None):
        if isinstance(holder, dict) and isinstance(holder.get("reasons"), list):
            return [str(r) for r in holder["reasons"]]
    return [_reason(response)]
