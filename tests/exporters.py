"""The project's Prometheus exporters with fixed contents, for the tests that check the chart's
alerts and dashboards against what the exporters really emit.

- `replica_monitor_metrics()`: the monitor's real registry (`MonitorMetrics`) after a poll that saw
  one GPU running two replicas, one of them flagged by the watchdog. A running monitor shows
  replica series only for reservations it reads from the allocator (a Ray cluster); this gives
  those series without one; `polling()` keeps it current.
- `ControllerStandIn` + `controller_api()`: the serving controller's real WSGI app and /metrics
  collector over a stand-in for `Controller`, whose real self needs Ray and the allocator actor.

Imported by tests/chart and tests/monitor (tests/ is on sys.path through its conftest.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
import types
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.parser import text_string_to_metric_families

from vram_scheduler.inventory import NodeInventory
from vram_scheduler.monitor.exporter import MonitorMetrics, Snapshot
from vram_scheduler.monitor.watchdog import ReplicaBudget, ReplicaUsage

GIB = 1024**3
NODE = "gpu-1"
GPU_UUID = "GPU-11111111-0000-0000-0000-000000000001"


def replica_monitor_metrics() -> MonitorMetrics:
    """One poll's metrics on `gpu-1`: GPU 1 runs `greedy-0` (over budget, flagged once) and `honest-0`."""
    inventory = NodeInventory.model_validate(
        {"node": NODE, "gpus": [{"index": 1, "uuid": GPU_UUID, "name": "NVIDIA GeForce RTX 4090", "total_gb": 24}]}
    )
    greedy = ReplicaUsage(ReplicaBudget("greedy-0", "greedy", GPU_UUID, 2 * GIB), NODE, 1, 5 * GIB)
    honest = ReplicaUsage(ReplicaBudget("honest-0", "honest", GPU_UUID, 4 * GIB), NODE, 1, 3 * GIB)
    metrics = MonitorMetrics(NODE)
    metrics.update(
        Snapshot(
            inventory,
            usages=[greedy, honest],
            managed_bytes={GPU_UUID: 8 * GIB},
            reserved_bytes={GPU_UUID: 10 * GIB},
            last_success=time.time(),
        )
    )
    metrics.count_violation(greedy)
    metrics.poll_duration.labels(NODE).observe(3e-5)
    return metrics


@contextlib.contextmanager
def polling(metrics: MonitorMetrics, interval_s: float = 0.2) -> Iterator[None]:
    """Stands in for the monitor's poll loop: the snapshot's poll time and the poll histogram move on,
    so the registry never looks stale to an alert, and rates over it are not empty."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            snapshot = metrics.snapshot
            assert snapshot is not None
            metrics.update(dataclasses.replace(snapshot, last_success=time.time()))
            metrics.poll_duration.labels(metrics.node).observe(3e-5)

    thread = threading.Thread(target=loop, name="stand-in-poll", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


class ControllerStandIn:
    """What the controller's /metrics collector reads from `Controller`: model status, reconcile
    counts and the allocator's state (answered directly instead of through a Ray actor)."""

    def __init__(self) -> None:
        self.reconciles = {"ok": 12, "error": 1}
        state = {"nodes": [{"node": NODE}, {"node": "gpu-2"}], "gpus": [{"node": NODE, "replicas": ["a", "b"]}]}
        state["stale_nodes"] = ["gpu-2"]
        self.allocator = types.SimpleNamespace(get_vram_state=types.SimpleNamespace(remote=lambda: state))

    def status(self) -> dict[str, Any]:
        replicas = [{"state": "ready"}, {"state": "starting"}]
        return {"models": [{"model_id": "big", "requested": 3, "replicas": replicas, "unplaced": []}]}


@contextlib.contextmanager
def controller_collector_without_ray() -> Iterator[None]:
    """`ray.get` inside the controller's HTTP module returns its argument: the stand-in's answers
    are plain values, not object references."""
    from vram_scheduler.serving import http_api

    real = http_api.ray
    http_api.ray = types.SimpleNamespace(get=lambda value, **_: value)
    try:
        yield
    finally:
        http_api.ray = real


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def controller_api() -> Iterator[int]:
    """The controller's HTTP API over `ControllerStandIn` on 127.0.0.1; yields its port."""
    from vram_scheduler.serving.http_api import ControllerAPI

    with controller_collector_without_ray():
        app = ControllerAPI(ControllerStandIn())
        server: WSGIServer = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
        thread = threading.Thread(target=server.serve_forever, name="controller-api", daemon=True)
        thread.start()
        try:
            yield server.server_port
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)


def controller_exposition() -> str:
    """The controller's /metrics text over `ControllerStandIn`."""
    from prometheus_client import generate_latest

    from vram_scheduler.serving.http_api import ControllerAPI

    with controller_collector_without_ray():
        return generate_latest(ControllerAPI(ControllerStandIn()).metrics).decode()


def series_labels(text: str) -> dict[str, set[str]]:
    """Series name → label names, over every sample of a Prometheus text exposition."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels
