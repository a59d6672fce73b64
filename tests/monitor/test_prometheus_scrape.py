"""A real Prometheus scrapes the project's exporters and a running local stack, evaluates the
chart's alert rules and answers every dashboard query: names, label names, metric types (`_total`,
`_bucket`) and PromQL all meet for real, which a parser alone cannot show.

Targets (all on 127.0.0.1, scraped every second):
- `monitor`: a `ray-vram monitor` process on a declared two-GPU inventory (GPU metrics, polls,
  errors), as in the other tests of this folder.
- `replicas`: the monitor's exporter (its real registry and HTTP server) in this process after a
  poll that saw two replicas, one flagged by the watchdog. A monitor process exports replica series
  only for reservations it reads from the allocator and usage it reads from the GPUs; a replica
  over its budget needs a GPU (tests/monitor/test_allocator_link.py covers that path with Ray).
- `controller`: the serving controller's /metrics in `ray-vram up`'s local stack (tests/stack.py:
  Ray, allocator, controller, a vLLM CPU replica of the demo model), in a state the alerts show:
  `tiny` asks for two replicas where one fits (one pending), a second node's monitor died (a stale
  node), and one deploy failed (a reconcile error) while Prometheus watched.
- `ray`: Ray's metrics agent on the stack's node (Ray Serve's, vLLM's and the routers' metrics, as
  the chart's scrape objects read them), after real requests to `tiny` (completions, streamed and
  not, and chat) and one for a model nobody serves while Prometheus watched.

Dashboard query not covered here: `ray_node_gram_used` (Cluster VRAM: "GPU memory as Ray sees
it"), which Ray's agent exports only for GPUs it sees through the driver; the CI machine has none.
"""

from __future__ import annotations

import json
import math
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from chart.test_dashboards import controller_metrics, dashboard_exprs, external_metrics, metric_names, router_metrics
from chart.test_promtool_rules import input_series_problems, rule_groups
from exporters import polling, replica_monitor_metrics, series_labels
from promstack import PrometheusServer
from stack import LocalStack, demo_model_spec
from waiting import wait_until

from vram_scheduler.monitor.exporter import MonitorHTTPServer
from vram_scheduler.serving.replica.sleep_metrics import SERIES as SLEEP_SERIES
from vram_scheduler.serving.router.metrics import UNKNOWN_MODEL

from .conftest import Monitor, inventory_yaml

pytestmark = pytest.mark.slow

MODEL = "tiny"
LOST_NODE = "lost-node"
#: Ray's agent exports GPU memory only for GPUs it sees: none on a CPU-only CI machine.
#: No model here sleeps: the replicas' sleep and wake series appear with the first sleep or wake
#: (tests/serving/test_sleep.py reads them from Ray's metrics agent).
NOT_HERE = {"ray_node_gram_used"} | set(SLEEP_SERIES)
STALE_MONITOR_S = 5
#: Counters the dashboards take rates of: requests must reach them while Prometheus scrapes.
MOVING = (
    "ray_vllm_generation_tokens_total",
    "ray_vllm_time_to_first_token_seconds_bucket",
    "ray_vram_router_requests_total",
    "ray_vram_router_request_duration_seconds_bucket",
    "ray_vram_router_time_to_first_byte_seconds_bucket",
)
#: A model name no router serves (counted under UNKNOWN_MODEL).
TYPO = "tiny-typo"


def http(method: str, url: str, body: dict | None = None, token: str = "") -> tuple[int, Any]:
    """`method url` with an optional JSON body (and the controller `token`) → (status, decoded JSON or text)."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


@pytest.fixture(scope="module")
def local_stack() -> Iterator[LocalStack]:
    """Two replicas of `tiny` asked for, one placed: 1.5 GiB + 5 GiB overhead per replica fits the
    8 GiB GPU once and the 4 GiB GPU never (one vLLM engine, what a 2-core machine affords). A node
    is stale 3 s after its last inventory."""
    placement = {"replica_overhead_gb": 5, "stale_after_s": 3}
    with LocalStack([demo_model_spec(MODEL, replicas=2)], values={"placement": placement}) as running:
        yield running


@pytest.fixture(scope="module")
def lost_node(local_stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second node's monitor publishes its inventory to the stack's allocator and is killed, as a
    lost GPU node's would be: the allocator reports the node stale from then on."""
    path = tmp_path_factory.mktemp("lost") / "inventory.yaml"
    # One 4 GiB GPU: tiny's pending replica (6.5 GiB with its overhead) stays pending. (A GPU that
    # holds it would take it: the controller places pending replicas on a node whose inventory joins.)
    small = {"index": 0, "uuid": f"GPU-{LOST_NODE}-0", "name": "NVIDIA T4", "total_gb": 4}
    path.write_text(yaml.safe_dump({"nodes": [{"node": LOST_NODE, "gpus": [small]}]}))
    process = Monitor(f"--inventory-file={path}", f"--ray-address={local_stack.gcs_address}")
    vram = f"{local_stack.controller}/v1/vram"
    try:
        process.wait_ready()
        # A Ray driver joining takes seconds, more on a 2-core machine under load.
        wait_until(
            lambda: LOST_NODE in {n["node"] for n in http("GET", vram, token=local_stack.token)[1]["nodes"]},
            180,
            "the lost node's inventory",
            every_s=0.5,
        )
    except BaseException:
        print(process.log())
        raise
    finally:
        process.stop(signal.SIGKILL)
        process.close()
    wait_until(
        lambda: LOST_NODE in http("GET", vram, token=local_stack.token)[1]["stale_nodes"],
        60,
        "the lost node marked stale",
        every_s=0.5,
    )
    return LOST_NODE


@pytest.fixture(scope="module")
def monitor_inventory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The monitor's declared inventory (it reads the file again whenever the file changes)."""
    path = tmp_path_factory.mktemp("inventory") / "inventory.yaml"
    path.write_text(yaml.safe_dump(inventory_yaml()))
    return path


@pytest.fixture(scope="module")
def monitor(monitor_inventory: Path) -> Iterator[Monitor]:
    process = Monitor(f"--inventory-file={monitor_inventory}")
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
def prometheus(
    monitor: Monitor,
    replica_exporter: MonitorHTTPServer,
    local_stack: LocalStack,
    lost_node: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrometheusServer]:
    """Prometheus with the chart's rules (default values), once every target has been scraped 3 times
    (enough samples for rate() and increase()), after a failed deploy and requests to `tiny`."""
    rules = tmp_path_factory.mktemp("rules") / "rules.yaml"
    # Default values, but a monitor is stale after 5 s (60 s by default) so a killed one shows soon.
    groups = rule_groups(values=(), sets=(f"monitoring.alerts.staleMonitorSeconds={STALE_MONITOR_S}",))
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    targets = {
        "monitor": f"127.0.0.1:{monitor.port}",
        "replicas": f"127.0.0.1:{replica_exporter.port}",
        "controller": local_stack.controller.removeprefix("http://"),
        "ray": local_stack.ray_metrics.removeprefix("http://").removesuffix("/metrics"),
    }
    server = PrometheusServer(targets, rule_files=[rules], bearer_tokens={"controller": local_stack.token})
    try:
        server.wait_targets_up()
        server.wait_until(
            lambda: len(server.query("count_over_time(up[1m]) >= 3")) == len(targets), "3 scrapes of every target"
        )
        fail_a_deploy(local_stack, server)
        send_requests(local_stack, server)
        yield server
    finally:
        server.stop()


def fail_a_deploy(stack: LocalStack, prometheus: PrometheusServer) -> None:
    """A model no GPU can hold: the controller refuses it and counts a reconcile error, which
    Prometheus sees rise from 0."""
    status, body = http(
        "POST", f"{stack.controller}/v1/deployments", demo_model_spec("huge", vram_gb=20), token=stack.token
    )
    assert status == 409, body
    prometheus.wait_until(
        lambda: prometheus.query('ray_vram_controller_reconciles_total{result="error"} > 0'), "the error scraped"
    )


def stream_completion(stack: LocalStack, prompt: str) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{stack.endpoint}/completions", json=body, timeout=60, trust_env=False) as response:
        assert response.status_code == 200
        assert "[DONE]" in "".join(response.iter_text())


def send_requests(stack: LocalStack, prometheus: PrometheusServer, timeout_s: float = 180) -> None:
    """Requests to `tiny` (chat, and streamed completions) and one for a model nobody serves, until
    Prometheus sees the counters the dashboards take rates of move: Ray's agent exports what
    replicas and routers recorded every few seconds."""
    from vram_scheduler import inference

    status, _ = http("POST", f"{stack.endpoint}/completions", {"model": TYPO, "prompt": "x", "max_tokens": 1})
    assert status == 404
    deadline = time.monotonic() + timeout_s
    for round in range(1000):
        for i in range(2):
            assert inference(f"ping {round} {i}", MODEL, base_url=stack.endpoint, max_tokens=2)
            stream_completion(stack, f"stream {round} {i}")
        still = [name for name in MOVING if not prometheus.query(f"sum(rate({name}[5m])) > 0")]
        if not still:
            return
        assert time.monotonic() < deadline, f"rates still 0 after {timeout_s}s of requests: {still}"
        time.sleep(3)


@pytest.fixture(scope="module")
def served(prometheus: PrometheusServer) -> set[str]:
    """Every series name Prometheus holds from the targets."""
    return set(prometheus.api("label/__name__/values"))


def test_the_targets_serve_their_metrics(served: set[str], monitor: Monitor, local_stack: LocalStack) -> None:
    status, body = monitor.get("/metrics")
    assert status == 200
    assert set(series_labels(body.decode())) - {n for n in served if n.endswith("_created")} <= served
    status, _ = http("GET", f"{local_stack.controller}/metrics")
    assert status == 401, "the controller's /metrics answered without its token"
    status, text = http("GET", f"{local_stack.controller}/metrics", token=local_stack.token)
    assert status == 200
    assert set(series_labels(text)) == controller_metrics()
    assert controller_metrics() <= served
    assert {"ray_vram_replica_used_bytes", "ray_serve_deployment_replica_healthy"} <= served
    assert router_metrics() - NOT_HERE <= served


def test_the_routers_count_by_bounded_labels(prometheus: PrometheusServer) -> None:
    """The routers' request counter as Prometheus holds it: `tiny`'s chat and completions answered
    200, the unknown name under one bucket with its 404, each router named by its deployment."""
    series = prometheus.query("ray_vram_router_requests_total")
    print("\n".join(f"{item['metric']} {item['value'][1]}" for item in series))  # the report's sample
    by = {(s["metric"]["model_id"], s["metric"]["route"], s["metric"]["code"]) for s in series}
    assert {(MODEL, "chat", "200"), (MODEL, "completions", "200"), (UNKNOWN_MODEL, "completions", "404")} <= by
    assert not {model for model, _, _ in by} - {MODEL, UNKNOWN_MODEL}, by  # no series named after the typo
    assert {s["metric"]["router"] for s in series} <= {"OpenAIRouter", "OpenAIRouter-1"}
    timed = prometheus.query("sum by (model_id, route) (ray_vram_router_request_duration_seconds_count)")
    print("\n".join(f"requests timed {item['metric']} {item['value'][1]}" for item in timed))
    assert {(s["metric"]["model_id"], s["metric"]["route"]) for s in timed} == {(MODEL, "chat"), (MODEL, "completions")}


def test_the_promtool_input_series_are_what_the_real_controller_emits(local_stack: LocalStack) -> None:
    """tests/chart's promtool alert tests feed the controller's series with these names and labels."""
    status, text = http("GET", f"{local_stack.controller}/metrics", token=local_stack.token)
    assert status == 200
    problems = input_series_problems(series_labels(text), controller_metrics())
    assert not problems, "\n".join(problems)


def covered(expr: str, served: set[str]) -> bool:
    return metric_names(expr) <= served


def test_every_dashboard_query_returns_data(prometheus: PrometheusServer, served: set[str]) -> None:
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
    assert skipped <= NOT_HERE, f"dashboard metrics nothing here serves: {sorted(skipped)}"
    assert set(external_metrics()) - NOT_HERE <= served


def test_the_chart_rules_evaluate_and_the_expected_alerts_are_active(prometheus: PrometheusServer) -> None:
    """`greedy-0` is over its reservation and was flagged once (the replica exporter); one replica of `tiny`
    is pending, `lost-node` is stale and a deploy just failed (the real controller); the GPUs are
    healthy and the monitor polls."""
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert len(rules) == 8

    def evaluated() -> list[dict] | None:
        current = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        return current if all(rule.get("lastEvaluation", "").startswith("20") for rule in current) else None

    rules = prometheus.wait_until(evaluated, "every rule evaluated")
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    expected = {
        "RayVRAMReplicaOverReservation",
        "RayVRAMWatchdogViolations",
        "RayVRAMPendingReplicas",
        "RayVRAMAllocatorStaleNodes",
        "RayVRAMControllerReconcileErrors",
    }

    def all_active() -> dict[str, dict] | None:
        active = {a["labels"]["alertname"]: a["labels"] for a in prometheus.api("alerts")["alerts"]}
        return active if set(active) >= expected else None

    try:
        active = prometheus.wait_until(all_active, "the expected alerts active")
    except AssertionError as error:
        seen = {a["labels"]["alertname"]: a["state"] for a in prometheus.api("alerts")["alerts"]}
        raise AssertionError(f"alerts active {seen}, expected {sorted(expected)}") from error
    assert set(active) == expected, active
    assert active["RayVRAMReplicaOverReservation"]["replica"] == "greedy-0"
    assert active["RayVRAMWatchdogViolations"]["replica"] == "greedy-0"
    assert active["RayVRAMPendingReplicas"]["model_id"] == MODEL


def test_faults_fire_their_alerts(prometheus: PrometheusServer, monitor: Monitor, monitor_inventory: Path) -> None:
    """Last in this module (it kills the monitor): a GPU that turns unhealthy and a monitor that dies
    raise their alerts in the real Prometheus, from the real monitor's series."""

    def active(name: str, **labels: str) -> dict | None:
        for alert in prometheus.api("alerts")["alerts"]:
            if alert["labels"]["alertname"] == name and labels.items() <= alert["labels"].items():
                return alert
        return None

    assert active("RayVRAMGPUUnhealthy") is None and active("RayVRAMMonitorStale") is None
    monitor_inventory.write_text(yaml.safe_dump(inventory_yaml(healthy=False)))
    unhealthy = prometheus.wait_until(lambda: active("RayVRAMGPUUnhealthy", gpu="1"), "GPU 1 unhealthy alert")
    assert unhealthy["labels"]["node"] == "ci-node" and unhealthy["state"] in ("pending", "firing")
    assert active("RayVRAMGPUUnhealthy", gpu="0") is None

    monitor.stop(signal.SIGKILL)  # the target goes down: its series end, and the alert fires anyway
    stale = prometheus.wait_until(lambda: active("RayVRAMMonitorStale", node="ci-node"), "monitor stale alert")
    assert stale["state"] == "firing"  # the rule has no `for`
    assert "has not polled for" in stale["annotations"]["summary"]
