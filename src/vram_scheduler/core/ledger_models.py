"""What the ledger stores and exchanges: its entries, its snapshot, and the delta a change leaves (the
batch reserve's request and outcome and a wake's outcome live in `contract`). Pydantic models, so
every boundary (the GCS) is validated; kept apart from `ledger.py`, which holds the rules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from pydantic import Field

from .config import PlacementSettings, StrictModel
from .contract import Reservation
from .inventory import NodeInventory

SNAPSHOT_VERSION = 1
_V = TypeVar("_V")


class LedgerEntry(StrictModel):
    """One reservation plus what the ledger knows about the replica holding it."""

    reservation: Reservation
    owner: str | None = Field(default=None, description="Ray actor id (hex) of the replica; reclaimed when it dies.")
    pids: list[int] = Field(default_factory=list, description="Processes of the replica (managed, not unmanaged).")
    created_at: float
    last_used_at: float | None = Field(
        default=None, description="When it last served a request (`touch`): the order a wake evicts in (LRU)."
    )

    @property
    def used_at(self) -> float:
        """When it was last used, or created (never used)."""
        return self.created_at if self.last_used_at is None else self.last_used_at


class NodeRecord(StrictModel):
    """A node's latest inventory and the last sign of life of its monitor."""

    inventory: NodeInventory
    arrived_at: float = Field(
        description="When the inventory, or a newer heartbeat of its monitor, arrived (by the ledger's clock)."
    )


class StartupLockHolder(StrictModel):
    replica_id: str
    owner: str | None = None
    since: float


class LedgerSnapshot(StrictModel):
    """Everything the allocator persists; reloaded when the actor restarts."""

    version: int = SNAPSHOT_VERSION
    settings: PlacementSettings = Field(default_factory=PlacementSettings)
    nodes: dict[str, NodeRecord] = Field(default_factory=dict)
    entries: dict[str, LedgerEntry] = Field(default_factory=dict)
    startup_locks: dict[str, StartupLockHolder] = Field(default_factory=dict, description="GPU uuid → holder.")


class LedgerDelta(StrictModel):
    """The keys changed since the last delta, each with its new value (None: removed).

    Values, not operations: applying a delta twice, or on a snapshot that already holds some of
    it, gives the same ledger; so a journal may overlap the snapshot it follows.
    """

    settings: PlacementSettings | None = None
    nodes: dict[str, NodeRecord | None] = Field(default_factory=dict)
    entries: dict[str, LedgerEntry | None] = Field(default_factory=dict)
    startup_locks: dict[str, StartupLockHolder | None] = Field(default_factory=dict)

    @property
    def size(self) -> int:
        """How many keys it sets or removes."""
        return len(self.nodes) + len(self.entries) + len(self.startup_locks) + (self.settings is not None)

    def apply_to(self, snapshot: LedgerSnapshot) -> None:
        if self.settings is not None:
            snapshot.settings = self.settings
        _apply(self.nodes, snapshot.nodes)
        _apply(self.entries, snapshot.entries)
        _apply(self.startup_locks, snapshot.startup_locks)


def _apply(changes: Mapping[str, _V | None], target: dict[str, _V]) -> None:
    """Set each changed key, remove each one changed to None."""
    for key, value in changes.items():
        if value is None:
            target.pop(key, None)
        else:
            target[key] = value
