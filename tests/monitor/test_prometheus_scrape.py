"""A real Prometheus scrapes the project's exporters, evaluates the chart's alert rules and answers
every dashboard query those exporters can feed: names, label names, metric types (`_total`,
`_bucket`) and PromQL all meet for real, which a parser alone cannot show.

Targets (all on 127.0.0.1, scraped every second):
- `monitor`: a `ray-vram monitor` process on a declared two-GPU inventory (GPU metrics, polls,
  errors), as in the other tests of this folder.
- `replicas`: the monitor's exporter (its real registry and HTTP server) in this process after a
  poll that saw two replicas, one flagged by the watchdog. A monitor process exports replica series
  only for reservations it reads from the allocator, which needs a Ray cluster (tests/monitor/
  test_allocator_link.py covers that path, without Prometheus).
- `controller`: the serving controller's real HTTP API and /metrics collector over a stand-in for
  `Controller` (tests/exporters.py), whose real self needs Ray and the allocator actor.

Dashboard queries not covered here, all on metrics of Ray and vLLM (tests/chart/data/
external-metrics.yaml), which need a Ray node's metrics agent and a running vLLM engine:
`ray_node_gram_used` (Cluster VRAM: "GPU memory as Ray sees it"), `ray_serve_deployment_*`
(Models: "Requests per Serve deployment"; Health: "Healthy Serve replicas") and `ray_vllm_*`
(Models: time to first token, generated tokens, queue, KV cache). tests/serving checks that a
running replica exports those names.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import yaml
from chart.test_dashboards import dashboard_exprs, external_metrics, metric_names
from chart.test_promtool_rules import rule_groups
from exporters import controller_api, polling, replica_monitor_metrics, series_labels
from promstack import PrometheusServer

from vram_scheduler.monitor.exporter import MonitorHTTPServer

from .conftest import Monitor, inventory_yaml


@pytest.fixture(scope="module")
def monitor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitor]:
    path = tmp_path_factory.mktemp("inventory") / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory_yaml()))
    process = Monitor(f"--inventory-file={path}")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()
        process.close()


@pytest.fixture(scope="module")
def replica_exporter() -> Iterator[MonitorHTTPServer]:
    metrics = replica_monitor_metrics()
    server = MonitorHTTPServer(metrics, "127.0.0.1", 0, health=lambda: (200, {"status": "ok"}))
    server.start()
    try:
        with polling(metrics):
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def controller_port() -> Iterator[int]:
    with controller_api() as port:
        yield port


@pytest.fixture(scope="module")
def prometheus(
    monitor: Monitor,
    replica_exporter: MonitorHTTPServer,
    controller_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrometheusServer]:
    """Prometheus with the chart's rules (default values), once every target has been scraped 3 times:
    enough samples for rate() and increase()."""
    rules = tmp_path_factory.mktemp("rules") / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups(values=())}, sort_keys=False))
    targets = {
        "monitor": f"127.0.0.1:{monitor.port}",
        "replicas": f"127.0.0.1:{replica_exporter.port}",
        "controller": f"127.0.0.1:{controller_port}",
    }
    server = PrometheusServer(targets, rule_files=[rules])
    try:
        server.wait_targets_up()
        server.wait_until(
            lambda: len(server.query("count_over_time(up[1m]) >= 3")) == len(targets), "3 scrapes of every target"
        )
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(prometheus: PrometheusServer) -> set[str]:
    """Every series name Prometheus holds from the targets."""
    return set(prometheus.api("label/__name__/values"))


def test_the_targets_serve_their_metrics(served: set[str], monitor: Monitor) -> None:
    status, body = monitor.get("/metrics")
    assert status == 200
    assert set(series_labels(body.decode())) - {n for n in served if n.endswith("_created")} <= served
    assert {"ray_vram_replica_used_bytes", "ray_vram_model_replicas", "ray_vram_allocator_stale_nodes"} <= served


def covered(expr: str, served: set[str]) -> bool:
    return metric_names(expr) <= served


def test_every_dashboard_query_on_our_metrics_returns_data(prometheus: PrometheusServer, served: set[str]) -> None:
    problems, skipped = [], set()
    for where, expr in dashboard_exprs():
        if not covered(expr, served):
            skipped |= metric_names(expr) - served
            continue
        result = prometheus.query(expr)
        values = [float(item["value"][1]) for item in result]
        if not values:
            problems.append(f"{where}: {expr!r} returned nothing")
        elif not all(math.isfinite(v) for v in values):
            problems.append(f"{where}: {expr!r} returned {values}")
    assert not problems, "\n".join(problems)
    assert skipped <= set(external_metrics()), f"dashboard metrics nothing here serves: {sorted(skipped)}"
    queried = [expr for _, expr in dashboard_exprs() if covered(expr, served)]
    assert len(queried) >= 20, f"only {len(queried)} dashboard queries were checked"


def test_the_chart_rules_evaluate_and_the_expected_alerts_are_active(prometheus: PrometheusServer) -> None:
    """Over the targets' contents: `greedy-0` is over budget and was flagged once, one replica of
    `big` is unplaced and one node is stale; the GPUs are healthy and the monitor polls."""
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert len(rules) == 7

    def evaluated() -> list[dict] | None:
        current = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        return current if all(rule.get("lastEvaluation", "").startswith("20") for rule in current) else None

    rules = prometheus.wait_until(evaluated, "every rule evaluated")
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    active = {
        alert["labels"]["alertname"]: alert["labels"]
        for alert in prometheus.wait_until(lambda: prometheus.api("alerts")["alerts"], "active alerts")
    }
    assert set(active) == {
        "RayVRAMReplicaOverBudget",
        "RayVRAMWatchdogViolations",
        "RayVRAMUnplacedReplicas",
        "RayVRAMAllocatorStaleNodes",
    }, active
    assert active["RayVRAMReplicaOverBudget"]["replica"] == "greedy-0"
    assert active["RayVRAMWatchdogViolations"]["replica"] == "greedy-0"
    assert active["RayVRAMUnplacedReplicas"]["model_id"] == "big"
