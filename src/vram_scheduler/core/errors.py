"""The one base of every error ray-vram raises on purpose.

`except RayVramError` catches any of them; each specific error also keeps its former base
(ValueError, RuntimeError), so existing `except ValueError` clauses still catch it.
"""

from __future__ import annotations


class RayVramError(Exception):
    """Base of ray-vram's own errors; the message names what, where and by how much."""


class Unplaceable(RayVramError, RuntimeError):
    """Nothing of a model fits (and it does not ask for max_replicas): the planner's reasons."""

    def __init__(self, model_id: str, reasons: list[str]):
        self.model_id = model_id
        self.reasons = reasons
        super().__init__(f"model {model_id}: nothing placed: " + "; ".join(reasons))

    def __reduce__(self) -> tuple[type[Unplaceable], tuple[str, list[str]]]:
        # Picklable with its fields: it crosses from the controller actor to its callers.
        return (type(self), (self.model_id, self.reasons))


#: What a wake refused by the ledger (no room now: the replicas there are busy or pinned) says; a
#: wake that failed (the engine did not start) says "wake failed" instead.
WAKE_REFUSED = ": cannot wake: "


class ReplicaWakeError(RayVramError, RuntimeError):
    """A sleeping or stopped replica could not wake (or sleep); the message says why, and for a
    failed wake that its engine is stopped and its reservation freed (the next wake starts it again)."""


def wake_failure(error: BaseException) -> str:
    """A replica's own reason for a failed wake or sleep (`ReplicaWakeError`), without the remote
    traceback Ray and Serve put around it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "ReplicaWakeError: " in line:
            return line.split("ReplicaWakeError: ", 1)[1]
    return lines[-1] if lines else type(error).__name__
