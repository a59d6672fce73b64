"""The monitor's Prometheus exporter with fixed contents, for the tests that check the chart's
alerts and dashboards against what the exporters really emit (the serving controller's come from a
running local stack: tests/monitor/test_prometheus_scrape.py).

- `replica_monitor_metrics()`: the monitor's real registry (`MonitorMetrics`) after a poll that saw
  one GPU running two replicas, one of them flagged by the watchdog. A running monitor shows
  replica series only for reservations it reads from the allocator (a Ray cluster); this gives
  those series without one; `polling()` keeps it current.
- `series_labels()`: series name → label names of an exposition.

Imported by tests/chart and tests/monitor (pytest puts tests/ on the path: pyproject.toml `pythonpath`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families

from vram_scheduler.core.inventory import NodeInventory
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

    thread = threading.Thread(target=loop, name="poll-loop", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def series_labels(text: str) -> dict[str, set[str]]:
    """Series name → label names, over every sample of a Prometheus text exposition."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels
