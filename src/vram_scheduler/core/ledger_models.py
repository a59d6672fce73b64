"""What the ledger stores and exchanges: its entries, its snapshot, the delta a change leaves, and the
batch reserve's request and outcome. Pydantic models, so every boundary (the GCS, a Ray call) is
validated; kept apart from `ledger.py`, which holds the rules."""

from __future__ import annotations

from pydantic import Field

from .config import PlacementSettings, StrictModel
from .inventory import NodeInventory
from .planner import Reservation

SNAPSHOT_VERSION = 1
#: A Ray actor id: what an owner must be (`ray.get_runtime_context().get_actor_id()`).
ACTOR_ID_PATTERN = r"^[0-9a-f]{32}$"


class LedgerEntry(StrictModel):
    """One reservation plus what the ledger knows about the replica holding it."""

    reservation: Reservation
    owner: str | None = Field(default=None, description="Ray actor id (hex) of the replica; reclaimed when it dies.")
    pids: list[int] = Field(default_factory=list, description="Processes of the replica (managed, not unmanaged).")
    created_at: float


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
        for changes, target in (
            (self.nodes, snapshot.nodes),
            (self.entries, snapshot.entries),
            (self.startup_locks, snapshot.startup_locks),
        ):
            for key, value in changes.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value


class ReserveRequest(StrictModel):
    """One item of `reserve_many`: the arguments of one `reserve` call."""

    replica_id: str = Field(min_length=1)
    model_id: str = Field(min_length=1)
    bytes: int = Field(gt=0, description="The replica's budget; its overhead comes on top.")
    overhead_bytes: int | None = Field(default=None, ge=0, description="The model's overhead; None: the cluster's.")
    gpu_uuid: str | None = None
    owner: str | None = Field(default=None, pattern=ACTOR_ID_PATTERN, description="Ray actor id of the replica.")


class ReserveOutcome(StrictModel):
    """What `reserve_many` answers per item: the reservation, or why this item was refused."""

    replica_id: str
    reservation: Reservation | None = None
    error: str | None = None
