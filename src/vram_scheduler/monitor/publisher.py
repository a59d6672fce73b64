"""The monitor's link to the allocator: publish the node's inventory, read reservations back.

It runs in its own thread so that a slow or absent Ray cluster never delays a poll or a scrape:
the poll loop offers each new inventory (latest wins) and reads the latest allocator view. While
the allocator is unreachable the link retries with exponential backoff (with jitter) and counts
each failure; metrics keep being exported from NVML alone meanwhile.

A second thread writes a heartbeat (the latest sample's time) to the GCS every interval
(`heartbeats.py`): calls to the allocator may wait behind a burst of reservations, and the node
must not go stale meanwhile.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core import capacity
from ..core.contract import VRAMState
from ..core.inventory import NodeInventory
from .watchdog import ReplicaBudget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AllocatorView:
    """Reservations on this node's GPUs, as last read from the allocator."""

    replicas: list[ReplicaBudget] = field(default_factory=list)
    reserved_bytes: dict[str, int] = field(default_factory=dict)
    fetched_at: float = 0.0

    @classmethod
    def from_state(cls, state: VRAMState, node: str, fetched_at: float) -> AllocatorView:
        parsed = state
        replicas, reserved = [], {}
        for gpu in parsed.gpus:
            if gpu.node != node:
                continue
            reserved[gpu.uuid] = gpu.reserved_bytes
            for r in gpu.replicas:
                pids = tuple(dict.fromkeys([*r.pids, *([r.pid] if r.pid is not None else [])]))
                overhead = capacity.held_overhead(r.overhead_bytes, parsed.settings)
                replicas.append(
                    ReplicaBudget(
                        r.replica_id, r.model_id, gpu.uuid, r.bytes, pids, r.owner, overhead, r.state, r.held_bytes
                    )
                )
        return cls(replicas, reserved, fetched_at)

    @property
    def pids(self) -> set[int]:
        return {pid for r in self.replicas for pid in r.pids}


def _kill_owner(actor_id: str) -> str:
    """Runs inside the cluster (works for drivers and Ray Client alike): kill a replica's owner actor.

    Serve notices the dead replica actor and starts a replacement; other replicas are untouched.
    """
    import ray
    from ray._private import state

    info = state.actors(actor_id)
    if not info or info.get("State") == "DEAD":
        return f"actor {actor_id} is already gone"
    name, namespace = info.get("Name"), info.get("RayNamespace")
    if not name:
        raise RuntimeError(f"actor {actor_id} has no name: it cannot be looked up to be restarted")
    ray.kill(ray.get_actor(name, namespace=namespace))
    return f"killed actor {name} ({actor_id}, namespace {namespace})"


class AllocatorLink:
    """Publishes inventories to `vram_allocator` and fetches its state, from a background thread."""

    def __init__(
        self,
        address: str | None,
        node: str,
        interval_s: float,
        on_error: Callable[[str, str], None],
        max_backoff_s: float = 30.0,
        call_timeout_s: float = 10.0,
    ):
        self.address = address
        self.node = node
        self.interval_s = interval_s
        self.max_backoff_s = max_backoff_s
        self.call_timeout_s = call_timeout_s
        self._on_error = on_error
        self._pending: NodeInventory | None = None
        self._restarts: list[tuple[str, str]] = []
        self._view: AllocatorView | None = None
        self._wake = threading.Condition()
        self._stop = False
        self._connected = False
        self._owns_ray = False
        self._allocator: Any = None
        self._kill: Any = None
        self._backoff = 0.0
        self._next_try = 0.0
        self.published = 0
        self.last_published_at: float | None = None
        self.heartbeats = 0
        self._sampled_at: float | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="allocator-link", daemon=True)
        self._beat_thread = threading.Thread(target=self._beat, name="allocator-heartbeat", daemon=True)

    # -- used by the poll loop --------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._beat_thread.start()

    def offer(self, inventory: NodeInventory) -> None:
        with self._wake:
            self._pending = inventory
            self._sampled_at = inventory.timestamp
            self._wake.notify()

    def request_restart(self, actor_id: str, why: str) -> None:
        with self._wake:
            self._restarts.append((actor_id, why))
            self._wake.notify()

    @property
    def view(self) -> AllocatorView | None:
        return self._view

    @property
    def connected(self) -> bool:
        return self._connected

    def stop(self, timeout_s: float = 2.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._stopped.set()
        self._thread.join(timeout_s)
        self._beat_thread.join(timeout_s)
        if not self._thread.is_alive() and self._owns_ray:
            import ray

            ray.shutdown()

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stop and (self._pending is None and not self._restarts):
                    self._wake.wait()
                if self._stop:
                    return
                wait = self._next_try - time.monotonic()
                if wait > 0:
                    self._wake.wait(wait)
                    if self._stop:
                        return
                    continue
                inventory, self._pending = self._pending, None
                restarts, self._restarts = self._restarts, []
            try:
                self._connect()
                if inventory is not None:
                    self._publish(inventory)
                for actor_id, why in restarts:
                    self._restart(actor_id, why)
                self._backoff = 0.0
            except Exception as error:
                self._failed(error, inventory, restarts)

    def _beat(self) -> None:
        """Each interval, write the latest sample's time as this node's heartbeat (if it is new)."""
        from ..allocator.heartbeats import write_heartbeat
        from ..core.ray_names import NAMESPACE

        written = None
        while not self._stopped.wait(self.interval_s):
            sampled = self._sampled_at
            if sampled is None or sampled == written or not self._connected:
                continue
            try:
                write_heartbeat(self.node, sampled, NAMESPACE)
            except Exception as error:  # the link's own calls report an unreachable cluster
                log.debug("heartbeat of %s not written: %s", self.node, error)
                continue
            written = sampled
            self.heartbeats += 1

    def _failed(self, error: Exception, inventory: NodeInventory | None, restarts: list[tuple[str, str]]) -> None:
        self._connected = False
        self._allocator = None
        if self._owns_ray:
            # Start the next attempt from a fresh connection: a Ray Client session that lost its
            # server stays "initialized" but never works again.
            import ray

            try:
                ray.shutdown()
            except Exception as shutdown_error:
                log.debug("ray.shutdown after a failed call: %s", shutdown_error)
            self._owns_ray = False
        self._backoff = min(self.max_backoff_s, max(self.interval_s, self._backoff * 2))
        delay = self._backoff * random.uniform(0.8, 1.2)
        self._next_try = time.monotonic() + delay
        self._on_error(
            "allocator", f"allocator at {self.address or 'the local Ray'} unreachable: {error}; retry in {delay:.1f} s"
        )
        with self._wake:
            if self._pending is None:
                self._pending = inventory
            self._restarts = restarts + self._restarts

    def _connect(self) -> None:
        if self._allocator is not None:
            return
        import ray

        from ..allocator.actor import AllocatorClient
        from ..core.loopback import prepare_ray_join
        from ..core.ray_names import NAMESPACE

        if not ray.is_initialized():
            if self.address:
                _check_reachable(self.address)
            prepare_ray_join(self.address)
            ray.init(
                address=self.address,
                namespace=NAMESPACE,
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
            self._owns_ray = True
        self._allocator = AllocatorClient(timeout_s=self.call_timeout_s)
        self._kill = ray.remote(num_cpus=0, max_retries=0)(_kill_owner)
        self._connected = True
        log.info("connected to the allocator (%s)", self.address or "local Ray")

    def _publish(self, inventory: NodeInventory) -> None:
        self._allocator.update_inventory(inventory)
        self.published += 1
        self.last_published_at = time.time()
        state = self._allocator.vram_state(self.node)
        self._view = AllocatorView.from_state(state, self.node, time.time())

    def _restart(self, actor_id: str, why: str) -> None:
        import ray

        try:
            result = ray.get(self._kill.remote(actor_id), timeout=self.call_timeout_s)
        except ray.exceptions.RayError as error:
            self._on_error("restart", f"restarting replica owner {actor_id} failed: {error}")
            return
        log.warning("watchdog restart: %s (%s)", result, why)


def _check_reachable(address: str) -> None:
    """Fail fast (seconds, not minutes) when the Ray address does not even accept TCP connections."""
    target = address.removeprefix("ray://")
    if target == "auto" or ":" not in target:
        return
    host, port = target.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=3):
        pass
