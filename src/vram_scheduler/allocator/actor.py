"""The `vram_allocator` actor: the cluster's one VRAM ledger, as a named, detached Ray actor.

A thin shell around `ledger.Ledger`: it serialises calls, answers each change only once it is in
Ray's GCS key-value store (`ledger_writer.py`: group commit of deltas, `ledger_store.py`: snapshot +
journal) and reloads the ledger when Ray restarts the actor, reclaims reservations and startup
locks of owner actors that died, and hands out per-GPU startup locks in FIFO order (two vLLM
engines initialising on one GPU at once mis-size each other's KV cache).

A node goes stale because its monitor went quiet, not because the allocator was busy: besides
`update_inventory` calls (which queue behind everything else), a loop here polls the monitors'
heartbeats in the GCS (`heartbeats.py`), which no burst of reservations delays; and a call about
to find a node stale looks at the heartbeats itself first (that loop may be late on a busy
machine). A restarted allocator gives every node it reloads a full `stale_after_s` from the
restart to show life again: it was not listening meanwhile.

Get it with `get_vram_allocator()`, and call it through `AllocatorClient` (or, inside an event loop,
`AsyncAllocatorClient`): every method takes and returns the models of `contract.py`. The actor still
validates what it is given (a caller outside the type checks may pass the fields as a dict), so a
bad argument is a `ConfigError` naming the field, never a half-applied call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import ray
from pydantic import BaseModel, ValidationError

from ..core.capacity import ReplicaLife, SleepTerms
from ..core.config import ConfigError, ModelSpec, PlacementSettings, StrictModel, describe_validation_error
from ..core.contract import (
    ACTOR_ID_PATTERN,
    BUSY_REPORT_INTERVAL_S,
    Plan,
    PlanRequest,
    Reservation,
    ReserveOutcome,
    ReserveRequest,
    VRAMState,
    WakeOutcome,
    WriterStats,
)
from ..core.inventory import NodeInventory
from ..core.ledger import ReservationError, models_from_dicts, now
from ..core.ray_names import ALLOCATOR_ACTOR, NAMESPACE
from .cluster_actors import cluster_actor
from .heartbeats import HeartbeatReader
from .store import LedgerStore
from .writer import LedgerWriter

__all__ = [
    "AllocatorClient",
    "AsyncAllocatorClient",
    "ReservationError",
    "VRAMAllocator",
    "VRAMState",
    "get_vram_allocator",
]

#: A change of GPU usage alone reaches the GCS with the next write, or within this long: every
#: monitor republishes its node each poll (a restarted allocator relearns within one). Reservations,
#: settings, locks and a node's GPUs themselves are written before the call returns.
INVENTORY_PERSIST_INTERVAL_S = 5.0
#: Monitors' heartbeats are polled this often (at most: a quarter of `stale_after_s` if shorter).
HEARTBEAT_POLL_S = 0.5
#: A call finding a node stale reads the heartbeats itself at most this often.
HEARTBEAT_RECHECK_S = 0.05
#: After a restart, how long every awake replica not heard from counts as busy: two report periods.
BUSY_UNKNOWN_AFTER_RESTART_S = 2 * BUSY_REPORT_INTERVAL_S

_M = TypeVar("_M", bound=BaseModel)
_ACTOR_ID = re.compile(ACTOR_ID_PATTERN)
log = logging.getLogger(__name__)


class _ReserveBatch(StrictModel):
    """`reserve_many`'s argument, validated as a whole before anything is reserved."""

    requests: list[ReserveRequest]


class _ReleaseBatch(StrictModel):
    replica_ids: list[str]


def _validated(model: type[_M], data: Any, source: str) -> _M:
    """Validate a call argument; a `ConfigError` (picklable, unlike pydantic's) names each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(source, describe_validation_error(error)) from None


def _actor_alive(actor_id: str) -> bool:
    """Whether an actor exists and is not dead (restarting counts as alive: same id comes back)."""
    info = ray._private.state.actors(actor_id)
    return bool(info) and info.get("State") != "DEAD"


class VRAMAllocator:
    """The ledger actor. Create it through `get_vram_allocator()`, never directly."""

    def __init__(self) -> None:
        self._store = LedgerStore(NAMESPACE)
        self._ledger = self._store.load()
        loaded = self._store.stats().loaded
        if loaded.source != "empty":
            log.info(
                "ledger reloaded from the %s (+%d journal writes, %d bytes) in %.3f s: %d reservation(s)",
                loaded.source,
                loaded.journal_writes,
                loaded.bytes_read,
                loaded.seconds,
                loaded.reservations,
            )
        self._writer = LedgerWriter(self._ledger, self._store, INVENTORY_PERSIST_INTERVAL_S)
        self._heartbeats = HeartbeatReader(NAMESPACE)
        self._heartbeats_read_at = 0.0
        self._ledger.saw_monitors(list(self._ledger.data.nodes), now())  # see the module's docstring
        self._waiting: dict[tuple[str, str], list[asyncio.Future[bool]]] = {}  # (GPU, replica) → its callers
        self._busy: dict[str, int] = {}  # replica id → requests in flight, as it last reported (not persisted)
        # Restarted with reservations: which replicas are busy is unknown until each reported, or a
        # busy one surely would have (`_busy_replicas`).
        self._heard: set[str] = set()
        self._busy_unknown_until = now() + BUSY_UNKNOWN_AFTER_RESTART_S if loaded.reservations else 0.0
        self._reclaimer: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        # The background loops live on the actor's event loop, which __init__ does not run on: one
        # call to ourselves starts them, so a restarted allocator reclaims before anyone calls it.
        threading.Thread(target=self._kick, name="vram-allocator-kick", daemon=True).start()

    @staticmethod
    def _kick() -> None:
        try:
            ray.get_runtime_context().current_actor.ping.remote()
        except Exception:  # the first real call starts the loop anyway
            log.exception("could not start the reclaim loop from __init__")

    # -- plumbing ---------------------------------------------------------------------------

    def _background(self) -> None:
        """Start (again, if one stopped) the reclaim loop, the heartbeat watch and the writer."""
        if self._reclaimer is None or self._reclaimer.done():
            self._reclaimer = asyncio.get_running_loop().create_task(self._reclaim_loop())
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch_heartbeats())
        self._writer.start()

    async def _watch_heartbeats(self) -> None:
        """A monitor that wrote a new heartbeat is alive: its node is fresh as of now."""
        while True:
            await asyncio.sleep(min(HEARTBEAT_POLL_S, self._ledger.settings.stale_after_s / 4))
            try:
                alive = await asyncio.to_thread(self._heartbeats.changed)
            except Exception:  # the GCS may be restarting: the next round tries again
                log.exception("reading the monitors' heartbeats failed")
                continue
            self._heartbeats_read_at = time.monotonic()
            self._ledger.saw_monitors(alive, now())

    def _recheck_stale(self) -> None:
        """Before a call judges a node stale, read the heartbeats now: the watch loop may be late."""
        if not self._ledger.stale_nodes(now()) or time.monotonic() - self._heartbeats_read_at < HEARTBEAT_RECHECK_S:
            return
        self._heartbeats_read_at = time.monotonic()
        try:
            alive = self._heartbeats.changed()
        except Exception:  # judged on what the ledger knows
            log.exception("reading the monitors' heartbeats failed")
            return
        self._ledger.saw_monitors(alive, now())

    async def _reclaim_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ledger.settings.reclaim_interval_s)
            try:
                await self.reclaim()
            except Exception:  # keep reclaiming whatever one round hit
                log.exception("reclaim round failed")

    async def reclaim(self) -> list[str]:
        """Free reservations and startup locks whose owner actor is dead; returns their replica ids."""
        self._background()
        owners = sorted(self._ledger.owners())
        if not owners:
            return []
        alive = await asyncio.to_thread(lambda: {o: _actor_alive(o) for o in owners})
        # Owners may have changed while we looked: the ledger reclaims only what a dead one still owns.
        dead = self._ledger.reclaim({owner for owner, up in alive.items() if not up}, now())
        if dead:
            self._wake_waiters()
            await self._writer.durable()
            log.info("reclaimed %d replica(s) of dead owners: %s", len(dead), ", ".join(dead))
        return dead

    # -- the contract -----------------------------------------------------------------------

    async def ping(self) -> str:
        self._background()
        return "pong"

    async def configure(self, settings: PlacementSettings) -> PlacementSettings:
        """Replace the placement settings (overhead, stale timeout, reclaim interval)."""
        self._background()
        chosen = _validated(PlacementSettings, settings, "configure(settings)")
        if self._ledger.configure(chosen):
            if self._reclaimer is not None:
                self._reclaimer.cancel()  # the next round follows the new interval
                self._reclaimer = None
            self._background()
        await self._writer.durable()
        return chosen

    async def update_inventory(self, node_inventory: NodeInventory) -> None:
        """A node's current GPUs; its arrival time is the allocator's clock.

        A change of the node's GPUs is in the GCS when this returns; a change of their usage
        alone goes with the next write, within INVENTORY_PERSIST_INTERVAL_S.
        """
        self._background()
        inventory = _validated(NodeInventory, node_inventory, "update_inventory(node_inventory)")
        try:
            reshaped = self._ledger.update_inventory(inventory, now())
        except ValueError as error:
            raise ConfigError("update_inventory(node_inventory)", [str(error)]) from None
        if reshaped:
            await self._writer.durable()

    async def reserve(
        self,
        replica_id: str,
        model_id: str,
        bytes: int,
        gpu_uuid: str | None = None,
        owner: str | None = None,
        overhead_bytes: int | None = None,
        state: ReplicaLife = "awake",
        sleep: SleepTerms | None = None,
    ) -> Reservation:
        """Reserve `bytes` + `overhead_bytes` (None: the cluster's overhead) for a replica on `gpu_uuid`
        or the best-fitting GPU; `state` stopped with `sleep` terms: placed beyond the room awake
        (`Ledger.reserve`)."""
        self._background()
        if owner is not None and not _ACTOR_ID.match(owner):
            raise ReservationError(
                f"replica {replica_id}: owner {owner!r} is not a Ray actor id (32 hex digits, "
                "ray.get_runtime_context().get_actor_id())"
            )
        self._recheck_stale()
        terms = _validated(SleepTerms, sleep, "reserve(sleep)") if sleep is not None else None
        if state != "awake" and state != "stopped":
            raise ReservationError(f"replica {replica_id}: state must be awake or stopped, got {state!r}")
        reservation, _ = self._ledger.reserve(
            replica_id, model_id, bytes, now(), gpu_uuid, owner, overhead_bytes, state, terms
        )
        await self._writer.durable()
        return reservation

    # -- sleep and wake (`Ledger.sleep`, `stop`, `wake`, `touch`) ----------------------------------

    async def sleep(self, replica_id: str) -> Reservation:
        """Put an awake replica to sleep in the ledger (asleep at its level, or stopped); returns
        its reservation, settling: it holds the whole of it until its engine slept (`settle`) or
        stopped (`stop`). The replica's engine follows (it asked)."""
        self._background()
        reservation, _ = self._ledger.sleep(replica_id, now())
        self._busy.pop(replica_id, None)
        await self._writer.durable()
        return reservation

    async def settle(self, replica_id: str) -> Reservation:
        """A replica's engine slept (its memory is freed): it holds its sleeping footprint from now on."""
        self._background()
        reservation, _ = self._ledger.settle(replica_id, now())
        await self._writer.durable()
        return reservation

    async def stop(self, replica_id: str) -> Reservation:
        """Mark a replica stopped (its engine is gone; it holds nothing)."""
        self._background()
        reservation, _ = self._ledger.stop(replica_id, now())
        self._busy.pop(replica_id, None)
        await self._writer.durable()
        return reservation

    async def wake(self, replica_id: str) -> WakeOutcome:
        """Take a replica's whole reservation back when its GPU has the room; else evict the least
        recently used idle replicas of its GPU that sleep (never one that reported requests in
        flight): they hold their reservations until their engines let go, and the waker, left as it
        was, has them sleep and asks again (`Ledger.wake`)."""
        self._background()
        outcome, _ = self._ledger.wake(replica_id, now(), busy=self._busy_replicas())
        await self._writer.durable()
        return outcome

    def _busy_replicas(self) -> set[str]:
        """The replicas a wake must not evict for their requests in flight: those that reported some,
        and, for a while after a restart, every awake replica not heard from since (the busy map is
        not persisted; a busy replica reports within `BUSY_REPORT_INTERVAL_S`)."""
        busy = set(self._busy)
        if now() < self._busy_unknown_until:
            unheard = (r for r in self._ledger.reservations() if r.replica_id not in self._heard)
            busy |= {r.replica_id for r in unheard if r.state == "awake"}
        return busy

    async def in_flight(self) -> dict[str, int]:
        """Replica id → requests in flight, for the replicas that last reported some (busy)."""
        return dict(self._busy)

    async def report_use(self, replica_id: str, in_flight: int) -> None:
        """A replica's requests in flight now: while above 0 it is busy (a wake never evicts it), and
        it counts as used now (the order a wake evicts in). Kept in memory; its last use persists."""
        self._background()
        self._heard.add(replica_id)
        if in_flight > 0:
            self._busy[replica_id] = in_flight
        else:
            self._busy.pop(replica_id, None)
        if self._ledger.touch([replica_id], now()):
            self._writer.start()  # written with the next change, or within the idle flush

    async def reserve_many(self, requests: list[ReserveRequest]) -> list[ReserveOutcome]:
        """`reserve` for each request (`ReserveRequest` fields), in order, with one write for all.

        An invalid request (a missing field, bytes <= 0, an owner that is no actor id) refuses the
        whole batch before anything is reserved, naming its index. A valid one that does not fit
        is refused alone: its `ReserveOutcome` carries the error the single call would raise.
        """
        self._background()
        batch = _validated(_ReserveBatch, {"requests": requests}, "reserve_many(requests)")
        self._recheck_stale()
        outcomes, _ = self._ledger.reserve_many(batch.requests, now())
        await self._writer.durable()
        return outcomes

    async def release(self, replica_id: str) -> bool:
        """Free a replica's reservation and startup lock; False when it held neither."""
        self._background()
        released = self._ledger.release(replica_id, now())
        self._wake_waiters()
        await self._writer.durable()
        return released

    async def release_many(self, replica_ids: list[str]) -> list[bool]:
        """`release` for each replica id, in order, with one write for all; each answer as `release`'s."""
        self._background()
        batch = _validated(_ReleaseBatch, {"replica_ids": replica_ids}, "release_many(replica_ids)")
        released = self._ledger.release_many(batch.replica_ids, now())
        self._wake_waiters()
        await self._writer.durable()
        return released

    async def attach_process(self, replica_id: str, pid: int) -> None:
        """Mark `pid` as the replica's: its VRAM counts against the reservation, not as unmanaged."""
        self._background()
        self._ledger.attach_process(replica_id, pid)
        await self._writer.durable()

    async def plan(self, request: PlanRequest) -> Plan:
        """Plan `request.models` against current inventories and reservations (stale nodes and
        `exclude_nodes`, e.g. nodes that left the Ray cluster, take nothing new). By default the models
        are the whole desired state (other models' reservations are listed for release); `keep_others`:
        they are some of the cluster's models, and every other model's reservation keeps its room.
        `overheads`: model id → overhead in bytes, as the caller resolved it from the model's files."""
        self._background()
        chosen = _validated(PlanRequest, request, "plan(request)")
        specs = models_from_dicts(chosen.models, "plan(models)")  # unique names, as a config's
        self._recheck_stale()
        return self._ledger.plan(
            specs, now(), chosen.settings, frozenset(chosen.exclude_nodes), chosen.keep_others, chosen.overheads
        )

    async def settings(self) -> PlacementSettings:
        """The placement settings in force."""
        self._background()
        return self._ledger.settings

    async def reservations(self) -> list[Reservation]:
        self._background()
        return self._ledger.reservations()

    async def get_vram_state(self, node: str | None = None) -> VRAMState:
        """The ledger's state; with `node`, only that node's GPUs (a monitor's view)."""
        self._background()
        return self._ledger.state(now(), node)

    async def persistence(self) -> WriterStats:
        """How the ledger is persisted: writes, journal and snapshot sizes, and what the last load replayed."""
        return self._writer.stats()

    # -- startup locks ----------------------------------------------------------------------
    # The rules (who holds, FIFO order, who is next, dead owners) are `Ledger`'s; the actor only
    # keeps the callers waiting and wakes them when the ledger has decided.

    async def acquire_startup_lock(
        self, gpu_uuid: str, replica_id: str, timeout_s: float = 600, owner: str | None = None
    ) -> bool:
        """Wait (FIFO) until `replica_id` is the only one initialising on `gpu_uuid`; False on timeout.

        Re-acquiring a lock one already holds returns True at once. The lock follows the
        replica's reservation owner (or `owner`): when that actor dies, the lock is freed. A GPU
        whose starts need no serialising (a host-memory pseudo-GPU) grants it at once, to everyone.
        """
        self._background()
        granted, _ = self._ledger.acquire_startup_lock(gpu_uuid, replica_id, now(), owner)
        await self._writer.durable()
        if granted:
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault((gpu_uuid, replica_id), []).append(future)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=timeout_s)
        except TimeoutError:
            if future.done() and future.result():
                return True  # granted in the same tick the wait timed out
            future.cancel()
            self._ledger.drop_startup_waiter(gpu_uuid, replica_id)
            self._wake_waiters()
            return False

    async def release_startup_lock(self, gpu_uuid: str, replica_id: str) -> None:
        """Give the GPU's startup lock to the next waiter; a waiter calling it leaves the queue."""
        self._background()
        self._ledger.release_startup_lock(gpu_uuid, replica_id, now())
        self._wake_waiters()
        await self._writer.durable()

    def _wake_waiters(self) -> None:
        """End each wait the ledger has decided: True once it holds the lock, False once it left the queue."""
        for key, futures in list(self._waiting.items()):
            gpu_uuid, replica_id = key
            if self._ledger.holds_startup_lock(gpu_uuid, replica_id):
                result = True
            elif replica_id not in self._ledger.startup_waiters(gpu_uuid):
                result = False
            else:
                continue
            del self._waiting[key]
            for future in futures:
                with contextlib.suppress(asyncio.InvalidStateError):
                    future.set_result(result)


def get_vram_allocator() -> Any:
    """A handle to the cluster's `vram_allocator` (namespace `ray-vram`), created if missing.

    Race-safe: concurrent callers all end up with the same detached actor (`get_if_exists`).
    Ray restarts it forever on failure and retries calls that were in flight (every method is
    idempotent), and the ledger is reloaded from GCS, so callers see no gap but a delay.
    Call it through `AllocatorClient` / `AsyncAllocatorClient`: they type every argument and answer.
    """
    return cluster_actor(VRAMAllocator, ALLOCATOR_ACTOR, max_concurrency=1000, retry_calls=True)


def _plan_request(
    models: Sequence[ModelSpec],
    settings: PlacementSettings | None,
    exclude_nodes: Sequence[str],
    keep_others: bool,
    overheads: dict[str, int] | None,
) -> PlanRequest:
    return PlanRequest(
        models=list(models),
        settings=settings,
        exclude_nodes=sorted(exclude_nodes),
        keep_others=keep_others,
        overheads=dict(overheads or {}),
    )


class AllocatorClient:
    """The allocator's calls, typed, each waiting for its answer (`timeout_s`: at most this long,
    else Ray's `GetTimeoutError`; None: no limit). What the actor raised is raised here."""

    def __init__(self, handle: Any | None = None, timeout_s: float | None = None) -> None:
        self.handle = handle if handle is not None else get_vram_allocator()
        self.timeout_s = timeout_s

    def _get(self, ref: Any) -> Any:
        return ray.get(ref, timeout=self.timeout_s)

    def ping(self) -> str:
        return str(self._get(self.handle.ping.remote()))

    def configure(self, settings: PlacementSettings) -> PlacementSettings:
        return _checked(PlacementSettings, self._get(self.handle.configure.remote(settings)))

    def update_inventory(self, inventory: NodeInventory) -> None:
        self._get(self.handle.update_inventory.remote(inventory))

    def reserve(
        self,
        replica_id: str,
        model_id: str,
        n_bytes: int,
        gpu_uuid: str | None = None,
        owner: str | None = None,
        overhead_bytes: int | None = None,
        state: ReplicaLife = "awake",
        sleep: SleepTerms | None = None,
    ) -> Reservation:
        ref = self.handle.reserve.remote(replica_id, model_id, n_bytes, gpu_uuid, owner, overhead_bytes, state, sleep)
        return _checked(Reservation, self._get(ref))

    def sleep(self, replica_id: str) -> Reservation:
        return _checked(Reservation, self._get(self.handle.sleep.remote(replica_id)))

    def settle(self, replica_id: str) -> Reservation:
        return _checked(Reservation, self._get(self.handle.settle.remote(replica_id)))

    def stop(self, replica_id: str) -> Reservation:
        return _checked(Reservation, self._get(self.handle.stop.remote(replica_id)))

    def wake(self, replica_id: str) -> WakeOutcome:
        return _checked(WakeOutcome, self._get(self.handle.wake.remote(replica_id)))

    def in_flight(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self._get(self.handle.in_flight.remote()).items()}

    def report_use(self, replica_id: str, in_flight: int) -> None:
        self._get(self.handle.report_use.remote(replica_id, in_flight))

    def reserve_many(self, requests: Sequence[ReserveRequest]) -> list[ReserveOutcome]:
        return _checked_list(ReserveOutcome, self._get(self.handle.reserve_many.remote(list(requests))))

    def release(self, replica_id: str) -> bool:
        return bool(self._get(self.handle.release.remote(replica_id)))

    def release_many(self, replica_ids: Sequence[str]) -> list[bool]:
        return [bool(b) for b in self._get(self.handle.release_many.remote(list(replica_ids)))]

    def attach_process(self, replica_id: str, pid: int) -> None:
        self._get(self.handle.attach_process.remote(replica_id, pid))

    def plan(
        self,
        models: Sequence[ModelSpec],
        settings: PlacementSettings | None = None,
        exclude_nodes: Sequence[str] = (),
        keep_others: bool = False,
        overheads: dict[str, int] | None = None,
    ) -> Plan:
        """See `VRAMAllocator.plan`; planning reserves nothing."""
        request = _plan_request(models, settings, exclude_nodes, keep_others, overheads)
        return _checked(Plan, self._get(self.handle.plan.remote(request)))

    def settings(self) -> PlacementSettings:
        return _checked(PlacementSettings, self._get(self.handle.settings.remote()))

    def reservations(self) -> list[Reservation]:
        return _checked_list(Reservation, self._get(self.handle.reservations.remote()))

    def vram_state(self, node: str | None = None) -> VRAMState:
        return _checked(VRAMState, self._get(self.handle.get_vram_state.remote(node)))

    def persistence(self) -> WriterStats:
        return _checked(WriterStats, self._get(self.handle.persistence.remote()))

    def reclaim(self) -> list[str]:
        return [str(r) for r in self._get(self.handle.reclaim.remote())]

    def acquire_startup_lock(
        self, gpu_uuid: str, replica_id: str, timeout_s: float = 600, owner: str | None = None
    ) -> bool:
        return bool(self._get(self.handle.acquire_startup_lock.remote(gpu_uuid, replica_id, timeout_s, owner)))

    def release_startup_lock(self, gpu_uuid: str, replica_id: str) -> None:
        self._get(self.handle.release_startup_lock.remote(gpu_uuid, replica_id))


class AsyncAllocatorClient:
    """`AllocatorClient`'s calls for code on an event loop (a replica): each awaits its answer."""

    def __init__(self, handle: Any | None = None) -> None:
        self.handle = handle if handle is not None else get_vram_allocator()

    async def reserve(
        self,
        replica_id: str,
        model_id: str,
        n_bytes: int,
        gpu_uuid: str | None = None,
        owner: str | None = None,
        overhead_bytes: int | None = None,
        state: ReplicaLife = "awake",
        sleep: SleepTerms | None = None,
    ) -> Reservation:
        ref = self.handle.reserve.remote(replica_id, model_id, n_bytes, gpu_uuid, owner, overhead_bytes, state, sleep)
        return _checked(Reservation, await ref)

    async def sleep(self, replica_id: str) -> Reservation:
        return _checked(Reservation, await self.handle.sleep.remote(replica_id))

    async def settle(self, replica_id: str) -> Reservation:
        return _checked(Reservation, await self.handle.settle.remote(replica_id))

    async def stop(self, replica_id: str) -> Reservation:
        return _checked(Reservation, await self.handle.stop.remote(replica_id))

    async def wake(self, replica_id: str) -> WakeOutcome:
        return _checked(WakeOutcome, await self.handle.wake.remote(replica_id))

    async def report_use(self, replica_id: str, in_flight: int) -> None:
        await self.handle.report_use.remote(replica_id, in_flight)

    async def release(self, replica_id: str) -> bool:
        return bool(await self.handle.release.remote(replica_id))

    async def attach_process(self, replica_id: str, pid: int) -> None:
        await self.handle.attach_process.remote(replica_id, pid)

    async def acquire_startup_lock(
        self, gpu_uuid: str, replica_id: str, timeout_s: float = 600, owner: str | None = None
    ) -> bool:
        return bool(await self.handle.acquire_startup_lock.remote(gpu_uuid, replica_id, timeout_s, owner))

    async def release_startup_lock(self, gpu_uuid: str, replica_id: str) -> None:
        await self.handle.release_startup_lock.remote(gpu_uuid, replica_id)

    async def plan(
        self,
        models: Sequence[ModelSpec],
        settings: PlacementSettings | None = None,
        exclude_nodes: Sequence[str] = (),
        keep_others: bool = False,
        overheads: dict[str, int] | None = None,
    ) -> Plan:
        request = _plan_request(models, settings, exclude_nodes, keep_others, overheads)
        return _checked(Plan, await self.handle.plan.remote(request))


def _checked(model: type[_M], answer: Any) -> _M:
    """The actor's answer as `model`: an allocator from before the typed boundary answers dicts."""
    return answer if isinstance(answer, model) else model.model_validate(answer)


def _checked_list(model: type[_M], answers: Any) -> list[_M]:
    return [_checked(model, a) for a in answers]
