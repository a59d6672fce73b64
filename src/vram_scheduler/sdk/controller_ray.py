"""The same calls as `controller_http`, made through Ray on the cluster's one controller actor
(for a process that is, or may become, a Ray driver: `VRAMScheduler("host:6379")`).

The actors are found by name (`ray.get_actor`, `core.ray_names`) and answer with the contract's
models (`model_validate` also reads an older actor's dicts): no server module is imported here, so
a client needs Ray's client API and nothing of the serving code.
"""

from __future__ import annotations

import logging
from typing import Any

from ..core.config import ConfigError, ModelSpec
from ..core.contract import DeployAnswer, DeploymentList, DeploymentStatus, Plan, SleepReport, VRAMState, WakeReport
from ..core.errors import Unplaceable, wake_failure
from ..core.loopback import prepare_ray_join
from ..core.ray_names import ALLOCATOR_ACTOR, CONTROLLER_ACTOR, NAMESPACE
from ..core.replica_env import replica_env
from .scheduler_errors import ControllerUnavailableError, PlacementError, SchedulerError


def _call(ref: Any) -> Any:
    """`ray.get`, raising what the controller raised (its own exception, not Ray's wrapper)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise


class RayControllerClient:
    """The same calls through Ray (address like ``ray.init``'s: ``host:6379``, ``ray://host:10001``,
    ``auto``), made on the cluster's one controller actor — never a second controller in this
    process. Imports Ray. A cluster without a running controller (`ray-vram serve`, `ray-vram up`,
    the chart's controller) is refused with `ControllerUnavailableError`."""

    def __init__(self, address: str):
        import ray

        self.url = address
        try:
            if not ray.is_initialized():
                prepare_ray_join(address)
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ControllerUnavailableError(f"cannot join the Ray cluster at {address}: {error}") from None
        try:
            self.controller = ray.get_actor(CONTROLLER_ACTOR, namespace=NAMESPACE)
            self.allocator = ray.get_actor(ALLOCATOR_ACTOR, namespace=NAMESPACE)
        except ValueError:
            raise ControllerUnavailableError(
                f"no ray-vram controller runs on the Ray cluster at {address} (no actor {CONTROLLER_ACTOR!r} "
                f"in namespace {NAMESPACE!r}): start one with `ray-vram serve` or `ray-vram up`"
            ) from None

    def close(self) -> None:
        """Leaves Ray connected: the caller may use it; `ray.shutdown()` disconnects."""

    def healthz(self) -> bool:
        import ray

        return ray.is_initialized()

    def vram(self) -> VRAMState:
        return VRAMState.model_validate(_call(self.allocator.get_vram_state.remote()))

    def deployments(self) -> list[DeploymentStatus]:
        return DeploymentList.model_validate(_call(self.controller.status.remote())).models

    def deploy(self, spec: ModelSpec, timeout_s: float | None = None) -> DeployAnswer:
        try:
            plan = Plan.model_validate(_call(self.controller.deploy.remote(spec, None, replica_env())))
        except Unplaceable as error:
            raise PlacementError(str(error), error.reasons, 0, spec.replicas) from None
        except ConfigError:
            raise
        except Exception as error:
            raise SchedulerError(f"{type(error).__name__}: {error}") from None
        return DeployAnswer.of(spec.model_id, plan)

    def remove(self, model_id: str) -> bool:
        return bool(_call(self.controller.remove.remote(model_id)))

    def remove_all(self) -> list[str]:
        return [str(m) for m in _call(self.controller.remove_all.remote())]

    def sleep(self, model_id: str) -> list[SleepReport]:
        answers = self._sleep_or_wake(model_id, "sleep")
        return [SleepReport.model_validate(a) for a in answers]

    def wake(self, model_id: str) -> list[WakeReport]:
        answers = self._sleep_or_wake(model_id, "wake")
        return [WakeReport.model_validate(a) for a in answers]

    def _sleep_or_wake(self, model_id: str, action: str) -> list[Any]:
        method: Any = self.controller.sleep_model if action == "sleep" else self.controller.wake_model
        try:
            return list(_call(method.remote(model_id)))
        except KeyError as error:
            raise SchedulerError(f"{action} {model_id}: {error.args[0]}") from None
        except Exception as error:  # the replica's reason (never sleeps, no room, a failed wake)
            raise SchedulerError(f"{action} {model_id}: {wake_failure(error)}") from None
