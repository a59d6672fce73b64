"""Sleep and wake metrics of the replicas, recorded through Ray's metrics API (each Ray node's
metrics agent exports them, with `ray_` before each name, where the chart's scrape objects read):
how often replicas sleep and wake, how long a wake takes (to the engine answering again), how
often a wake evicted others, and each replica's state. The bytes each state holds are the
monitor's (`ray_vram_replica_held_bytes` beside the budget and reservation).
"""

from __future__ import annotations

#: Series names as Prometheus shows them (what the dashboards, alerts and README name).
WAKES = "ray_vram_replica_wakes_total"
SLEEPS = "ray_vram_replica_sleeps_total"
EVICTIONS = "ray_vram_replica_evictions_total"
WAKE_SECONDS = "ray_vram_replica_wake_seconds"
STATE = "ray_vram_replica_state"
#: Every series name these metrics give in Prometheus.
SERIES = frozenset({WAKES, SLEEPS, EVICTIONS, STATE, *(f"{WAKE_SECONDS}_{s}" for s in ("bucket", "sum", "count"))})
#: Wake buckets (seconds): a GPU level-1 wake (~0.3 s) to a cold start of a large model.
WAKE_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
STATES = ("awake", "asleep", "stopped")


class SleepMetrics:
    """One replica's sleep and wake series (labels: model_id, replica)."""

    def __init__(self, model_id: str, replica: str):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"model_id": model_id, "replica": replica}
        self.wakes = Counter(
            WAKES.removeprefix("ray_").removesuffix("_total"),
            "Wakes of a replica by how: woken (sleep mode), started (its engine was stopped), failed.",
            ("model_id", "replica", "how"),
        )
        self.sleeps = Counter(
            SLEEPS.removeprefix("ray_").removesuffix("_total"),
            "Times a replica went to sleep, by the state it reached (asleep, stopped) and why (idle, evicted, "
            "operator).",
            ("model_id", "replica", "state", "why"),
        )
        self.evictions = Counter(
            EVICTIONS.removeprefix("ray_").removesuffix("_total"),
            "Replicas a wake of this replica put to sleep or stopped to make room.",
            ("model_id", "replica"),
        )
        self.wake_seconds = Histogram(
            WAKE_SECONDS.removeprefix("ray_"),
            "Seconds from a wake's call to the engine answering again (room taken, evictions, engine wake or start).",
            WAKE_BUCKETS,
            ("model_id", "replica", "how"),
        )
        self.state = Gauge(
            STATE.removeprefix("ray_"),
            "1 for the state a replica is in (awake, asleep, stopped).",
            ("model_id", "replica", "state"),
        )

    def set_state(self, state: str) -> None:
        for each in STATES:
            self.state.set(1.0 if each == state else 0.0, tags=self.tags | {"state": each})

    def woke(self, seconds: float, cold: bool, evicted: int) -> None:
        how = "started" if cold else "woken"
        self.wakes.inc(1, tags=self.tags | {"how": how})
        self.wake_seconds.observe(seconds, tags=self.tags | {"how": how})
        if evicted:
            self.evictions.inc(evicted, tags=self.tags)
        self.set_state("awake")

    def wake_failed(self, seconds: float) -> None:
        self.wakes.inc(1, tags=self.tags | {"how": "failed"})
        self.wake_seconds.observe(seconds, tags=self.tags | {"how": "failed"})
        self.set_state("stopped")

    def slept(self, state: str, why: str) -> None:
        self.sleeps.inc(1, tags=self.tags | {"state": state, "why": why})
        self.set_state(state)
