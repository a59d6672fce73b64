"""`VRAMScheduler`: deploy, inspect and shut down models on a ray-vram cluster from Python.

It talks to the serving controller's HTTP API (``/v1/deployments``, ``/v1/vram``), the same
API the CLI uses, so a laptop can drive a remote cluster with nothing but ``httpx``. Every
deploy is planned first against the allocator's current VRAM state with the pure planner:
when not every replica fits, nothing is deployed (unless ``max_replicas``) and the error says
how many fit and why. Then it waits, showing each replica go reserved → loading → ready.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from rich.console import Console

from ..core import capacity
from ..core.config import ConfigError, ModelSpec, describe_validation_error, format_gib
from ..core.contract import DeploymentStatus, Plan, ReplicaStatus, Reservation, SleepReport, VRAMState, WakeReport
from ..core.inventory import GPUInfo, Inventory, NodeInventory
from ..core.model_limits import resolve_overheads
from ..core.planner import plan
from .controller_http import CONTROLLER_ENV, DEFAULT_CONTROLLER, HTTPControllerClient
from .controller_ray import RayControllerClient
from .deploy_progress import DeployProgress
from .display import render_vram, wide_console
from .scheduler_errors import (
    ControllerAuthError,
    ControllerUnavailableError,
    DeploymentError,
    PlacementError,
    SchedulerError,
    exit_code_for,
)

__all__ = [
    "CONTROLLER_ENV",
    "DEFAULT_CONTROLLER",
    "ControllerAuthError",
    "ControllerUnavailableError",
    "DeployProgress",
    "DeployResult",
    "DeploymentError",
    "PlacementError",
    "SchedulerError",
    "VRAMScheduler",
    "exit_code_for",
    "model_spec",
    "plan_on_state",
]


# --------------------------------------------------------------------------- typed answers


class DeployResult(DeploymentStatus):
    """What `deploy_model` returns: every replica with its node and GPU, and what did not fit."""

    def summary(self) -> str:
        where = ", ".join(f"{r.replica_id} on {r.where}" for r in self.replicas) or "no replicas"
        text = f"{self.model_id}: {len(self.replicas)} replica(s) {'ready' if self.ready else 'not ready'} ({where})"
        if self.unplaced:
            text += "; not placed: " + "; ".join(self.unplaced)
        return text


# --------------------------------------------------------------------------- planning against live state


def plan_on_state(state: VRAMState, specs: Sequence[ModelSpec]) -> Plan:
    """Plan `specs` against the allocator's state: their own replicas are kept or released,
    everything else on a GPU (other models' reservations, unmanaged memory) is taken as used. Each
    model's overhead is resolved from the files this machine sees (`model_limits.resolve_overheads`)."""
    planned = {spec.model_id for spec in specs}
    settings = state.settings
    nodes: dict[str, list[GPUInfo]] = {}
    existing: list[Reservation] = []
    for gpu in state.gpus:
        own = [r for r in gpu.replicas if r.model_id in planned]
        held = sum(capacity.reservation_bytes(r.bytes, capacity.held_overhead(r.overhead_bytes, settings)) for r in own)
        taken = gpu.total_bytes - gpu.free_bytes - held
        nodes.setdefault(gpu.node, []).append(
            GPUInfo(
                node=gpu.node,
                index=gpu.index,
                uuid=gpu.uuid,
                name=gpu.name,
                total_bytes=gpu.total_bytes,
                used_bytes=min(max(taken, 0), gpu.total_bytes),
                healthy=gpu.healthy,
            )
        )
        existing += [
            Reservation(
                replica_id=r.replica_id,
                model_id=r.model_id,
                node=gpu.node,
                gpu_uuid=gpu.uuid,
                gpu_index=gpu.index,
                bytes=r.bytes,
                overhead_bytes=capacity.held_overhead(r.overhead_bytes, settings),
                cap_bytes=r.cap_bytes,
            )
            for r in own
        ]
    inventory = Inventory(nodes=[NodeInventory(node=name, gpus=gpus) for name, gpus in nodes.items()])
    return plan(
        inventory,
        specs,
        existing=existing,
        settings=settings,
        excluded_nodes=frozenset(state.stale_nodes),
        overheads={k: v.bytes for k, v in resolve_overheads(specs, settings).items()},
    )


def model_spec(
    model_id: str,
    model_name: str,
    vram_gb: float,
    replicas: int | None = None,
    max_replicas: bool = False,
    router_name: str | None = None,
    max_model_len: int | None = None,
    max_tokens: int = 256,
    gpu_type: str | None = None,
    **engine_kwargs: Any,
) -> ModelSpec:
    """A `ModelSpec` from keyword arguments, through the one schema; `ConfigError` names bad fields."""
    data: dict[str, Any] = {
        "model_id": model_id,
        "model": model_name,
        "vram_gb": vram_gb,
        "max_replicas": max_replicas,
        "router_name": router_name,
        "max_model_len": max_model_len,
        "max_tokens": max_tokens,
        "gpu_type": gpu_type,
        "engine_kwargs": engine_kwargs,
    }
    if replicas is not None:
        data["replicas"] = replicas
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"model {model_id!r}", describe_validation_error(error)) from None


# --------------------------------------------------------------------------- the SDK


class VRAMScheduler:
    """Drive a ray-vram cluster: deploy models by VRAM, see where they landed, shut them down.

    `address` is the serving controller's URL (``http://host:8080``), or a Ray address
    (``host:6379``, ``ray://host:10001``, ``auto``) to drive the cluster in-process through Ray;
    by default ``$RAY_VRAM_CONTROLLER`` or the local one (``http://127.0.0.1:8080``, `ray-vram up`).
    `token` is the controller token (default ``$RAY_VRAM_CONTROLLER_TOKEN``, else the file `ray-vram up`
    keeps in ``~/.config/ray-vram/controller-token``); a refused call raises `ControllerAuthError`
    saying where to find it.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        console: Console | None = None,
        timeout_s: float = 30.0,
        token: str | None = None,
    ):
        address = (address or os.environ.get(CONTROLLER_ENV) or DEFAULT_CONTROLLER).rstrip("/")
        self.address = address
        self.api: HTTPControllerClient | RayControllerClient
        if address.startswith(("http://", "https://")):
            self.api = HTTPControllerClient(address, timeout_s=timeout_s, token=token)
        else:
            self.api = RayControllerClient(address)
        self.console = console or Console(stderr=True)

    def __enter__(self) -> VRAMScheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.api.close()

    # -- reading ----------------------------------------------------------------------------

    def get_vram_state(self) -> VRAMState:
        """The allocator's ledger per GPU (typed; `.model_dump()` for JSON)."""
        return self.api.vram()

    def deployments(self) -> list[DeploymentStatus]:
        return self.api.deployments()

    def deployment(self, model_id: str) -> DeploymentStatus:
        for status in self.deployments():
            if status.serves(model_id):
                return status
        known = ", ".join(s.model_id for s in self.deployments()) or "none"
        raise SchedulerError(f"model {model_id!r} is not deployed at {self.address}; deployed: {known}")

    def display_vram_state(self, console: Console | None = None) -> VRAMState:
        """Print the VRAM table (per node and GPU) and the deployments; returns the state shown."""
        state = self.get_vram_state()
        (console or wide_console()).print(render_vram(state, self.deployments()))
        return state

    def plan(self, specs: Sequence[ModelSpec]) -> Plan:
        """Where `specs` would go now, without deploying anything."""
        return plan_on_state(self.get_vram_state(), specs)

    # -- changing ---------------------------------------------------------------------------

    def deploy_model(
        self,
        model_id: str,
        model_name: str,
        vram_gb: float,
        replicas: int = 1,
        max_replicas: bool = False,
        router_name: str | None = None,
        max_model_len: int | None = None,
        max_tokens: int = 256,
        *,
        gpu_type: str | None = None,
        wait: bool = True,
        timeout_s: float = 900.0,
        progress: bool = True,
        **vllm_kwargs: Any,
    ) -> DeployResult:
        """Deploy `replicas` replicas of `model_name` as `model_id`, each with `vram_gb` GiB of VRAM.

        Raises `ConfigError` for invalid fields, `PlacementError` when not every replica fits
        (nothing is deployed; with `max_replicas` as many as fit are), and `DeploymentError`
        when a replica fails or the replicas are not ready within `timeout_s`.
        """
        spec = model_spec(
            model_id,
            model_name,
            vram_gb,
            None if max_replicas else replicas,
            max_replicas,
            router_name,
            max_model_len,
            max_tokens,
            gpu_type,
            **vllm_kwargs,
        )
        return self.deploy(spec, wait=wait, timeout_s=timeout_s, progress=progress)[0]

    def deploy(
        self,
        specs: ModelSpec | Sequence[ModelSpec],
        *,
        wait: bool = True,
        timeout_s: float = 900.0,
        progress: bool = True,
    ) -> list[DeployResult]:
        """Deploy several models (e.g. a values file's): all are planned together first."""
        specs = [specs] if isinstance(specs, ModelSpec) else list(specs)
        planned = self._check_fits(specs)
        deadline = time.monotonic() + timeout_s
        with DeployProgress(self.console, enabled=progress) as view:
            for spec in specs:
                self._submit(spec, planned, view, deadline)
            if not wait:
                return [DeployResult.model_validate(self.deployment(s.model_id).model_dump()) for s in specs]
            return self._wait_ready([s.model_id for s in specs], view, deadline, timeout_s)

    def _check_fits(self, specs: list[ModelSpec]) -> Plan:
        result = self.plan(specs)
        strict = [u for u in result.unplaced if not _spec(specs, u.model_id).max_replicas]
        empty = [s for s in specs if s.max_replicas and not result.replicas_of(s.model_id)]
        if not strict and not empty:
            return result
        reasons = [u.reason for u in strict]
        reasons += [
            f"model {s.model_id} (max_replicas) fits nowhere: needs {format_gib(s.vram_bytes)} per replica "
            "plus overhead" + "".join(f"; {u.reason}" for u in result.unplaced if u.model_id == s.model_id)
            for s in empty
        ]
        requested = sum(s.replicas for s in specs if not s.max_replicas)
        placed = sum(len(result.replicas_of(s.model_id)) for s in specs if not s.max_replicas)
        raise PlacementError(
            f"not everything fits: {placed} of {requested} replica(s) would be placed, so nothing was deployed:\n"
            + "\n".join(f"  - {r}" for r in reasons),
            reasons,
            placed,
            requested,
        )

    def _submit(self, spec: ModelSpec, planned: Plan, view: DeployProgress, deadline: float) -> None:
        """POST the model; while the controller works on it, show progress from the plan and the ledger."""
        outcome: dict[str, BaseException | None] = {}

        def post() -> None:
            try:
                self.api.deploy(spec, timeout_s=max(deadline - time.monotonic(), 1.0))
                outcome["error"] = None
            except BaseException as error:
                outcome["error"] = error

        thread = threading.Thread(target=post, name=f"deploy-{spec.model_id}", daemon=True)
        thread.start()
        while thread.is_alive():
            with contextlib.suppress(SchedulerError):
                view.update(self._observe(spec, planned))
            thread.join(timeout=0.5)
            if time.monotonic() > deadline:
                raise DeploymentError(f"the controller at {self.address} did not accept {spec.model_id} in time")
        error = outcome.get("error")
        if isinstance(error, SchedulerError) and not isinstance(error, PlacementError | ControllerUnavailableError):
            raise DeploymentError(f"model {spec.model_id} failed to deploy: {error}") from None
        if error is not None:
            raise error

    def _observe(self, spec: ModelSpec, planned: Plan) -> DeploymentStatus:
        """The model as the controller lists it, or, before it does, its planned replicas with the
        ones already holding a reservation in the ledger shown as loading."""
        for status in self.deployments():
            if status.model_id == spec.model_id:
                return status
        held = {
            r.replica_id: (gpu, r)
            for gpu in self.get_vram_state().gpus
            for r in gpu.replicas
            if r.model_id == spec.model_id
        }
        replicas = []
        for reservation in planned.replicas_of(spec.model_id):
            gpu, entry = held.get(reservation.replica_id, (None, None))
            replicas.append(
                ReplicaStatus(
                    replica_id=reservation.replica_id,
                    state="loading" if entry else "reserved",
                    node=gpu.node if gpu else reservation.node,
                    gpu_index=gpu.index if gpu else reservation.gpu_index,
                    gpu_uuid=gpu.uuid if gpu else reservation.gpu_uuid,
                    bytes=entry.bytes if entry else reservation.bytes,
                )
            )
        return DeploymentStatus(
            model_id=spec.model_id,
            model=spec.model,
            vram_gb=spec.vram_gb,
            requested=None if spec.max_replicas else spec.replicas,
            replicas=replicas,
        )

    def wait_ready(
        self, model_ids: Sequence[str], *, timeout_s: float = 900.0, progress: bool = True
    ) -> list[DeployResult]:
        """Wait until every replica of `model_ids` is ready; show each replica's state as it changes."""
        with DeployProgress(self.console, enabled=progress) as view:
            return self._wait_ready(list(model_ids), view, time.monotonic() + timeout_s, timeout_s)

    def _wait_ready(
        self, model_ids: list[str], view: DeployProgress, deadline: float, timeout_s: float
    ) -> list[DeployResult]:
        while True:
            current = {s.model_id: s for s in self.deployments() if s.model_id in model_ids}
            for model_id in model_ids:
                if model_id in current:
                    view.update(current[model_id])
            results = [DeployResult.model_validate(current[m].model_dump()) for m in model_ids if m in current]
            failed = [(res, r) for res in results for r in res.replicas if r.state == "failed"]
            if failed:
                result, replica = failed[0]
                raise DeploymentError(
                    f"replica {replica.replica_id} of model {result.model_id} failed on {replica.where}: "
                    f"{replica.error or 'no reason given'}",
                    result,
                )
            if len(results) == len(model_ids) and all(r.ready for r in results):
                return results
            if time.monotonic() > deadline:
                waiting = [f"{r.replica_id} ({r.state})" for res in results for r in res.replicas if r.state != "ready"]
                missing = [m for m in model_ids if m not in current]
                raise DeploymentError(
                    f"not ready after {timeout_s:.0f}s: "
                    + ", ".join(waiting + [f"{m} (not listed by the controller)" for m in missing]),
                    results[0] if results else None,
                )
            time.sleep(0.5)

    def shutdown(self, model_id: str | None = None) -> list[str]:
        """Shut down one model (or all with None) and free its reservations; idempotent.

        Returns the model ids that were removed (empty when there was nothing to remove).
        """
        if model_id is None:
            return self.api.remove_all()
        return [model_id] if self.api.remove(model_id) else []

    def sleep(self, model_id: str) -> list[SleepReport]:
        """Put every awake replica of a model to sleep now (its sleeping footprint stays reserved;
        on CPU its engine stops); each replica's `SleepReport` (the state it went to). Raises
        `SchedulerError` naming why not (an unknown model, or one that never sleeps: pinned, or no
        sleep policy)."""
        return self.api.sleep(model_id)

    def wake(self, model_id: str) -> list[WakeReport]:
        """Wake every replica of a model now (a cold start where stopped), evicting idle replicas
        that sleep where room is short; each replica's `WakeReport` (seconds, cold, evicted).
        Raises `SchedulerError` naming why not (no room without a busy or pinned replica, a failed wake)."""
        return self.api.wake(model_id)


def _spec(specs: list[ModelSpec], model_id: str) -> ModelSpec:
    return next(s for s in specs if s.model_id == model_id)


def as_json(value: BaseModel | Sequence[BaseModel]) -> Any:
    """Pydantic answers as plain JSON-ready data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return [item.model_dump(mode="json") for item in value]
