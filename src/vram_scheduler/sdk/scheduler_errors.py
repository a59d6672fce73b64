"""What the SDK and the CLI raise when a cluster operation does not succeed, and the CLI's exit
code for each (one place, so `deploy`, `status` and `shutdown` agree)."""

from __future__ import annotations

from ..core.contract import DeploymentStatus
from ..core.errors import RayVramError
from ..core.exit_codes import ExitCode


class SchedulerError(RayVramError, RuntimeError):
    """A cluster operation that did not succeed."""


class ControllerUnavailableError(SchedulerError):
    """The serving controller did not answer."""


class ControllerAuthError(SchedulerError):
    """The serving controller refused the call (401/403): no token, a wrong one, or a cross-site request."""


class PlacementError(SchedulerError):
    """Not every requested replica fits (nothing was deployed, unless `max_replicas`)."""

    def __init__(self, message: str, reasons: list[str], placed: int = 0, requested: int = 0):
        self.reasons = reasons
        self.placed = placed
        self.requested = requested
        super().__init__(message)


class DeploymentError(SchedulerError):
    """A replica failed to start, or did not become ready in time."""

    def __init__(self, message: str, result: DeploymentStatus | None = None):
        self.result = result
        super().__init__(message)


def exit_code_for(error: SchedulerError) -> ExitCode:
    """CLI exit codes: UNPLACED when not everything fits, FAILURE for any other runtime failure."""
    return ExitCode.UNPLACED if isinstance(error, PlacementError) else ExitCode.FAILURE
