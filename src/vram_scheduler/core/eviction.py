"""Which replicas sleep so that another may wake, and how deep each one sleeps. Pure, so the
ledger's sleep and wake (and their tests) share one rule.

- A replica put to sleep sleeps at its model's level while its GPU holds fewer sleepers than
  `placement.sleep.max_asleep_per_gpu`; beyond that, or on a host-memory pseudo-GPU (no sleep
  mode), it is stopped.
- At level 1 its weights go to host RAM: while the node's level-1 sleepers leave room for them
  (`placement.sleep.level1_host_gb_per_node`), else it sleeps at level 2.
- A wake short of room puts the least recently used awake replicas of its GPU to sleep first, then
  stops the least recently used sleepers (those it just put to sleep included); pinned replicas
  (no sleep terms) and replicas with requests in flight are never chosen. Either the whole need
  is met or nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .capacity import ReplicaLife
from .config import SleepLevel


@dataclass(frozen=True)
class Candidate:
    """A replica a wake may evict: unpinned, idle, on the waking replica's GPU."""

    replica_id: str
    state: ReplicaLife
    last_used_at: float
    held_bytes: int
    sleep_bytes: int
    host_bytes: int
    level: SleepLevel


@dataclass(frozen=True)
class Eviction:
    """One replica leaving `awake` or `asleep` so a wake fits: where it goes and at what level."""

    replica_id: str
    to: ReplicaLife
    level: SleepLevel | None
    frees_bytes: int


@dataclass(frozen=True)
class SleepTarget:
    """Where a replica put to sleep ends up."""

    state: ReplicaLife
    level: SleepLevel | None


def sleep_target(level: SleepLevel, host_bytes: int, *, sleeps: bool, slots_left: int, host_room: int) -> SleepTarget:
    """Asleep at `level` when the GPU sleeps engines and holds another sleeper; level 1 falls to 2
    when the node's host RAM for level-1 weights is short; otherwise stopped."""
    if not sleeps or slots_left <= 0:
        return SleepTarget("stopped", None)
    if level == 1 and host_bytes > host_room:
        return SleepTarget("asleep", 2)
    return SleepTarget("asleep", level)


def choose_evictions(
    short_bytes: int,
    candidates: Sequence[Candidate],
    *,
    sleeps: bool,
    slots_left: int,
    host_room: int,
) -> list[Eviction] | None:
    """The evictions that free `short_bytes` (least recently used first), or None when every
    candidate together cannot."""
    if short_bytes <= 0:
        return []
    chosen: list[Eviction] = []
    lru = sorted(candidates, key=lambda c: (c.last_used_at, c.replica_id))
    for candidate in (c for c in lru if c.state == "awake"):
        if short_bytes <= 0:
            break
        target = sleep_target(
            candidate.level, candidate.host_bytes, sleeps=sleeps, slots_left=slots_left, host_room=host_room
        )
        left = candidate.sleep_bytes if target.state == "asleep" else 0
        if target.state == "asleep":
            slots_left -= 1
            if target.level == 1:
                host_room -= candidate.host_bytes
        frees = candidate.held_bytes - left
        chosen.append(Eviction(candidate.replica_id, target.state, target.level, frees))
        short_bytes -= frees
    # Still short: stop sleepers, least recently used first, counting those just put to sleep.
    slept = {e.replica_id: i for i, e in enumerate(chosen) if e.to == "asleep"}
    for candidate in (c for c in lru if c.state == "asleep" or c.replica_id in slept):
        if short_bytes <= 0:
            break
        if candidate.replica_id in slept:
            at = slept[candidate.replica_id]
            short_bytes -= candidate.sleep_bytes
            chosen[at] = Eviction(candidate.replica_id, "stopped", None, candidate.held_bytes)
        else:
            chosen.append(Eviction(candidate.replica_id, "stopped", None, candidate.held_bytes))
            short_bytes -= candidate.held_bytes
    return chosen if short_bytes <= 0 else None
