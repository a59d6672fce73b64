"""The same calls as `controller_http`, made through Ray on the cluster's one controller actor
(for a process that is, or may become, a Ray driver: `VRAMScheduler("host:6379")`)."""

from __future__ import annotations

import logging

from .config import ConfigError, ModelSpec
from .contract import DeployAnswer, DeploymentStatus, VRAMState
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
        from .serving.controller_actor import ControllerClient

        self.url = address
        try:
            if not ray.is_initialized():
                prepare_ray_join(address)
                ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise ControllerUnavailableError(f"cannot join the Ray cluster at {address}: {error}") from None
        self.controller = ControllerClient(stored_serving_settings())

    def close(self) -> None:
        """Leaves Ray connected: the caller may use it; `ray.shutdown()` disconnects."""

    def healthz(self) -> bool:
        import ray

        return ray.is_initialized()

    def vram(self) -> VRAMState:
        return self.controller.allocator.vram_state()

    def deployments(self) -> list[DeploymentStatus]:
        return self.controller.status().models

    def deploy(self, spec: ModelSpec, timeout_s: float | None = None) -> DeployAnswer:
        from .serving.controller import Unplaceable

        try:
            plan = self.controller.deploy(spec)
        except Unplaceable as error:
            raise PlacementError(str(error), error.reasons, 0, spec.replicas) from None
        except ConfigError:
            raise
        except Exception as error:
            raise SchedulerError(f"{type(error).__name__}: {error}") from None
        return DeployAnswer.of(spec.model_id, plan)

    def remove(self, model_id: str) -> bool:
        return self.controller.remove(model_id)

    def remove_all(self) -> list[str]:
        return self.controller.remove_all()
