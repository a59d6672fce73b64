"""The `vram_allocator` actor: the cluster's one VRAM ledger, as a named, detached Ray actor.

A thin shell around `ledger.Ledger`: it serialises calls (an asyncio actor runs one method at
a time between awaits), persists the ledger to Ray's GCS key-value store after every change
and reloads it when Ray restarts the actor, reclaims reservations and startup locks of owner
actors that died, and hands out per-GPU startup locks in FIFO order (two vLLM engines
initialising on one GPU at once mis-size each other's KV cache).

Get it with `get_vram_allocator()`; every method returns plain dicts (pydantic dumps).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
from typing import Any, TypeVar

import ray
from pydantic import BaseModel, ValidationError
from ray.experimental import internal_kv

from .config import ConfigError, PlacementSettings, describe_validation_error
from .inventory import NodeInventory
from .ledger import Ledger, ReservationError, VRAMState, models_from_dicts, now

__all__ = [
    "ACTOR_NAME",
    "NAMESPACE",
    "ReservationError",
    "VRAMAllocator",
    "VRAMState",
    "get_vram_allocator",
]

NAMESPACE = "ray-vram"
ACTOR_NAME = "vram_allocator"
#: GCS internal KV key (namespace `ray-vram`) holding the persisted ledger snapshot.
LEDGER_KEY = "allocator/ledger"
#: Inventory-only changes reach the GCS at most this often: every monitor republishes its node each
#: poll (a restarted allocator relearns within one), while reservations are written at once.
INVENTORY_PERSIST_INTERVAL_S = 5.0

_M = TypeVar("_M", bound=BaseModel)
_ACTOR_ID = re.compile(r"^[0-9a-f]{32}$")
log = logging.getLogger(__name__)


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
        raw = internal_kv._internal_kv_get(LEDGER_KEY, namespace=NAMESPACE)
        self._ledger = Ledger.loads(raw) if raw else Ledger()
        if raw:
            log.info("ledger reloaded: %d reservation(s)", len(self._ledger.data.entries))
        self._waiting: dict[tuple[str, str], list[asyncio.Future[bool]]] = {}  # (GPU, replica) → its callers
        self._reclaimer: asyncio.Task[None] | None = None
        self._persisted_at = 0.0
        # The reclaim loop lives on the actor's event loop, which __init__ does not run on: one
        # call to ourselves starts it, so a restarted allocator reclaims before anyone calls it.
        threading.Thread(target=self._kick, name="vram-allocator-kick", daemon=True).start()

    @staticmethod
    def _kick() -> None:
        try:
            ray.get_runtime_context().current_actor.ping.remote()
        except Exception:  # the first real call starts the loop anyway
            log.exception("could not start the reclaim loop from __init__")

    # -- plumbing ---------------------------------------------------------------------------

    def _persist(self) -> None:
        internal_kv._internal_kv_put(LEDGER_KEY, self._ledger.dumps(), overwrite=True, namespace=NAMESPACE)
        self._persisted_at = time.monotonic()

    def _background(self) -> None:
        if self._reclaimer is None or self._reclaimer.done():
            self._reclaimer = asyncio.get_running_loop().create_task(self._reclaim_loop())

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
            self._persist()
            self._wake_waiters()
            log.info("reclaimed %d replica(s) of dead owners: %s", len(dead), ", ".join(dead))
        return dead

    # -- the contract -----------------------------------------------------------------------

    async def ping(self) -> str:
        self._background()
        return "pong"

    async def configure(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Replace the placement settings (overhead, stale timeout, reclaim interval)."""
        self._background()
        if self._ledger.configure(_validated(PlacementSettings, settings, "configure(settings)")):
            self._persist()
            if self._reclaimer is not None:
                self._reclaimer.cancel()  # the next round follows the new interval
                self._reclaimer = None
            self._background()
        return self._ledger.settings.model_dump()

    async def update_inventory(self, node_inventory: dict[str, Any]) -> None:
        """A node's current GPUs (a `NodeInventory` dump); its arrival time is the allocator's clock."""
        self._background()
        inventory = _validated(NodeInventory, node_inventory, "update_inventory(node_inventory)")
        try:
            self._ledger.update_inventory(inventory, now())
        except ValueError as error:
            raise ConfigError("update_inventory(node_inventory)", [str(error)]) from None
        if time.monotonic() - self._persisted_at >= INVENTORY_PERSIST_INTERVAL_S:
            self._persist()

    async def reserve(
        self,
        replica_id: str,
        model_id: str,
        bytes: int,
        gpu_uuid: str | None = None,
        owner: str | None = None,
    ) -> dict[str, Any]:
        """Reserve `bytes` (+ overhead) for a replica on `gpu_uuid` or the best-fitting GPU."""
        self._background()
        if owner is not None and not _ACTOR_ID.match(owner):
            raise ReservationError(
                f"replica {replica_id}: owner {owner!r} is not a Ray actor id (32 hex digits, "
                "ray.get_runtime_context().get_actor_id())"
            )
        reservation, changed = self._ledger.reserve(replica_id, model_id, bytes, now(), gpu_uuid, owner)
        if changed:
            self._persist()
        return reservation.model_dump()

    async def release(self, replica_id: str) -> bool:
        """Free a replica's reservation and startup lock; False when it held neither."""
        self._background()
        released = self._ledger.release(replica_id, now())
        if released:
            self._persist()
        self._wake_waiters()
        return released

    async def attach_process(self, replica_id: str, pid: int) -> None:
        """Mark `pid` as the replica's: its VRAM counts against the reservation, not as unmanaged."""
        self._background()
        if self._ledger.attach_process(replica_id, pid):
            self._persist()

    async def plan(
        self,
        models: list[dict[str, Any]],
        settings: dict[str, Any] | None = None,
        exclude_nodes: list[str] | None = None,
    ) -> dict[str, Any]:
        """Plan `models` against current inventories and reservations (stale nodes and `exclude_nodes`,
        e.g. nodes that left the Ray cluster, take nothing new)."""
        self._background()
        specs = models_from_dicts(models, "plan(models)")
        chosen = _validated(PlacementSettings, settings, "plan(settings)") if settings is not None else None
        return self._ledger.plan(specs, now(), chosen, frozenset(exclude_nodes or ())).model_dump()

    async def reservations(self) -> list[dict[str, Any]]:
        self._background()
        return [r.model_dump() for r in self._ledger.reservations()]

    async def get_vram_state(self) -> dict[str, Any]:
        self._background()
        return self._ledger.state(now()).model_dump()

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
        granted, changed = self._ledger.acquire_startup_lock(gpu_uuid, replica_id, now(), owner)
        if changed:
            self._persist()
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
        if self._ledger.release_startup_lock(gpu_uuid, replica_id, now()):
            self._persist()
        self._wake_waiters()

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


#: A sliver of the resource only the head node has (a restarted head too): pins an actor there.
HEAD_NODE_RESOURCE = {"node:__internal_head__": 0.001}


def on_head_node() -> dict[str, Any]:
    """Actor options that place it on the head node, which lives as long as the cluster (a worker
    node may leave). A resource, not a soft node affinity: Ray 2.60 spreads actors asking for no
    CPU over the nodes whatever node a soft affinity names (seen with a 2-node cluster)."""
    return {"resources": dict(HEAD_NODE_RESOURCE)}


def get_vram_allocator() -> ray.actor.ActorHandle:
    """A handle to the cluster's `vram_allocator` (namespace `ray-vram`), created if missing.

    Race-safe: concurrent callers all end up with the same detached actor (`get_if_exists`).
    Ray restarts it forever on failure and retries calls that were in flight (every method is
    idempotent), and the ledger is reloaded from GCS, so callers see no gap but a delay.
    """
    if not ray.is_initialized():
        ray.init(namespace=NAMESPACE)
    with contextlib.suppress(ValueError):
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    handle = (
        ray.remote(VRAMAllocator)
        .options(
            name=ACTOR_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=-1,
            num_cpus=0,
            max_concurrency=1000,
            **on_head_node(),
        )
        .remote()
    )
    ray.get(handle.ping.remote())
    return handle
