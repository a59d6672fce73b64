"""The same calls as `controller_http`, made through Ray on the cluster's one controller actor
(for a process that is, or may become, a Ray driver: `VRAMScheduler("host:6379")`)."""

from __future__ import annotations

from typing import Any

from .config import ConfigError, ModelSpec
from .contract import DeploymentList, DeploymentStatus, VRAMState
from .scheduler_errors import ControllerUnavailableError, PlacementError, SchedulerError


class RayControllerClient:
    """The same calls through Ray (address like ``ray.init``'s: ``host:6379``, ``ray://host:10001``,
    ``auto``), made on the cluster's one controller actor — never a second controller in this
    process. Imports Ray. Should no controller run yet, it starts with the serving settings the
    cluster stored, so the OpenAI router is left as it is."""

    def __init__(self, address: str):
        import ray

        from .allocator import NAMESPACE
        from .loopback import prepare_ray_join
        from .serving.controller import stored_serving_settings
        from .serving.controller_actor import ControllerHandle

        self.url = address
        try:
            if not ray.is_initialized():
                prepare_ray_join(address)
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ControllerUnavailableError(f"cannot join the Ray cluster at {address}: {error}") from None
        self.controller = ControllerHandle(stored_serving_settings())

    def close(self) -> None:
        """Leaves Ray connected: the caller may use it; `ray.shutdown()` disconnects."""

    def healthz(self) -> bool:
        import ray

        return ray.is_initialized()

    def vram(self) -> VRAMState:
        import ray

        return VRAMState.model_validate(ray.get(self.controller.allocator.get_vram_state.remote()))

    def deployments(self) -> list[DeploymentStatus]:
        return DeploymentList.model_validate(self.controller.status()).models

    def deploy(self, spec: ModelSpec, timeout_s: float | None = None) -> dict[str, Any]:
        from .serving.controller import Unplaceable

        try:
            plan = self.controller.deploy(spec)
        except Unplaceable as error:
            raise PlacementError(str(error), error.reasons, 0, spec.replicas) from None
        except ConfigError:
            raise
        except Exception as error:
            raise SchedulerError(f"{type(error).__name__}: {error}") from None
        return {
            "model_id": spec.model_id,
            "plan": {"replicas": [r.model_dump() for r in plan.replicas_of(spec.model_id)]},
        }

    def remove(self, model_id: str) -> bool:
        return self.controller.remove(model_id)

    def sleep(self, model_id: str) -> list[dict[str, Any]]:
        return self._sleep_or_wake(model_id, "sleep")

    def wake(self, model_id: str) -> list[dict[str, Any]]:
        return self._sleep_or_wake(model_id, "wake")

    def _sleep_or_wake(self, model_id: str, action: str) -> list[dict[str, Any]]:
        call = self.controller.sleep_model if action == "sleep" else self.controller.wake_model
        try:
            return call(model_id)
        except Exception as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise SchedulerError(f"{action} {model_id}: {lines[-1] if lines else type(error).__name__}") from None

    def remove_all(self) -> list[str]:
        return self.controller.remove_all()
