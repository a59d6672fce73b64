"""The monitor's poll loop: read the GPUs, measure replicas, run the watchdog, export, publish.

One poll every `interval_s` (0.5 s by default). Nothing in a poll blocks on the network: the
allocator link runs in its own thread and the HTTP server in others, so a poll costs what the
reader costs (NVML: microseconds per GPU) plus a little bookkeeping.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from pydantic import Field

from ..core.config import StrictModel, gib_to_bytes
from .exporter import MonitorHTTPServer, MonitorMetrics, Snapshot
from .pids import ProcessMatcher
from .publisher import AllocatorLink
from .readers import Reader, ReadError
from .watchdog import DEFAULT_WATCHDOG_MARGIN_GB, Violation, Watchdog, measure

log = logging.getLogger(__name__)

#: Error kinds that mean the GPUs were not read this poll (the last-success timestamp stays put).
READ_FAILURES = frozenset({"nvml", "gpu_lost", "inventory_file"})


class MonitorSettings(StrictModel):
    """How one node's monitor runs (the `ray-vram monitor` flags)."""

    node: str = Field(min_length=1, description="Node name published with the inventory and used in metric labels.")
    interval_s: float = Field(default=0.5, gt=0, le=3600, description="Seconds between polls.")
    host: str = Field(default="0.0.0.0", description="Address the HTTP endpoints listen on.")
    port: int = Field(default=9400, ge=0, le=65535, description="Port of /metrics, /healthz, /inventory (0 = any).")
    ray_address: str | None = Field(
        default=None, description="Ray cluster to publish to (`host:6379`, `ray://host:10001`); None = do not publish."
    )
    watchdog_margin_bytes: int = Field(
        default=gib_to_bytes(DEFAULT_WATCHDOG_MARGIN_GB),
        ge=0,
        description="Usage above the reservation (budget + overhead) tolerated before a poll counts as over.",
    )
    watchdog_polls: int = Field(default=3, ge=1, description="Consecutive polls over reservation + margin to flag.")
    restart_over_budget: bool = Field(
        default=False, description="Kill a flagged replica's owner actor through Ray (Serve starts a new one)."
    )
    max_backoff_s: float = Field(default=30.0, gt=0, description="Longest wait between allocator retries.")


class _Throttle:
    """Log a repeating message once per window, with how many were held back."""

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self._last: dict[str, tuple[float, int]] = {}

    def warn(self, key: str, message: str) -> None:
        now = time.monotonic()
        last, held = self._last.get(key, (float("-inf"), 0))
        if now - last >= self.window_s:
            suffix = f" ({held} similar message(s) held back)" if held else ""
            log.warning("%s%s", message, suffix)
            self._last[key] = (now, 0)
        else:
            self._last[key] = (last, held + 1)


class MonitorService:
    """Poll loop + exporter + watchdog + allocator link for one node."""

    def __init__(self, reader: Reader, settings: MonitorSettings):
        self.reader = reader
        self.settings = settings
        self.node = settings.node
        self.metrics = MonitorMetrics(self.node)
        self.watchdog = Watchdog(settings.watchdog_margin_bytes, settings.watchdog_polls)
        self.matcher = ProcessMatcher()
        self.link = (
            AllocatorLink(settings.ray_address, self.node, settings.interval_s, self._error, settings.max_backoff_s)
            if settings.ray_address
            else None
        )
        self.server: MonitorHTTPServer | None = None
        self.polls = 0
        self.last_poll_at: float | None = None
        self._last_success: float | None = None
        self._stop = threading.Event()
        self._throttle = _Throttle()

    # -- one poll ---------------------------------------------------------------------------

    def poll_once(self) -> Snapshot:
        started = time.perf_counter()
        view = self.link.view if self.link else None
        reading = self.reader.read(view.pids if view else ())
        for error in reading.errors:
            self._read_error(error)
        inventory = reading.inventory
        if not any(e.kind in READ_FAILURES for e in reading.errors):
            self._last_success = inventory.timestamp
        usages, managed = measure(inventory, view.replicas if view else [], self.matcher)
        for violation in self.watchdog.observe(usages):
            self._violation(violation)
        snapshot = Snapshot(
            inventory=inventory,
            usages=usages,
            managed_bytes=managed,
            reserved_bytes=view.reserved_bytes if view else {},
            last_success=self._last_success,
        )
        self.metrics.update(snapshot)
        if self.link:
            self.link.offer(inventory)
        self.metrics.poll_duration.labels(self.node).observe(time.perf_counter() - started)
        self.polls += 1
        self.last_poll_at = time.time()
        return snapshot

    def _read_error(self, error: ReadError) -> None:
        self.metrics.count_error(error.kind)
        self._throttle.warn(f"{error.kind}:{error.gpu_index}", f"poll error ({error.kind}): {error.message}")

    def _error(self, kind: str, message: str) -> None:
        self.metrics.count_error(kind)
        self._throttle.warn(kind, message)

    def _violation(self, violation: Violation) -> None:
        self.metrics.count_violation(violation.usage)
        replica, usage = violation.usage.replica, violation.usage
        restart = self.settings.restart_over_budget and self.link is not None and replica.owner is not None
        log.warning(
            "event=watchdog_violation model_id=%s replica=%s node=%s gpu=%d used_bytes=%d budget_bytes=%d "
            "margin_bytes=%d polls=%d action=%s: %s",
            replica.model_id,
            replica.replica_id,
            usage.node,
            usage.gpu_index,
            usage.used_bytes,
            replica.budget_bytes,
            violation.margin_bytes,
            violation.polls,
            "restart" if restart else "report",
            violation.describe(),
        )
        if restart and self.link is not None and replica.owner is not None:
            self.link.request_restart(replica.owner, violation.describe())

    # -- health -----------------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        """200 while polls keep coming (GPU trouble shows in metrics, not as a dead pod)."""
        now = time.time()
        limit = max(5.0, 3 * self.settings.interval_s)
        age = None if self.last_poll_at is None else now - self.last_poll_at
        snapshot = self.metrics.snapshot
        body: dict[str, Any] = {
            "node": self.node,
            "source": self.reader.source,
            "polls": self.polls,
            "last_poll_age_s": None if age is None else round(age, 3),
            "unhealthy_gpus": [g.index for g in snapshot.inventory.gpus if not g.healthy] if snapshot else [],
            "allocator": None if self.link is None else ("connected" if self.link.connected else "unreachable"),
        }
        ok = age is not None and age <= limit
        body["status"] = "ok" if ok else f"stalled: no poll for {'ever' if age is None else f'{age:.1f} s'}"
        return (200 if ok else 503), body

    # -- lifecycle --------------------------------------------------------------------------

    def start_http(self) -> int:
        self.server = MonitorHTTPServer(self.metrics, self.settings.host, self.settings.port, self.health)
        self.server.start()
        return self.server.port

    def run(self) -> None:
        """Poll until `stop()`; then close the HTTP server, the allocator link and the reader."""
        if self.server is None:
            self.start_http()
        if self.link:
            self.link.start()
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                self.poll_once()
                self._stop.wait(max(0.0, self.settings.interval_s - (time.monotonic() - started)))
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.link is not None:
            self.link.stop()
        self.reader.close()
