"""The endpoint board: the one table every router replica routes by.

Replicas announce themselves here (a `contract.ReplicaEndpoint` every few seconds) and the
controller declares the configured models; each router replica keeps a copy and long-polls the
board for changes (`watch`), so any number of routers, on any nodes, route alike, and a router
that (re)starts has the whole table before it answers a request. (A registration sent through a
Serve handle reaches one replica of the router only, which had kept the router at one replica.)

The board is not in the request path: routers serve from their copy while it restarts. Its table
lives in Ray's GCS key-value store, like the allocator's ledger, so Ray restarts it (forever)
without losing a replica; one not heard from for `EXPIRE_AFTER_S` is dropped. The board is named
after the router application it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from pydantic import ValidationError
from ray.experimental import internal_kv

from ..allocator.cluster_actors import cluster_actor, connect
from ..core.config import ModelSpec
from ..core.contract import EndpointTable, ModelAvailability, ReplicaEndpoint, RoutedModel
from ..core.ray_names import NAMESPACE

log = logging.getLogger(__name__)

#: The board of router application APP is the actor `ray-vram-endpoints:APP` (namespace `ray-vram`).
BOARD_ACTOR_PREFIX = "ray-vram-endpoints:"
#: GCS internal KV key prefix (namespace `ray-vram`) of each board's table.
TABLE_KEY_PREFIX = "serving/endpoints/"
#: A replica not heard from for this long is dropped (replicas announce themselves every 2 s).
EXPIRE_AFTER_S = 15.0
#: Longest a router's `watch` waits for a change before it asks again.
WATCH_TIMEOUT_S = 30.0


@dataclass
class Board:
    """The table's rules (plain Python): what changes it, and so bumps its version."""

    version: int = 0
    models: list[RoutedModel] = field(default_factory=list)
    endpoints: dict[str, ReplicaEndpoint] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, table: EndpointTable, now: float) -> Board:
        """A board from a stored table; every endpoint counts as just heard from."""
        endpoints = {e.replica_id: e for e in table.endpoints}
        return cls(table.version, list(table.models), endpoints, dict.fromkeys(endpoints, now))

    def table(self) -> EndpointTable:
        return EndpointTable(
            version=self.version,
            models=self.models,
            endpoints=[self.endpoints[rid] for rid in sorted(self.endpoints)],
        )

    def register(self, endpoint: ReplicaEndpoint, now: float) -> bool:
        self.seen[endpoint.replica_id] = now
        if self.endpoints.get(endpoint.replica_id) == endpoint:
            return False
        self.endpoints[endpoint.replica_id] = endpoint
        self.version += 1
        return True

    def unregister(self, replica_id: str) -> bool:
        self.seen.pop(replica_id, None)
        if self.endpoints.pop(replica_id, None) is None:
            return False
        self.version += 1
        return True

    def declare(self, models: list[RoutedModel]) -> bool:
        if models == self.models:
            return False
        self.models = list(models)
        self.version += 1
        return True

    def expire(self, now: float) -> list[str]:
        gone = sorted(rid for rid, seen in self.seen.items() if now - seen > EXPIRE_AFTER_S)
        for replica_id in gone:
            self.unregister(replica_id)
        return gone


class EndpointBoard:
    """The board as a Ray actor. Get it with `endpoint_board()`, never directly."""

    def __init__(self, app: str) -> None:
        self.key = TABLE_KEY_PREFIX + app
        raw = internal_kv._internal_kv_get(self.key, namespace=NAMESPACE)
        self.board = Board.load(EndpointTable.model_validate_json(raw), time.monotonic()) if raw else Board()
        self._changed = asyncio.Event()
        self._expirer: asyncio.Task[None] | None = None

    def _after_change(self) -> None:
        internal_kv._internal_kv_put(
            self.key, self.board.table().model_dump_json(), overwrite=True, namespace=NAMESPACE
        )
        self._changed.set()
        self._changed = asyncio.Event()

    def _background(self) -> None:
        if self._expirer is None or self._expirer.done():
            self._expirer = asyncio.get_running_loop().create_task(self._expire_loop())

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_AFTER_S / 3)
            gone = self.board.expire(time.monotonic())
            if gone:
                log.warning("replica(s) %s stopped announcing themselves: dropped", ", ".join(gone))
                self._after_change()

    async def register(self, endpoint: dict[str, Any]) -> None:
        self._background()
        try:
            parsed = ReplicaEndpoint.model_validate(endpoint)
        except ValidationError as error:
            log.error("bad registration %s: %s", endpoint, error)
            return
        if self.board.register(parsed, time.monotonic()):
            self._after_change()

    async def unregister(self, replica_id: str) -> bool:
        self._background()
        changed = self.board.unregister(replica_id)
        if changed:
            self._after_change()
        return changed

    async def declare(self, models: list[dict[str, Any]]) -> None:
        self._background()
        if self.board.declare([RoutedModel.model_validate(m) for m in models]):
            self._after_change()

    async def table(self) -> dict[str, Any]:
        self._background()
        return self.board.table().model_dump(mode="json")

    async def watch(self, version: int, timeout_s: float = WATCH_TIMEOUT_S) -> dict[str, Any]:
        """The table once its version differs from `version` (at once if it does), or after `timeout_s`."""
        self._background()
        if self.board.version == version:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        return self.board.table().model_dump(mode="json")


def routed_models(
    specs: Sequence[ModelSpec], availability: Mapping[str, ModelAvailability] | None = None
) -> list[dict[str, Any]]:
    """`declare`'s argument for these models (`availability`: by model id, what the controller knows)."""
    known = availability or {}
    return [
        RoutedModel(
            model_id=s.model_id, names=s.names, max_tokens=s.max_tokens, availability=known.get(s.model_id)
        ).model_dump(mode="json")
        for s in specs
    ]


#: (cluster GCS address, app) → handle: a process may join another cluster later (tests do).
_handles: dict[tuple[str, str], Any] = {}


def endpoint_board(app: str, fresh: bool = False) -> Any:
    """The endpoint board of router application `app`, created if missing (race-safe); the handle
    is kept per process (`fresh`: look it up again, after a call on the kept one failed)."""
    connect()
    key = (ray.get_runtime_context().gcs_address, app)
    if key in _handles and not fresh:
        return _handles[key]
    handle = cluster_actor(
        EndpointBoard, BOARD_ACTOR_PREFIX + app, app, max_concurrency=1000, retry_calls=True, wait_ready=False
    )
    _handles[key] = handle
    return handle
