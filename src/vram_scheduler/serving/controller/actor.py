"""The one serving controller of a Ray cluster: a named, detached Ray actor, and a handle to it.

Every caller — `ray-vram serve` (the chart's controller pod), `ray-vram up`, the SDK on a Ray
address, the tests — gets the same actor (`ray-vram-controller` in namespace `ray-vram`,
created on first use with `get_if_exists`, placed on the head node like the allocator). Two
processes can therefore never converge the cluster against each other: every deploy, remove
and apply runs in that one actor, serialised by its lock, while status reads run alongside.

What the controller knows lives in Ray's GCS key-value store, not in the actor, so Ray restarts
it (forever) without losing a model. Replicas get the environment of the process that asked for
them (a token or cache path set in the controller pod), passed along with each deploy. The actor
also watches for nodes leaving the Ray cluster and moves their replicas (`Controller.repair`),
places pending replicas once room appears (`Controller.converge`: a model removed or scaled down,
a replica released, a GPU or node joining the inventory) and tells the routers why a model without
a ready replica cannot answer (`Controller.publish`), every `REPAIR_INTERVAL_S`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, TypeVar

import ray
from pydantic import BaseModel

from ...allocator.actor import AllocatorClient
from ...allocator.cluster_actors import cluster_actor
from ...core.config import ModelSpec, PlacementSettings, RayVRAMConfig, ServingSettings
from ...core.contract import ApplyResult, DeploymentList, Plan, SleepReport, WakeReport
from ...core.ray_names import CONTROLLER_ACTOR
from ...core.replica_env import replica_env
from .controller import Controller

#: Threads of the actor: one converges (behind the controller's lock); the rest answer status,
#: `wait_ready` and metrics scrapes meanwhile.
CONTROLLER_CONCURRENCY = 32
#: How often the actor looks for nodes that left the Ray cluster, for room for pending replicas,
#: and tells the routers each model's availability.
REPAIR_INTERVAL_S = 2.0

log = logging.getLogger(__name__)


class ControllerActor(Controller):
    """`Controller` as an actor: what a property or attribute gave in-process, a method gives here.
    Every method takes and returns models (`contract`, `config`); `ControllerClient` calls them."""

    def __init__(self, serving: ServingSettings | None = None):
        super().__init__(serving)
        self._stop = threading.Event()
        threading.Thread(target=self._repair_loop, name="controller-repair", daemon=True).start()

    def _repair_loop(self) -> None:
        while not self._stop.wait(REPAIR_INTERVAL_S):
            for step in (self.repair, self.converge, self.publish):
                try:
                    step()
                except Exception:  # keep watching whatever one round hit
                    log.exception("%s round failed", step.__name__)

    def ping(self) -> bool:
        return True

    def settings(self) -> ServingSettings:
        return self.serving

    def endpoint_url(self) -> str:
        return self.endpoint

    def reconcile_counts(self) -> dict[str, int]:
        return dict(self.reconciles)


def controller_actor(serving: ServingSettings | None = None) -> Any:
    """The cluster's controller actor, created if missing (`serving` only matters then: a running
    controller keeps its settings until `apply` gives it new ones). Race-safe."""
    return cluster_actor(
        ControllerActor, CONTROLLER_ACTOR, serving, max_concurrency=CONTROLLER_CONCURRENCY, retry_calls=False
    )


def _call(ref: Any) -> Any:
    """`ray.get`, raising what the controller raised (its own exception, not Ray's wrapper)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


_M = TypeVar("_M", bound=BaseModel)


def _typed(model: type[_M], answer: Any) -> _M:
    """The actor's answer as `model` (an actor from before the typed boundary answers dicts)."""
    return answer if isinstance(answer, model) else model.model_validate(answer)


class ControllerClient:
    """The controller's Python API (as `Controller`), each call made on the cluster's one actor and
    each answer a model; `allocator` is the ledger's typed client."""

    def __init__(self, serving: ServingSettings | None = None):
        self.actor = controller_actor(serving)
        self.allocator = AllocatorClient()

    @property
    def serving(self) -> ServingSettings:
        return _typed(ServingSettings, _call(self.actor.settings.remote()))

    @property
    def endpoint(self) -> str:
        return str(_call(self.actor.endpoint_url.remote()))

    @property
    def reconciles(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in _call(self.actor.reconcile_counts.remote()).items()}

    def apply(self, config: RayVRAMConfig) -> ApplyResult:
        return _typed(ApplyResult, _call(self.actor.apply.remote(config, replica_env())))

    def deploy(self, spec: ModelSpec, placement: PlacementSettings | None = None) -> Plan:
        return _typed(Plan, _call(self.actor.deploy.remote(spec, placement, replica_env())))

    def remove(self, model_id: str) -> bool:
        return bool(_call(self.actor.remove.remote(model_id)))

    def sleep_model(self, model_id: str) -> list[SleepReport]:
        return [_typed(SleepReport, r) for r in _call(self.actor.sleep_model.remote(model_id))]

    def wake_model(self, model_id: str) -> list[WakeReport]:
        return [_typed(WakeReport, r) for r in _call(self.actor.wake_model.remote(model_id))]

    def remove_all(self) -> list[str]:
        return [str(m) for m in _call(self.actor.remove_all.remote())]

    def shutdown(self) -> None:
        _call(self.actor.shutdown.remote())

    def status(self) -> DeploymentList:
        return _typed(DeploymentList, _call(self.actor.status.remote()))

    def wait_ready(self, model_ids: list[str] | None = None, timeout_s: float = 600) -> DeploymentList:
        return _typed(DeploymentList, _call(self.actor.wait_ready.remote(model_ids, timeout_s)))

    def converge(self) -> dict[str, list[str]]:
        """Place pending replicas where room appeared now: model id -> replica ids placed."""
        placed = _call(self.actor.converge.remote())
        return {str(k): [str(r) for r in v] for k, v in placed.items()}


#: The earlier name of `ControllerClient`.
ControllerHandle = ControllerClient
