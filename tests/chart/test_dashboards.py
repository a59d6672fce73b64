"""Dashboards and alerts: valid JSON made by the generator, every PromQL expression parses (the
`promql-parser` package: Prometheus' grammar), and every metric it names is one the project's
exporters (the monitor, the controller, the routers) emit or a documented Ray/vLLM metric."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import promql_parser
import pytest

from vram_scheduler.core.loopback import free_port

from .helm import CHART, DATA, ROOT, load, render

DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$node": ".*", "$model": ".*"}


def grafana_to_promql(expr: str) -> str:
    """Grafana's variables replaced by values, as Grafana does before querying."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        for panel in doc["panels"]:
            for target in panel.get("targets", []):
                yield f"{path.name}: {panel['title']}", grafana_to_promql(target["expr"])
        for variable in doc["templating"]["list"]:
            query = variable.get("query")
            if isinstance(query, dict):
                match = re.fullmatch(r"label_values\((.+), *\w+\)", query["query"])
                assert match, f"{path.name}: unexpected variable query {query['query']!r}"
                yield f"{path.name}: variable {variable['name']}", match.group(1)


def alert_exprs() -> Iterator[tuple[str, str]]:
    docs = render(sets=["monitoring.prometheusOperator=always"])
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            yield f"alert {item['alert']}", item["expr"]


def metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression selects, from its syntax tree."""
    names: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name in {expr!r}"
            names.add(node.name)
            return
        for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if isinstance(child, promql_parser.Expr):
                walk(child)
        for child in getattr(node, "args", None) or []:
            walk(child)

    walk(promql_parser.parse(expr))
    return names


def test_dashboards_are_generated_and_valid_json() -> None:
    assert len(DASHBOARDS) == 3
    result = subprocess.run(
        [sys.executable, str(CHART / "hack" / "gen-dashboards.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for path in DASHBOARDS:
        doc = json.loads(path.read_text())
        assert doc["uid"] and doc["title"].startswith("ray-vram / ") and doc["panels"]


def test_dashboard_config_maps_are_labelled_for_grafana() -> None:
    docs = render()
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    assert len(maps) == len(DASHBOARDS)
    for config_map in maps:
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        (content,) = config_map["data"].values()
        assert json.loads(content)["uid"]


def test_promql_parser_rejects_bad_expressions() -> None:
    with pytest.raises(ValueError):
        promql_parser.parse("sum by (node (ray_vram_gpu_used_bytes)")


def all_exprs() -> list[tuple[str, str]]:
    return [*dashboard_exprs(), *alert_exprs()]


def test_every_expression_parses() -> None:
    problems = []
    for where, expr in all_exprs():
        try:
            promql_parser.parse(expr)
        except ValueError as error:
            problems.append(f"{where}: {expr!r}: {error}")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def monitor_metrics() -> set[str]:
    """Metric names a running `ray-vram monitor` exports (serving a declared inventory)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vram_scheduler.cli",
        "monitor",
        "--inventory-file",
        str(ROOT / "values" / "inventory-example.yaml"),
    ]
    cmd += ["--node", "gpu-1", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                if "ray_vram_gpu_total_bytes" in text:
                    break
            except OSError:
                pass
            assert process.poll() is None, f"ray-vram monitor exited: {process.stderr.read()}"
            assert time.monotonic() < deadline, "ray-vram monitor did not serve /metrics in 60 s"
            time.sleep(0.3)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return exposition_names(text)


def exposition_names(text: str) -> set[str]:
    """Series names a Prometheus scrape yields, from the `# TYPE` lines (metrics without samples too)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)
        names.update(name.removesuffix("_total") + s if s == "_total" else name + s for s in suffixes.get(kind, []))
    return names


@cache
def controller_metrics() -> set[str]:
    """Metric families the serving controller's /metrics collector builds (read from its source: a
    running controller needs a Ray cluster and the allocator)."""
    source = ROOT / "src" / "vram_scheduler" / "serving" / "controller" / "http_api.py"
    names = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("GaugeMetricFamily", "CounterMetricFamily"):
            name = node.args[0].value
            names.add(name + "_total" if node.func.id == "CounterMetricFamily" else name)
    return names


def router_metrics() -> set[str]:
    """Series the routers and replicas record through Ray's metrics API (each node's metrics agent
    exports them): requests at the routers, sleeps and wakes of the replicas."""
    from vram_scheduler.serving.replica.sleep_metrics import SERIES as SLEEP_SERIES
    from vram_scheduler.serving.router.metrics import SERIES

    return set(SERIES) | set(SLEEP_SERIES)


def external_metrics() -> dict[str, dict]:
    return load((DATA / "external-metrics.yaml").read_text())


def test_external_metrics_are_defined_by_the_installed_packages() -> None:
    for name, entry in external_metrics().items():
        spec = find_spec(entry["package"])
        assert spec and spec.origin, f"{entry['package']} is not installed"
        source = Path(spec.origin).parent / entry["defined_in"]
        assert f'"{entry["source_name"]}"' in source.read_text(), f"{name}: {entry['source_name']} not in {source}"
        assert entry["docs"].startswith("https://")


def test_every_metric_is_exported_or_documented(monitor_metrics: set[str]) -> None:
    ours = monitor_metrics | controller_metrics() | router_metrics()
    assert {"ray_vram_gpu_used_bytes", "ray_vram_model_replicas", "ray_vram_router_requests_total"} <= ours
    known = ours | set(external_metrics())
    unknown = sorted(
        {f"{where}: {name}" for where, expr in all_exprs() for name in metric_names(expr) if name not in known}
    )
    assert not unknown, "metrics no exporter emits and no documented list names:\n" + "\n".join(unknown)
    used = {name for _, expr in all_exprs() for name in metric_names(expr)}
    assert used & ours, "dashboards use ray-vram's own metrics"
