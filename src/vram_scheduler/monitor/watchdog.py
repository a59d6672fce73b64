"""Reservation versus actual, per replica: who uses how much of which GPU, and who stays over its
reservation (budget + the overhead it holds, `capacity`).

Pure logic on plain data (an inventory and the allocator's reservations); the service decides
what to do with a violation (metric, event log line, optional restart through Ray).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..core import capacity
from ..core.config import format_gib
from ..core.inventory import NodeInventory
from .pids import ProcessMatcher

#: NVML counts a replica's CUDA context and allocator growth against it while its budget does not
#: (real vLLM replicas peak 1.1 to 1.9 GiB over budget under load). Each reservation holds its
#: model's overhead for that beside the budget, so the watchdog flags use over the reservation;
#: the margin is extra tolerance beyond it, none by default.
DEFAULT_WATCHDOG_MARGIN_GB = 0.0


@dataclass(frozen=True)
class ReplicaBudget:
    """A reservation held by one replica, as the allocator reports it."""

    replica_id: str
    model_id: str
    gpu_uuid: str
    budget_bytes: int
    pids: tuple[int, ...] = ()
    owner: str | None = None
    overhead_bytes: int = 0
    state: str = "awake"
    held: int | None = None  # what it holds in its state (None: an older allocator's record, awake)

    @property
    def reservation_bytes(self) -> int:
        return capacity.reservation_bytes(self.budget_bytes, self.overhead_bytes)

    @property
    def held_bytes(self) -> int:
        """What it holds on its GPU now: its reservation awake, its sleeping footprint asleep, 0 stopped."""
        return self.reservation_bytes if self.held is None else self.held


@dataclass(frozen=True)
class ReplicaUsage:
    replica: ReplicaBudget
    node: str
    gpu_index: int
    used_bytes: int
    pids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Violation:
    usage: ReplicaUsage
    polls: int
    margin_bytes: int

    @property
    def excess_bytes(self) -> int:
        """How far over its reservation the replica is."""
        r = self.usage.replica
        return -capacity.headroom_bytes(self.usage.used_bytes, r.budget_bytes, r.overhead_bytes)

    def describe(self) -> str:
        r, u = self.usage.replica, self.usage
        return (
            f"replica {r.replica_id} of model {r.model_id} on node {u.node}, GPU {u.gpu_index} uses "
            f"{format_gib(u.used_bytes)} against a reservation of {format_gib(r.reservation_bytes)} "
            f"({format_gib(r.budget_bytes)} budget + {format_gib(r.overhead_bytes)} overhead): "
            f"{format_gib(self.excess_bytes)} over (margin {format_gib(self.margin_bytes)}) for {self.polls} polls "
            f"(pids {', '.join(map(str, u.pids)) or 'none'})"
        )


def measure(
    inventory: NodeInventory, replicas: Iterable[ReplicaBudget], matcher: ProcessMatcher
) -> tuple[list[ReplicaUsage], dict[str, int]]:
    """Each replica's NVML usage on its own GPU, and per GPU uuid the bytes held by managed processes.

    A replica without an attached pid (still starting) is measured as 0 bytes.
    """
    by_gpu: dict[str, list[ReplicaBudget]] = {}
    for replica in replicas:
        by_gpu.setdefault(replica.gpu_uuid, []).append(replica)
    usages: list[ReplicaUsage] = []
    managed: dict[str, int] = {}
    live: list[int] = []
    for gpu in inventory.gpus:
        here = by_gpu.get(gpu.uuid, [])
        registered = {pid: r.replica_id for r in here for pid in r.pids}
        used: dict[str, int] = {r.replica_id: 0 for r in here}
        pids: dict[str, list[int]] = {r.replica_id: [] for r in here}
        for process in gpu.processes:
            live.append(process.pid)
            owner = matcher.owner(process.pid, registered)
            if owner is not None:
                used[owner] += process.used_bytes
                pids[owner].append(process.pid)
        managed[gpu.uuid] = sum(used.values())
        usages.extend(ReplicaUsage(r, gpu.node, gpu.index, used[r.replica_id], tuple(pids[r.replica_id])) for r in here)
    matcher.forget_except(live)
    return usages, managed


class Watchdog:
    """Flags a replica whose usage exceeds its reservation + margin for `polls` consecutive polls.

    One violation per episode: the replica is reported when its streak reaches `polls`, and again
    only after it has come back within reservation + margin and gone over again.
    """

    def __init__(self, margin_bytes: int, polls: int):
        if margin_bytes < 0:
            raise ValueError(f"watchdog margin must be >= 0 bytes, got {margin_bytes}")
        if polls < 1:
            raise ValueError(f"watchdog polls must be >= 1, got {polls}")
        self.margin_bytes = margin_bytes
        self.polls = polls
        self._streaks: dict[str, int] = {}

    def streak(self, replica_id: str) -> int:
        return self._streaks.get(replica_id, 0)

    def observe(self, usages: Iterable[ReplicaUsage]) -> list[Violation]:
        violations = []
        seen = set()
        for usage in usages:
            key = usage.replica.replica_id
            seen.add(key)
            r = usage.replica
            if capacity.headroom_bytes(usage.used_bytes, r.budget_bytes, r.overhead_bytes) < -self.margin_bytes:
                self._streaks[key] = self._streaks.get(key, 0) + 1
                if self._streaks[key] == self.polls:
                    violations.append(Violation(usage, self.polls, self.margin_bytes))
            else:
                self._streaks.pop(key, None)
        for gone in [k for k in self._streaks if k not in seen]:
            del self._streaks[gone]
        return violations
