"""Prometheus metrics and the monitor's HTTP endpoints.

Names and labels are the contract in CONTRIBUTING.md ("Contracts between parts"); the chart's
dashboards and alerts use them. Gauges are rendered from the latest snapshot at scrape time, so a
GPU or replica that disappears also disappears from /metrics; counters and the poll histogram
accumulate for the life of the process.

Endpoints: /metrics (Prometheus text), /healthz (JSON; 503 when the poll loop has stalled),
/inventory (the node's inventory as JSON, the shape of `inventory.NodeInventory`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from ..core.inventory import NodeInventory
from .watchdog import ReplicaUsage

log = logging.getLogger(__name__)

GPU_LABELS = ["node", "gpu", "uuid", "gpu_name"]
REPLICA_LABELS = ["model_id", "replica", "node", "gpu"]
#: `kind` values of ray_vram_monitor_errors_total, exported at 0 from the start so rate() works.
ERROR_KINDS = ("nvml", "gpu_lost", "xid", "inventory_file", "allocator", "restart")
#: Poll durations from an NVML read of one GPU (~10 µs) to a stuck driver (seconds).
POLL_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Snapshot:
    """What one poll saw, joined with what the allocator last said."""

    inventory: NodeInventory
    usages: list[ReplicaUsage] = field(default_factory=list)
    managed_bytes: dict[str, int] = field(default_factory=dict)
    reserved_bytes: dict[str, int] = field(default_factory=dict)
    last_success: float | None = None


class MonitorMetrics:
    """The monitor's registry: snapshot gauges plus error/violation counters and the poll histogram."""

    def __init__(self, node: str):
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self._snapshot: Snapshot | None = None
        self.errors = Counter(
            "ray_vram_monitor_errors", "Errors met by the monitor, by kind.", ["node", "kind"], registry=self.registry
        )
        for kind in ERROR_KINDS:
            self.errors.labels(node, kind)
        self.violations = Counter(
            "ray_vram_watchdog_violations",
            "Times a replica stayed above its VRAM reservation (budget + overhead) plus margin for the configured "
            "number of polls.",
            REPLICA_LABELS,
            registry=self.registry,
        )
        self.poll_duration = Histogram(
            "ray_vram_monitor_poll_duration_seconds",
            "Time to read every GPU of the node once.",
            ["node"],
            buckets=POLL_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(self))

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def update(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def count_error(self, kind: str) -> None:
        self.errors.labels(self.node, kind).inc()

    def count_violation(self, usage: ReplicaUsage) -> None:
        replica = usage.replica
        self.violations.labels(replica.model_id, replica.replica_id, usage.node, str(usage.gpu_index)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SnapshotCollector:
    """Gauges from the latest snapshot, built at scrape time."""

    def __init__(self, metrics: MonitorMetrics):
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snapshot = self._metrics.snapshot
        node = self._metrics.node
        gauges = {
            key: GaugeMetricFamily(f"ray_vram_gpu_{key}", text, labels=GPU_LABELS)
            for key, text in (
                ("total_bytes", "Memory of the GPU (NVML total)."),
                ("used_bytes", "Memory in use on the GPU, by every process."),
                ("free_bytes", "Memory free on the GPU."),
                ("reserved_bytes", "Memory reserved by ray-vram replicas on the GPU (what each holds in its state)."),
                ("unmanaged_bytes", "Memory used on the GPU by processes ray-vram does not manage."),
                ("healthy", "1 when the last poll read the GPU without error and no critical XID was seen."),
            )
        }
        budget = GaugeMetricFamily(
            "ray_vram_replica_budget_bytes",
            "VRAM budget of a replica (vLLM's share); its reservation adds the model's overhead.",
            labels=REPLICA_LABELS,
        )
        reservation = GaugeMetricFamily(
            "ray_vram_replica_reservation_bytes",
            "VRAM reservation of a replica: budget + overhead, the hard cap of its engine.",
            labels=REPLICA_LABELS,
        )
        used = GaugeMetricFamily(
            "ray_vram_replica_used_bytes", "VRAM a replica's processes use on its GPU (NVML).", labels=REPLICA_LABELS
        )
        held = GaugeMetricFamily(
            "ray_vram_replica_held_bytes",
            "VRAM a replica holds in its state: its reservation awake, its sleeping footprint asleep, 0 stopped.",
            labels=REPLICA_LABELS,
        )
        asleep = GaugeMetricFamily(
            "ray_vram_replica_asleep",
            "1 while a replica sleeps or is stopped (its model sleeps).",
            labels=REPLICA_LABELS,
        )
        last = GaugeMetricFamily(
            "ray_vram_monitor_last_poll_timestamp_seconds",
            "Unix time of the last poll that read the node's GPUs.",
            labels=["node"],
        )
        if snapshot is not None:
            for gpu in snapshot.inventory.gpus:
                labels = [gpu.node, str(gpu.index), gpu.uuid, gpu.name]
                managed = snapshot.managed_bytes.get(gpu.uuid, 0)
                values = {
                    "total_bytes": gpu.total_bytes,
                    "used_bytes": gpu.used_bytes,
                    "free_bytes": gpu.total_bytes - gpu.used_bytes,
                    "reserved_bytes": snapshot.reserved_bytes.get(gpu.uuid, 0),
                    "unmanaged_bytes": max(0, gpu.used_bytes - managed),
                    "healthy": 1 if gpu.healthy else 0,
                }
                for key, value in values.items():
                    gauges[key].add_metric(labels, value)
            for usage in snapshot.usages:
                labels = [usage.replica.model_id, usage.replica.replica_id, usage.node, str(usage.gpu_index)]
                budget.add_metric(labels, usage.replica.budget_bytes)
                reservation.add_metric(labels, usage.replica.reservation_bytes)
                used.add_metric(labels, usage.used_bytes)
                held.add_metric(labels, usage.replica.held_bytes)
                asleep.add_metric(labels, 0 if usage.replica.state == "awake" else 1)
            if snapshot.last_success is not None:
                last.add_metric([node], snapshot.last_success)
        yield from gauges.values()
        yield budget
        yield reservation
        yield held
        yield asleep
        yield used
        yield last


class MonitorHTTPServer:
    """/metrics, /healthz and /inventory on one port, served from daemon threads."""

    def __init__(self, metrics: MonitorMetrics, host: str, port: int, health: Any):
        self.metrics = metrics
        handler = _handler(metrics, health)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="monitor-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(metrics: MonitorMetrics, health: Any) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, metrics.render())
            elif path == "/healthz":
                status, body = health()
                self._send(status, "application/json", json.dumps(body).encode())
            elif path == "/inventory":
                snapshot = metrics.snapshot
                if snapshot is None:
                    self._send(503, "application/json", b'{"error": "no poll completed yet"}')
                else:
                    self._send(200, "application/json", snapshot.inventory.model_dump_json().encode())
            else:
                self._send(404, "text/plain", b"not found: try /metrics, /healthz or /inventory\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http %s", format % args)

    return Handler
