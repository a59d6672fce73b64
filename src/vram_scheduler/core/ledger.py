"""The ledger's rules, without Ray: who holds how much VRAM on which GPU, and who may get more.

`Ledger` is plain Python so that every rule (capacity per GPU, idempotent reserve and release,
stale nodes, managed processes, FIFO startup locks, dead owners, persistence format) is tested
without a cluster; the `vram_allocator` actor in `allocator.py` is a thin shell that serialises
calls, persists what changed (`take_delta`, written by `ledger_writer.py`), keeps callers waiting
for a startup lock, and asks Ray which owners died.

Every operation on one reservation costs about the same at 10 or 10,000 live reservations: per-GPU
reserved totals, reservations per GPU and managed pids are kept as indexes, updated with each
change, rather than summed over every entry.

Capacity is the planner's: a GPU takes a reservation only while its total stays at or above
memory used by unmanaged processes plus every reservation on it (budget + the overhead it holds,
`capacity`). Each reservation records its overhead and its engine's hard cap.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import capacity, eviction
from .capacity import ReplicaLife, SleepTerms
from .config import ModelSpec, PlacementSettings, SleepLevel, format_gib, gib_to_bytes, parse_config
from .contract import (
    Eviction,
    GPUState,
    NodeState,
    Plan,
    ReplicaState,
    Reservation,
    ReserveOutcome,
    ReserveRequest,
    VRAMState,
    WakeOutcome,
)
from .errors import RayVramError
from .inventory import GPUInfo, Inventory, NodeInventory
from .ledger_models import (
    SNAPSHOT_VERSION,
    LedgerDelta,
    LedgerEntry,
    LedgerSnapshot,
    NodeRecord,
    StartupLockHolder,
)
from .planner import plan

__all__ = [
    "SNAPSHOT_VERSION",
    "Ledger",
    "LedgerDelta",
    "LedgerEntry",
    "LedgerSnapshot",
    "NodeRecord",
    "ReservationError",
    "ReserveOutcome",
    "ReserveRequest",
    "StartupLockHolder",
    "WakeOutcome",
    "models_from_dicts",
    "now",
]


class ReservationError(RayVramError, RuntimeError):
    """A reservation the ledger refuses: the message names model, need, and the room there is."""


@dataclass
class _StartupWaiter:
    """A replica queued for a GPU's startup lock, and the owner its lock will have."""

    replica_id: str
    owner: str | None


class Ledger:
    """Reservations against per-node inventories; every mutator returns whether state changed."""

    def __init__(self, snapshot: LedgerSnapshot | None = None, *, copy: bool = True):
        """`copy=False` adopts `snapshot` as is (a freshly loaded one nobody else holds)."""
        if snapshot is None:
            snapshot = LedgerSnapshot()
        elif copy:
            snapshot = snapshot.model_copy(deep=True)
        self.data = snapshot
        self._startup_queues: dict[str, list[_StartupWaiter]] = {}
        # Indexes over `data.entries`, kept by _put_entry/_drop_entry/attach_process.
        self._by_gpu: dict[str, dict[str, None]] = {}  # GPU uuid → its replica ids (an ordered set)
        self._held: dict[str, int] = {}  # GPU uuid → what its replicas hold (`capacity.footprint_bytes` each)
        self._asleep: dict[str, int] = {}  # GPU uuid → how many of its replicas sleep
        self._host: dict[str, int] = {}  # node → host RAM of its level-1 sleepers' weights
        self._pids: dict[int, int] = {}  # managed pid → how many entries name it
        # Derived from the inventories (and managed pids): rebuilt on first use after a change.
        self._gpu_cache: list[GPUInfo] | None = None
        self._gpu_by_uuid: dict[str, GPUInfo] = {}
        self._unmanaged_cache: dict[str, int] | None = None
        for entry in self.data.entries.values():
            if entry.reservation.overhead_bytes is None:  # recorded before overheads were per reservation
                entry.reservation = self._completed(entry.reservation, None)
            self._index(entry, +1)
        # Keys changed since the last `take_delta`.
        self._dirty_settings = False
        self._dirty: dict[str, set[str]] = {"nodes": set(), "entries": set(), "startup_locks": set()}

    # -- settings and inventory -------------------------------------------------------------

    @property
    def settings(self) -> PlacementSettings:
        return self.data.settings

    @property
    def overhead(self) -> int:
        """The overhead of a reservation asked for without one (`capacity.placement_overhead_bytes`)."""
        return capacity.placement_overhead_bytes(self.settings)

    def _completed(self, reservation: Reservation, overhead_bytes: int | None) -> Reservation:
        """`reservation` with its overhead (`overhead_bytes`, else the cluster's) and its cap (on its GPU)."""
        overhead = capacity.held_overhead(
            reservation.overhead_bytes if overhead_bytes is None else overhead_bytes, self.settings
        )
        gpu = self.find_gpu(reservation.gpu_uuid)
        total = gpu.total_bytes if gpu is not None else capacity.reservation_bytes(reservation.bytes, overhead)
        cap = capacity.cap_bytes(reservation.bytes, overhead, total)
        return reservation.model_copy(update={"overhead_bytes": overhead, "cap_bytes": cap})

    def configure(self, settings: PlacementSettings) -> bool:
        changed = settings != self.data.settings
        self.data.settings = settings
        self._dirty_settings |= changed
        return changed

    def update_inventory(self, inventory: NodeInventory, now: float) -> bool:
        """Replace a node's inventory. A GPU uuid another live node reports is refused; one a stale
        node reported moves here (a renamed node or a rescheduled monitor).

        Returns whether the cluster's GPUs changed (a new node, a GPU added, gone, moved, resized
        or unhealthy), not merely their usage: the allocator writes those at once, usage lazily.
        """
        mine = {gpu.uuid for gpu in inventory.gpus}
        stale = self.stale_nodes(now)
        self._gpu_cache = self._unmanaged_cache = None
        previous = self.data.nodes.get(inventory.node)
        reshaped = previous is None or _shape(previous.inventory) != _shape(inventory)
        for name, record in list(self.data.nodes.items()):
            if name == inventory.node:
                continue
            clash = sorted(mine & {gpu.uuid for gpu in record.inventory.gpus})
            if clash and name not in stale:
                raise ValueError(f"node {inventory.node!r} reports GPU {clash[0]} that node {name!r} already reports")
            if clash:
                kept = [gpu for gpu in record.inventory.gpus if gpu.uuid not in mine]
                if kept:
                    record.inventory = record.inventory.model_copy(update={"gpus": kept})
                else:
                    del self.data.nodes[name]
                self._dirty["nodes"].add(name)
                reshaped = True
        self.data.nodes[inventory.node] = NodeRecord(inventory=inventory, arrived_at=now)
        self._dirty["nodes"].add(inventory.node)
        for gpu in inventory.gpus:
            self._relocate(gpu)
        return reshaped

    def saw_monitors(self, nodes: Iterable[str], now: float) -> None:
        """These nodes' monitors showed a sign of life (a new heartbeat): fresh as of `now`, with the
        inventory they last sent. Unknown nodes are ignored: they have no inventory to place on."""
        for name in nodes:
            record = self.data.nodes.get(name)
            if record is not None and record.arrived_at < now:
                record.arrived_at = now
                self._dirty["nodes"].add(name)

    def _relocate(self, gpu: GPUInfo) -> None:
        """Point the GPU's reservations at where it is now. Every reservation of one GPU names the
        same place (each move updates them all), so one look tells whether any moved."""
        ids = self._by_gpu.get(gpu.uuid)
        if not ids:
            return
        first = self.data.entries[next(iter(ids))].reservation
        if (first.node, first.gpu_index) == (gpu.node, gpu.index):
            return
        for replica_id in list(ids):
            entry = self.data.entries[replica_id]
            self._index(entry, -1)  # a level-1 sleeper's host RAM moves with it to the new node
            entry.reservation = entry.reservation.model_copy(update={"node": gpu.node, "gpu_index": gpu.index})
            self._index(entry, +1)
            self._dirty["entries"].add(replica_id)

    def stale_nodes(self, now: float) -> set[str]:
        limit = self.settings.stale_after_s
        return {name for name, record in self.data.nodes.items() if now - record.arrived_at > limit}

    def inventory(self) -> Inventory:
        return Inventory(nodes=[self.data.nodes[name].inventory for name in sorted(self.data.nodes)])

    def gpus(self) -> list[GPUInfo]:
        return list(self._sorted_gpus())

    def _sorted_gpus(self) -> list[GPUInfo]:
        """Every GPU by (node, index), kept until an inventory changes (read-only)."""
        if self._gpu_cache is None:
            self._gpu_cache = sorted(
                (gpu for record in self.data.nodes.values() for gpu in record.inventory.gpus),
                key=lambda g: (g.node, g.index),
            )
            self._gpu_by_uuid = {gpu.uuid: gpu for gpu in self._gpu_cache}
        return self._gpu_cache

    def find_gpu(self, uuid: str) -> GPUInfo | None:
        self._sorted_gpus()
        return self._gpu_by_uuid.get(uuid)

    # -- capacity ---------------------------------------------------------------------------

    def serialises_startup(self, gpu_uuid: str) -> bool:
        """Whether replicas starting on this GPU must take its startup lock one at a time.

        The lock guards a CUDA race: vLLM engines profiling one GPU together mis-size each other's
        KV caches. A host-memory pseudo-GPU (local mode without a GPU) has no such race — a CPU
        engine is sized in bytes from its reservation, which is held before it starts — so its
        replicas start in parallel. Unknown GPUs keep the lock (the safe side).
        """
        for record in self.data.nodes.values():
            if any(gpu.uuid == gpu_uuid for gpu in record.inventory.gpus):
                return record.inventory.source != "host-memory"
        return True

    def managed_pids(self) -> frozenset[int]:
        return frozenset(self._pids)

    def reserved_bytes(self) -> dict[str, int]:
        """Per GPU uuid: budgets plus overheads of its reservations."""
        return dict(self._held)

    def free_bytes(self) -> dict[str, int]:
        """Per GPU uuid: room for new reservations (may be negative if unmanaged use grew)."""
        unmanaged = self._unmanaged()
        reserved = self.reserved_bytes()
        return {g.uuid: g.total_bytes - unmanaged[g.uuid] - reserved.get(g.uuid, 0) for g in self._sorted_gpus()}

    def _unmanaged(self) -> dict[str, int]:
        """Per GPU uuid: memory of processes no reservation attached, kept until inventory or pids change."""
        if self._unmanaged_cache is None:
            managed = self._pids.keys()
            self._unmanaged_cache = {g.uuid: g.unmanaged_bytes(managed) for g in self._sorted_gpus()}
        return self._unmanaged_cache

    def open_gpus(self, now: float) -> list[GPUInfo]:
        """GPUs that may take new reservations: healthy, on a node that is not stale."""
        stale = self.stale_nodes(now)
        return [g for g in self._sorted_gpus() if g.healthy and g.node not in stale]

    # -- reservations -----------------------------------------------------------------------

    def reservations(self) -> list[Reservation]:
        return [self.data.entries[rid].reservation for rid in sorted(self.data.entries)]

    def entry(self, replica_id: str) -> LedgerEntry | None:
        return self.data.entries.get(replica_id)

    def reserve(
        self,
        replica_id: str,
        model_id: str,
        n_bytes: int,
        now: float,
        gpu_uuid: str | None = None,
        owner: str | None = None,
        overhead_bytes: int | None = None,
        state: ReplicaLife = "awake",
        sleep: SleepTerms | None = None,
    ) -> tuple[Reservation, bool]:
        """Reserve `n_bytes` + `overhead_bytes` (None: the cluster's overhead) for a replica; the same
        request again returns the same reservation. Raises `ReservationError` naming model, need and
        the room there is.

        `state` stopped: a replica placed beyond the room awake (its model sleeps, `sleep`); it holds
        nothing until its first wake, on a GPU where it could wake by evicting every replica that
        sleeps (`_wake_room`)."""
        if n_bytes <= 0:
            raise ReservationError(f"replica {replica_id} of model {model_id}: bytes must be > 0, got {n_bytes}")
        if overhead_bytes is not None and overhead_bytes < 0:
            raise ReservationError(
                f"replica {replica_id} of model {model_id}: overhead must be >= 0 bytes, got {overhead_bytes}"
            )
        existing = self.data.entries.get(replica_id)
        if existing is not None:
            return self._repeat(existing, model_id, n_bytes, gpu_uuid, owner)
        if state not in ("awake", "stopped"):
            raise ReservationError(
                f"replica {replica_id} of model {model_id}: a new reservation is awake or stopped, not {state}"
            )
        if state == "stopped" and sleep is None:
            raise ReservationError(
                f"replica {replica_id} of model {model_id}: only a model that sleeps may be placed stopped "
                "(it has no sleep terms: pinned, or no sleep policy)"
            )
        overhead = capacity.held_overhead(overhead_bytes, self.settings)
        need = capacity.reservation_bytes(n_bytes, overhead)
        free = self.free_bytes() if state == "awake" else {g.uuid: self._wake_room(g) for g in self._sorted_gpus()}
        open_gpus = self.open_gpus(now)
        if gpu_uuid is None:
            fitting = [g for g in open_gpus if free[g.uuid] >= need]
            if not fitting:
                raise ReservationError(self._no_room(model_id, n_bytes, overhead, open_gpus, free, now))
            gpu = min(fitting, key=lambda g: (free[g.uuid], g.node, g.index))
        else:
            gpu = self._check_target(model_id, n_bytes, overhead, gpu_uuid, open_gpus, free, now)
        reservation = Reservation(
            replica_id=replica_id,
            model_id=model_id,
            node=gpu.node,
            gpu_uuid=gpu.uuid,
            gpu_index=gpu.index,
            bytes=n_bytes,
            overhead_bytes=overhead,
            cap_bytes=capacity.cap_bytes(n_bytes, overhead, gpu.total_bytes),
            state=state,
            sleep=sleep,
        )
        self._put_entry(LedgerEntry(reservation=reservation, owner=owner, created_at=now))
        return reservation, True

    def reserve_many(self, requests: Sequence[ReserveRequest], now: float) -> tuple[list[ReserveOutcome], bool]:
        """`reserve` for each request in order, as if called one by one: an item that does not fit
        is refused alone (its outcome names why), the others are placed. Returns (outcomes,
        whether anything changed)."""
        outcomes, changed = [], False
        for request in requests:
            try:
                reservation, placed = self.reserve(
                    request.replica_id,
                    request.model_id,
                    request.bytes,
                    now,
                    request.gpu_uuid,
                    request.owner,
                    request.overhead_bytes,
                    request.state,
                    request.sleep,
                )
            except ReservationError as refusal:
                outcomes.append(ReserveOutcome(replica_id=request.replica_id, error=str(refusal)))
                continue
            outcomes.append(ReserveOutcome(replica_id=request.replica_id, reservation=reservation))
            changed |= placed
        return outcomes, changed

    def _repeat(
        self, entry: LedgerEntry, model_id: str, n_bytes: int, gpu_uuid: str | None, owner: str | None
    ) -> tuple[Reservation, bool]:
        held = entry.reservation
        if held.model_id != model_id or held.bytes != n_bytes:
            raise ReservationError(
                f"replica {held.replica_id} already holds a reservation for model {held.model_id} "
                f"({format_gib(held.bytes)} on {_label(held)}); asked for model {model_id} with "
                f"{format_gib(n_bytes)} — release it first"
            )
        if gpu_uuid is not None and gpu_uuid != held.gpu_uuid:
            raise ReservationError(
                f"replica {held.replica_id} of model {model_id} is already reserved on {_label(held)} "
                f"({held.gpu_uuid}), not on {gpu_uuid} — release it first to move it"
            )
        changed = owner is not None and owner != entry.owner
        if changed:
            entry.owner = owner
            self._dirty["entries"].add(held.replica_id)
        return held, changed

    def _check_target(
        self,
        model_id: str,
        n_bytes: int,
        overhead: int,
        gpu_uuid: str,
        open_gpus: list[GPUInfo],
        free: dict[str, int],
        now: float,
    ) -> GPUInfo:
        need = capacity.reservation_bytes(n_bytes, overhead)
        gpu = self.find_gpu(gpu_uuid)
        if gpu is None:
            known = ", ".join(g.uuid for g in self.gpus()) or "none"
            raise ReservationError(f"model {model_id}: no GPU with uuid {gpu_uuid!r} in the inventory (known: {known})")
        if not gpu.healthy:
            raise ReservationError(f"model {model_id}: {gpu.label} ({gpu_uuid}) is unhealthy; it takes no reservations")
        record = self.data.nodes[gpu.node]
        if gpu.node in self.stale_nodes(now):
            raise ReservationError(
                f"model {model_id}: node {gpu.node} is stale (last inventory {now - record.arrived_at:.1f} s ago, "
                f"limit {self.settings.stale_after_s:g} s); it takes no new reservations"
            )
        if free[gpu.uuid] < need:
            raise ReservationError(
                f"model {model_id} needs {self._need_text(n_bytes, overhead)} on {gpu.label}, which has "
                f"{format_gib(max(0, free[gpu.uuid]))} free (short by {format_gib(need - max(0, free[gpu.uuid]))}); "
                + self._largest_text(open_gpus, free)
            )
        return gpu

    @staticmethod
    def _need_text(n_bytes: int, overhead: int) -> str:
        return (
            f"{format_gib(capacity.reservation_bytes(n_bytes, overhead))} per replica "
            f"({format_gib(n_bytes)} budget + {format_gib(overhead)} overhead)"
        )

    @staticmethod
    def _largest(open_gpus: list[GPUInfo], free: dict[str, int]) -> GPUInfo | None:
        return min(open_gpus, key=lambda g: (-free[g.uuid], g.node, g.index), default=None)

    def _largest_text(self, open_gpus: list[GPUInfo], free: dict[str, int]) -> str:
        largest = self._largest(open_gpus, free)
        if largest is None:
            return "no GPU takes new reservations"
        return f"the largest free slot is {format_gib(max(0, free[largest.uuid]))} on {largest.label}"

    def _no_room(
        self, model_id: str, n_bytes: int, overhead: int, open_gpus: list[GPUInfo], free: dict[str, int], now: float
    ) -> str:
        need = capacity.reservation_bytes(n_bytes, overhead)
        if not self.gpus():
            return f"model {model_id} needs {self._need_text(n_bytes, overhead)}; the inventory has no GPUs yet"
        if not open_gpus:
            stale = ", ".join(sorted(self.stale_nodes(now))) or "none"
            return (
                f"model {model_id} needs {self._need_text(n_bytes, overhead)}; no GPU takes new reservations "
                f"(every GPU is unhealthy or on a stale node; stale: {stale})"
            )
        largest = self._largest(open_gpus, free)
        assert largest is not None
        room = max(0, free[largest.uuid])
        return (
            f"model {model_id} needs {self._need_text(n_bytes, overhead)}; the largest free slot is "
            f"{format_gib(room)} on {largest.label} (short by {format_gib(need - room)})"
        )

    def release(self, replica_id: str, now: float | None = None) -> bool:
        """Drop a replica's reservation, its startup locks (each going to the next waiter) and its
        places in startup queues; False if it held neither a reservation nor a lock."""
        entry = self._drop_entry(replica_id)
        locks = [uuid for uuid, holder in self.data.startup_locks.items() if holder.replica_id == replica_id]
        for uuid in locks:
            self._drop_lock(uuid)
        for uuid in list(self._startup_queues):
            self.drop_startup_waiter(uuid, replica_id)
        self._grant_next_locks(time.time() if now is None else now)
        return entry is not None or bool(locks)

    def release_many(self, replica_ids: Sequence[str], now: float) -> list[bool]:
        """`release` for each id in order; each answer says whether that one held anything."""
        return [self.release(replica_id, now) for replica_id in replica_ids]

    # -- sleep and wake ---------------------------------------------------------------------
    # A replica's footprint follows its state (`capacity.footprint_bytes`); `core.eviction` decides
    # how deep a sleeper sleeps and whom a wake evicts. The ledger never counts memory as free
    # before the engine holding it let go: a replica going to sleep keeps its whole reservation
    # (`settling`) until its engine's sleep returned (`settle`) or its engine is gone (`stop`), and a
    # wake takes the whole reservation before its engine grows. A wake short of room only starts
    # its evictions (they settle as their engines sleep) and is asked again; each call either
    # changes the ledger consistently or changes nothing.

    def _wake_room(self, gpu: GPUInfo) -> int:
        """What a GPU can give one replica once every replica that sleeps is stopped: its total less
        unmanaged use and the replicas that never sleep (pinned)."""
        fixed = sum(
            self.data.entries[rid].reservation.held_bytes
            for rid in self._by_gpu.get(gpu.uuid, ())
            if self.data.entries[rid].reservation.sleep is None
        )
        return gpu.total_bytes - self._unmanaged()[gpu.uuid] - fixed

    def _sleeps_engines(self, gpu_uuid: str) -> bool:
        """Whether replicas on this GPU sleep (CUDA sleep mode) rather than stop (a host-memory
        pseudo-GPU: vLLM's CPU engine has no sleep mode)."""
        return self.serialises_startup(gpu_uuid)

    def _slots_left(self, gpu_uuid: str) -> int:
        return self.settings.sleep.max_asleep_per_gpu - self._asleep.get(gpu_uuid, 0)

    def _host_room(self, node: str) -> int:
        limit = gib_to_bytes(self.settings.sleep.level1_host_gb_per_node)
        return limit - self._host.get(node, 0)

    def _sleeper(self, replica_id: str, action: str) -> LedgerEntry:
        entry = self.data.entries.get(replica_id)
        if entry is None:
            known = ", ".join(sorted(self.data.entries)) or "none"
            raise ReservationError(f"{action} {replica_id!r}: it holds no reservation (held: {known})")
        return entry

    def _set_state(
        self, entry: LedgerEntry, state: ReplicaLife, level: SleepLevel | None, *, settling: bool = False
    ) -> None:
        self._index(entry, -1)
        update = {"state": state, "asleep_level": level, "settling": settling}
        entry.reservation = entry.reservation.model_copy(update=update)
        self._index(entry, +1)
        self._dirty["entries"].add(entry.reservation.replica_id)

    def sleep(self, replica_id: str, now: float) -> tuple[Reservation, bool]:
        """Put an awake replica to sleep: asleep at its level (level 2 when the node's host RAM for
        level-1 weights is short), or stopped when its GPU holds `max_asleep_per_gpu` sleepers or
        does not sleep engines. It is settling: it keeps its whole reservation (its sleeper slot and
        host RAM already counted) until its engine slept (`settle`) or is gone (`stop`). Asleep or
        stopped already (or settling there): unchanged. A replica that never sleeps (pinned, or its
        model has no sleep policy) is refused."""
        entry = self._sleeper(replica_id, "sleep")
        held = entry.reservation
        if held.sleep is None:
            raise ReservationError(
                f"sleep {replica_id}: model {held.model_id} never sleeps (pinned, or no sleep policy: set the "
                "model's sleep or placement.sleep.after_idle_s)"
            )
        if held.state != "awake":
            return held, False
        target = eviction.sleep_target(
            held.sleep.level,
            held.sleep.host_bytes,
            sleeps=self._sleeps_engines(held.gpu_uuid),
            slots_left=self._slots_left(held.gpu_uuid),
            host_room=self._host_room(held.node),
        )
        self._set_state(entry, target.state, target.level, settling=True)
        return entry.reservation, True

    def settle(self, replica_id: str, now: float) -> tuple[Reservation, bool]:
        """A settling replica's engine let go (its sleep returned): it holds its state's footprint
        from now on, and the rest is free. Not settling: unchanged."""
        entry = self._sleeper(replica_id, "settle")
        if not entry.reservation.settling:
            return entry.reservation, False
        self._set_state(entry, entry.reservation.state, entry.reservation.asleep_level)
        return entry.reservation, True

    def stop(self, replica_id: str, now: float) -> tuple[Reservation, bool]:
        """Mark a replica of a model that sleeps stopped: its engine is gone (put to sleep on CPU,
        scaled to zero, or broken by a failed wake) and it holds nothing; its next wake is a cold
        start on the same GPU. A replica that never sleeps is refused (nothing would wake it)."""
        entry = self._sleeper(replica_id, "stop")
        if entry.reservation.sleep is None:
            raise ReservationError(
                f"stop {replica_id}: model {entry.reservation.model_id} never sleeps (pinned, or no sleep policy), "
                "so nothing would wake it; release it instead"
            )
        if entry.reservation.state == "stopped" and not entry.reservation.settling:
            return entry.reservation, False
        self._set_state(entry, "stopped", None)
        return entry.reservation, True

    def wake(self, replica_id: str, now: float, busy: Collection[str] = ()) -> tuple[WakeOutcome, bool]:
        """Take a replica's whole reservation back on its GPU when the room is free. When it is
        short, evict the least recently used idle replicas there that sleep (`core.eviction`): they
        go to sleep settling, still holding their reservations, and the waker is left as it was; it
        has them sleep and asks again once their engines let go. `busy`: replicas with requests in
        flight, never evicted; settling ones are on their way already. Raises `ReservationError`
        (changing nothing) naming the need, the room and what held the rest. Awake already:
        unchanged; settling (its engine never let go): awake again at once."""
        entry = self._sleeper(replica_id, "wake")
        held = entry.reservation
        if held.state == "awake":
            return WakeOutcome(reservation=held), False
        if held.settling:
            self._set_state(entry, "awake", None)
            entry.last_used_at = now
            return WakeOutcome(reservation=entry.reservation), True
        gpu = self.find_gpu(held.gpu_uuid)
        if gpu is None:
            raise ReservationError(
                f"wake {replica_id} of model {held.model_id}: its GPU {held.gpu_uuid} is not in the inventory"
            )
        overhead = capacity.held_overhead(held.overhead_bytes, self.settings)
        need = capacity.wake_need_bytes(held.state, held.bytes, overhead, held.sleep)
        short = need - self.free_bytes()[gpu.uuid]
        if short <= 0:
            self._set_state(entry, "awake", None)
            entry.last_used_at = now
            return WakeOutcome(reservation=entry.reservation), True
        # The waker keeps its sleeper slot and host RAM until it wakes, after its evictions settled.
        slots = self._slots_left(gpu.uuid)
        host = self._host_room(held.node)
        candidates = [
            eviction.Candidate(
                replica_id=other.reservation.replica_id,
                state=other.reservation.state,
                last_used_at=other.used_at,
                held_bytes=other.reservation.held_bytes,
                sleep_bytes=other.reservation.sleep.sleep_bytes,
                host_bytes=other.reservation.sleep.host_bytes,
                level=other.reservation.sleep.level,
            )
            for other in (self.data.entries[rid] for rid in self._by_gpu.get(gpu.uuid, ()))
            if other.reservation.replica_id != replica_id
            and other.reservation.sleep is not None
            and other.reservation.state != "stopped"
            and not other.reservation.settling
            and other.reservation.replica_id not in busy
        ]
        chosen = eviction.choose_evictions(
            short, candidates, sleeps=self._sleeps_engines(gpu.uuid), slots_left=slots, host_room=host
        )
        if chosen is None:
            raise ReservationError(self._no_wake_room(held, gpu, need, short, candidates, busy))
        evicted = []
        for choice in chosen:
            other = self.data.entries[choice.replica_id]
            self._set_state(other, choice.to, choice.level, settling=True)
            evicted.append(
                Eviction(
                    replica_id=choice.replica_id,
                    model_id=other.reservation.model_id,
                    state=choice.to,
                    level=choice.level,
                    freed_bytes=choice.frees_bytes,
                )
            )
        return WakeOutcome(reservation=entry.reservation, evicted=evicted), True

    def _no_wake_room(
        self,
        held: Reservation,
        gpu: GPUInfo,
        need: int,
        short: int,
        candidates: list[eviction.Candidate],
        busy: Collection[str],
    ) -> str:
        others = [
            self.data.entries[rid].reservation for rid in self._by_gpu.get(gpu.uuid, ()) if rid != held.replica_id
        ]
        pinned = [r for r in others if r.sleep is None]
        settling = [r for r in others if r.settling]
        in_flight = [
            r
            for r in others
            if r.sleep is not None and r.replica_id in busy and r.state != "stopped" and not r.settling
        ]
        evictable = sum(c.held_bytes for c in candidates)

        def listed(reservations: list[Reservation]) -> str:
            if not reservations:
                return "none"
            return ", ".join(f"{r.replica_id} {format_gib(r.held_bytes)}" for r in reservations)

        return (
            f"wake {held.replica_id} of model {held.model_id}: needs {format_gib(need)} more on {gpu.label}, "
            f"which has {format_gib(max(0, need - short))} free (short by {format_gib(short)}); evicting every idle "
            f"replica that sleeps frees at most {format_gib(evictable)}; pinned: {listed(pinned)}; "
            f"with requests in flight: {listed(in_flight)}; going to sleep (their engines not yet let go): "
            f"{listed(settling)}; unmanaged: {format_gib(self._unmanaged()[gpu.uuid])}"
        )

    def touch(self, replica_ids: Iterable[str], now: float) -> bool:
        """These replicas served requests as of `now` (the order a wake evicts in); unknown ids
        are ignored (released meanwhile). Returns whether anything changed."""
        changed = False
        for replica_id in replica_ids:
            entry = self.data.entries.get(replica_id)
            if entry is not None and (entry.last_used_at is None or entry.last_used_at < now):
                entry.last_used_at = now
                self._dirty["entries"].add(replica_id)
                changed = True
        return changed

    def asleep_count(self, gpu_uuid: str) -> int:
        return self._asleep.get(gpu_uuid, 0)

    def level1_host_bytes(self) -> dict[str, int]:
        """Per node: host RAM its level-1 sleepers' weights take."""
        return dict(self._host)

    def attach_process(self, replica_id: str, pid: int) -> bool:
        entry = self.data.entries.get(replica_id)
        if entry is None:
            known = ", ".join(sorted(self.data.entries)) or "none"
            raise ReservationError(f"attach pid {pid}: replica {replica_id!r} holds no reservation (held: {known})")
        if pid in entry.pids:
            return False
        entry.pids.append(pid)
        self._pids[pid] = self._pids.get(pid, 0) + 1
        self._unmanaged_cache = None
        self._dirty["entries"].add(replica_id)
        return True

    # -- the indexes and what changed ---------------------------------------------------------

    def _index(self, entry: LedgerEntry, sign: int) -> None:
        """Count an entry into the indexes (+1) or out of them (-1)."""
        held = entry.reservation
        ids = self._by_gpu.setdefault(held.gpu_uuid, {})
        if sign > 0:
            ids[held.replica_id] = None
        else:
            ids.pop(held.replica_id, None)
        overhead = capacity.held_overhead(held.overhead_bytes, self.settings)
        whole = capacity.footprint_bytes(held.state, held.bytes, overhead, held.sleep, settling=held.settling)
        self._held[held.gpu_uuid] = self._held.get(held.gpu_uuid, 0) + sign * whole
        if held.state == "asleep":
            self._asleep[held.gpu_uuid] = self._asleep.get(held.gpu_uuid, 0) + sign
            if held.asleep_level == 1 and held.sleep is not None:
                self._host[held.node] = self._host.get(held.node, 0) + sign * held.sleep.host_bytes
        if not ids:
            del self._by_gpu[held.gpu_uuid]
            del self._held[held.gpu_uuid]
        for index in (self._asleep, self._host):
            for key in [k for k, v in index.items() if v == 0]:
                del index[key]
        for pid in entry.pids:
            count = self._pids.get(pid, 0) + sign
            if count > 0:
                self._pids[pid] = count
            else:
                self._pids.pop(pid, None)
        if entry.pids:
            self._unmanaged_cache = None

    def _put_entry(self, entry: LedgerEntry) -> None:
        self.data.entries[entry.reservation.replica_id] = entry
        self._index(entry, +1)
        self._dirty["entries"].add(entry.reservation.replica_id)

    def _drop_entry(self, replica_id: str) -> LedgerEntry | None:
        entry = self.data.entries.pop(replica_id, None)
        if entry is not None:
            self._index(entry, -1)
            self._dirty["entries"].add(replica_id)
        return entry

    def _drop_lock(self, gpu_uuid: str) -> None:
        del self.data.startup_locks[gpu_uuid]
        self._dirty["startup_locks"].add(gpu_uuid)

    @property
    def dirty(self) -> bool:
        """Whether anything changed since the last `take_delta` or `take_snapshot`."""
        return self._dirty_settings or any(self._dirty.values())

    def take_delta(self) -> LedgerDelta | None:
        """What changed since the last call (None: nothing), and forget it. The delta shares the
        ledger's objects: serialise it before the ledger changes again."""
        if not self.dirty:
            return None
        data = self.data
        delta = LedgerDelta.model_construct(
            settings=data.settings if self._dirty_settings else None,
            nodes={name: data.nodes.get(name) for name in self._dirty["nodes"]},
            entries={rid: data.entries.get(rid) for rid in self._dirty["entries"]},
            startup_locks={uuid: data.startup_locks.get(uuid) for uuid in self._dirty["startup_locks"]},
        )
        self._forget_changes()
        return delta

    def take_snapshot(self) -> str:
        """The whole ledger as JSON (`dumps`); what changed so far is in it, so it is forgotten."""
        self._forget_changes()
        return self.dumps()

    def _forget_changes(self) -> None:
        self._dirty_settings = False
        self._dirty = {kind: set() for kind in self._dirty}

    @property
    def reservation_count(self) -> int:
        return len(self.data.entries)

    def _owned(self) -> list[tuple[str, str]]:
        """(replica id, owner) of every owned reservation and startup lock; one replica may appear
        with several owners (a lock taken with an explicit owner)."""
        owned = [(rid, e.owner) for rid, e in self.data.entries.items() if e.owner]
        return owned + [(h.replica_id, h.owner) for h in self.data.startup_locks.values() if h.owner]

    def owners(self) -> set[str]:
        """The actors owning a reservation or startup lock: the ones to check for death."""
        return {owner for _, owner in self._owned()}

    def reclaim(self, dead_owners: Collection[str], now: float) -> list[str]:
        """Release every replica whose reservation or startup lock belongs to a dead owner; their
        locks go to the next waiters. Owners that changed since the caller looked are not in
        `dead_owners`, so a replica taken over by a live actor is kept. Returns the replica ids."""
        dead = sorted({rid for rid, owner in self._owned() if owner in dead_owners})
        for replica_id in dead:
            self.release(replica_id, now)
        return dead

    # -- startup locks ----------------------------------------------------------------------
    # One replica at a time initialises on a GPU (see `serialises_startup`); the others wait in
    # FIFO order. Holders are persisted; the queues are not: a waiter is a call blocked in the
    # allocator, and a restarted allocator gets those calls again (Ray retries them).

    def startup_lock_holder(self, gpu_uuid: str) -> StartupLockHolder | None:
        return self.data.startup_locks.get(gpu_uuid)

    def startup_waiters(self, gpu_uuid: str) -> list[str]:
        """Replica ids queued for the GPU's startup lock, first in line first."""
        return [waiter.replica_id for waiter in self._startup_queues.get(gpu_uuid, [])]

    def holds_startup_lock(self, gpu_uuid: str, replica_id: str) -> bool:
        holder = self.data.startup_locks.get(gpu_uuid)
        return holder is not None and holder.replica_id == replica_id

    def acquire_startup_lock(
        self, gpu_uuid: str, replica_id: str, now: float, owner: str | None = None
    ) -> tuple[bool, bool]:
        """Take the GPU's startup lock, or queue for it behind earlier callers (FIFO).

        Returns (whether the replica may start now, whether persisted state changed). A GPU that
        does not serialise starts grants at once and records nothing; the holder asking again
        keeps it; a replica already queued keeps its place. The lock's owner is `owner`, else the
        owner of the replica's reservation, so the lock dies with that actor (`reclaim`).
        """
        if not self.serialises_startup(gpu_uuid) or self.holds_startup_lock(gpu_uuid, replica_id):
            return True, False
        owner = owner or self._owner_of(replica_id)
        queue = self._startup_queues.get(gpu_uuid, [])
        if gpu_uuid not in self.data.startup_locks and not queue:
            self._grant_startup_lock(gpu_uuid, replica_id, owner, now)
            return True, True
        waiting = next((w for w in queue if w.replica_id == replica_id), None)
        if waiting is None:
            self._startup_queues[gpu_uuid] = [*queue, _StartupWaiter(replica_id, owner)]
        elif owner is not None:
            waiting.owner = owner
        return False, False

    def release_startup_lock(self, gpu_uuid: str, replica_id: str, now: float) -> bool:
        """The holder gives the lock to the next waiter; anyone else only leaves the queue.
        Returns whether persisted state changed (the lock was released)."""
        if not self.holds_startup_lock(gpu_uuid, replica_id):
            self.drop_startup_waiter(gpu_uuid, replica_id)
            return False
        self._drop_lock(gpu_uuid)
        self._grant_next_locks(now)
        return True

    def drop_startup_waiter(self, gpu_uuid: str, replica_id: str) -> bool:
        """Take a replica out of the GPU's queue (it gave up waiting); False if it was not queued."""
        queue = self._startup_queues.get(gpu_uuid, [])
        kept = [w for w in queue if w.replica_id != replica_id]
        if len(kept) == len(queue):
            return False
        if kept:
            self._startup_queues[gpu_uuid] = kept
        else:
            del self._startup_queues[gpu_uuid]
        return True

    def _owner_of(self, replica_id: str) -> str | None:
        entry = self.data.entries.get(replica_id)
        return entry.owner if entry else None

    def _grant_startup_lock(self, gpu_uuid: str, replica_id: str, owner: str | None, now: float) -> None:
        owner = owner or self._owner_of(replica_id)  # it may have reserved while it waited
        self.data.startup_locks[gpu_uuid] = StartupLockHolder(replica_id=replica_id, owner=owner, since=now)
        self._dirty["startup_locks"].add(gpu_uuid)

    def _grant_next_locks(self, now: float) -> None:
        """Every free GPU goes to the first in its queue, so a queue never waits on a free lock."""
        for gpu_uuid in list(self._startup_queues):
            queue = self._startup_queues[gpu_uuid]
            if gpu_uuid not in self.data.startup_locks and queue:
                first = queue.pop(0)
                self._grant_startup_lock(gpu_uuid, first.replica_id, first.owner, now)
            if not queue:
                del self._startup_queues[gpu_uuid]

    # -- planning and state -----------------------------------------------------------------

    def plan(
        self,
        models: Sequence[ModelSpec],
        now: float,
        settings: PlacementSettings | None = None,
        exclude_nodes: frozenset[str] = frozenset(),
        keep_others: bool = False,
        overheads: dict[str, int] | None = None,
    ) -> Plan:
        """The planner against current inventories and reservations; stale nodes and `exclude_nodes`
        take nothing new; `keep_others`: other models' reservations keep their room; `overheads`: each
        model's, as the caller resolved it (`planner.plan`)."""
        return plan(
            self.inventory(),
            models,
            existing=self.reservations(),
            settings=settings or self.settings,
            managed_pids=self.managed_pids(),
            excluded_nodes=frozenset(self.stale_nodes(now)) | exclude_nodes,
            keep_others=keep_others,
            overheads=overheads,
        )

    def state(self, now: float, node: str | None = None) -> VRAMState:
        """The whole picture, or only `node`'s GPUs and record (what its monitor reads each poll:
        its cost then grows with that node's reservations, not the cluster's)."""
        stale = self.stale_nodes(now)
        free = self.free_bytes()
        reserved = self.reserved_bytes()
        unmanaged = self._unmanaged()
        gpus = []
        for gpu in self._sorted_gpus():
            if node is not None and gpu.node != node:
                continue
            usage = {p.pid: p.used_bytes for p in gpu.processes}
            gpus.append(
                GPUState(
                    node=gpu.node,
                    index=gpu.index,
                    uuid=gpu.uuid,
                    name=gpu.name,
                    total_bytes=gpu.total_bytes,
                    used_bytes=gpu.used_bytes,
                    unmanaged_bytes=unmanaged[gpu.uuid],
                    reserved_bytes=reserved.get(gpu.uuid, 0),
                    free_bytes=free[gpu.uuid],
                    healthy=gpu.healthy,
                    stale=gpu.node in stale,
                    asleep=self._asleep.get(gpu.uuid, 0),
                    replicas=self._replica_states(gpu.uuid, usage),
                )
            )
        known = self._gpu_by_uuid
        orphaned = []
        if node is None:
            orphaned = [r for uuid in self._by_gpu if uuid not in known for r in self._replica_states(uuid, None)]
        nodes = [
            NodeState(
                node=name,
                source=record.inventory.source,
                gpus=len(record.inventory.gpus),
                age_s=round(now - record.arrived_at, 3),
                stale=name in stale,
                level1_host_bytes=self._host.get(name, 0),
            )
            for name, record in sorted(self.data.nodes.items())
            if node is None or name == node
        ]
        return VRAMState(
            timestamp=now,
            gpus=gpus,
            nodes=nodes,
            stale_nodes=sorted(stale),
            orphaned=sorted(orphaned, key=lambda r: r.replica_id),
            startup_locks={uuid: h.replica_id for uuid, h in sorted(self.data.startup_locks.items())},
            settings=self.settings.model_copy(),
        )

    def _replica_states(self, gpu_uuid: str, usage: dict[int, int] | None) -> list[ReplicaState]:
        entries = self.data.entries
        return [_replica_state(entries[rid], usage) for rid in sorted(self._by_gpu.get(gpu_uuid, ()))]

    # -- persistence ------------------------------------------------------------------------

    def dumps(self) -> str:
        return self.data.model_dump_json()

    @classmethod
    def loads(cls, text: str | bytes) -> Ledger:
        return cls(LedgerSnapshot.model_validate_json(text), copy=False)


def _shape(inventory: NodeInventory) -> list[tuple[str, int, int, bool]]:
    """A node's GPUs without their usage: what placement depends on beyond free memory."""
    return [(gpu.uuid, gpu.index, gpu.total_bytes, gpu.healthy) for gpu in inventory.gpus] + [
        (inventory.source, 0, 0, True)
    ]


def _label(reservation: Reservation) -> str:
    return f"node {reservation.node}, GPU {reservation.gpu_index}"


def _replica_state(entry: LedgerEntry, usage: dict[int, int] | None) -> ReplicaState:
    held = entry.reservation
    seen = [usage[pid] for pid in entry.pids if usage is not None and pid in usage]
    return ReplicaState(
        replica_id=held.replica_id,
        model_id=held.model_id,
        bytes=held.bytes,
        overhead_bytes=held.overhead_bytes,
        cap_bytes=held.cap_bytes,
        pid=entry.pids[-1] if entry.pids else None,
        pids=list(entry.pids),
        used_bytes=sum(seen) if seen else None,
        owner=entry.owner,
        state=held.state,
        held_bytes=held.held_bytes,
        sleep_bytes=held.sleep.sleep_bytes if held.sleep is not None else None,
        asleep_level=held.asleep_level,
        settling=held.settling,
        pinned=held.sleep is None,
        last_used_at=entry.last_used_at,
    )


def models_from_dicts(models: Iterable[dict[str, Any] | ModelSpec], source: str = "models") -> list[ModelSpec]:
    """Validate model specs the way a config file is validated (unique names, clear errors)."""
    raw = [m.model_dump(exclude_unset=True) if isinstance(m, ModelSpec) else m for m in models]
    return parse_config({"models": raw}, source).models


def now() -> float:
    return time.time()
