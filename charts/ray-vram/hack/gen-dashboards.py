"""Writes the chart's Grafana dashboards (charts/ray-vram/dashboards/*.json) from the panel lists below.

The JSON files are committed (Grafana and the chart read them as they are); this script is their
source, and tests/chart/test_dashboards.py fails when a committed file differs from what it writes.
Usage: python charts/ray-vram/hack/gen-dashboards.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "dashboards"
RATE = "$__rate_interval"

Panel = dict[str, Any]


def panel(
    title: str, exprs: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries", **extra: Any
) -> Panel:
    """One panel; `exprs` is a list of (PromQL, legend) pairs."""
    return {
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend} for i, (expr, legend) in enumerate(exprs)
        ],
        **extra,
    }


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": f"var-{name}"},
        "definition": query,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "refresh": 2,
    }


def dashboard(uid: str, title: str, description: str, variables: list[dict[str, Any]], panels: list[Panel]) -> dict:
    laid_out = []
    for i, item in enumerate(panels):
        width = 12
        laid_out.append({"id": i + 1, "gridPos": {"h": 8, "w": width, "x": (i % 2) * width, "y": (i // 2) * 8}, **item})
    datasource = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["ray-vram"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [datasource, *variables]},
        "annotations": {"list": []},
        "panels": laid_out,
    }


GPU = 'node=~"$node"'
MODEL = 'model_id=~"$model"'
VLLM_MODEL = 'model_name=~"$model"'


def router_quantile(q: float, histogram: str) -> tuple[str, str]:
    """The q-quantile per model of one of the routers' latency histograms (all routers together)."""
    expr = f"histogram_quantile({q}, sum by (le, model_id) (rate({histogram}_bucket{{{MODEL}}}[{RATE}])))"
    return expr, f"{{{{model_id}}}} p{round(q * 100)}"


DASHBOARDS = {
    "ray-vram-cluster-vram.json": dashboard(
        "ray-vram-cluster-vram",
        "ray-vram / Cluster VRAM",
        "Per GPU: used, reserved by ray-vram replicas, free and used by processes ray-vram does not manage.",
        [variable("node", "Node", "label_values(ray_vram_gpu_total_bytes, node)")],
        [
            panel(
                "VRAM used of total (cluster)",
                [(f"sum(ray_vram_gpu_used_bytes{{{GPU}}}) / sum(ray_vram_gpu_total_bytes{{{GPU}}})", "used")],
                "percentunit",
                "stat",
            ),
            panel(
                "VRAM reserved of total (cluster)",
                [(f"sum(ray_vram_gpu_reserved_bytes{{{GPU}}}) / sum(ray_vram_gpu_total_bytes{{{GPU}}})", "reserved")],
                "percentunit",
                "stat",
            ),
            panel("Used per GPU", [(f"ray_vram_gpu_used_bytes{{{GPU}}}", "{{node}} GPU {{gpu}}")], "bytes"),
            panel("Reserved per GPU", [(f"ray_vram_gpu_reserved_bytes{{{GPU}}}", "{{node}} GPU {{gpu}}")], "bytes"),
            panel("Free per GPU", [(f"ray_vram_gpu_free_bytes{{{GPU}}}", "{{node}} GPU {{gpu}}")], "bytes"),
            panel(
                "Used by unmanaged processes per GPU",
                [(f"ray_vram_gpu_unmanaged_bytes{{{GPU}}}", "{{node}} GPU {{gpu}}")],
                "bytes",
            ),
            panel(
                "Reserved share per GPU",
                [
                    (
                        f"ray_vram_gpu_reserved_bytes{{{GPU}}} / ray_vram_gpu_total_bytes{{{GPU}}}",
                        "{{node}} GPU {{gpu}} ({{gpu_name}})",
                    )
                ],
                "percentunit",
                "bargauge",
            ),
            panel(
                "GPU memory as Ray sees it (per node)",
                [("sum by (instance) (ray_node_gram_used) * 1024 * 1024", "{{instance}}")],
                "bytes",
            ),
        ],
    ),
    "ray-vram-models.json": dashboard(
        "ray-vram-models",
        "ray-vram / Models",
        "Per model: replicas (and those pending: not placed), VRAM budget against actual use, requests and latency at the routers, and vLLM "
        "latency, throughput and queue.",
        [variable("model", "Model", "label_values(ray_vram_model_replicas, model_id)")],
        [
            panel(
                "Replicas by state",
                [(f"sum by (model_id, state) (ray_vram_model_replicas{{{MODEL}}})", "{{model_id}} {{state}}")],
            ),
            panel(
                "Pending models (replicas not placed: see `ray-vram status` for why)",
                [
                    (
                        f'sum by (model_id) (ray_vram_model_replicas{{state="pending", {MODEL}}})',
                        "{{model_id}}",
                    )
                ],
                "short",
                "bargauge",
            ),
            panel(
                "Budget, reservation and used per replica",
                [
                    (f"ray_vram_replica_budget_bytes{{{MODEL}}}", "{{replica}} budget"),
                    (f"ray_vram_replica_reservation_bytes{{{MODEL}}}", "{{replica}} reservation"),
                    (f"ray_vram_replica_used_bytes{{{MODEL}}}", "{{replica}} used"),
                ],
                "bytes",
            ),
            panel(
                "Used of reservation per replica",
                [
                    (
                        f"ray_vram_replica_used_bytes{{{MODEL}}} / ray_vram_replica_reservation_bytes{{{MODEL}}}",
                        "{{model_id}} {{replica}}",
                    )
                ],
                "percentunit",
            ),
            panel(
                "Watchdog violations",
                [
                    (
                        f"sum by (model_id) (increase(ray_vram_watchdog_violations_total{{{MODEL}}}[{RATE}]))",
                        "{{model_id}}",
                    )
                ],
            ),
            panel(
                "Time to first token (p50, p95)",
                [
                    (
                        "histogram_quantile(0.5, sum by (le, model_name) "
                        f"(rate(ray_vllm_time_to_first_token_seconds_bucket{{{VLLM_MODEL}}}[{RATE}])))",
                        "{{model_name}} p50",
                    ),
                    (
                        "histogram_quantile(0.95, sum by (le, model_name) "
                        f"(rate(ray_vllm_time_to_first_token_seconds_bucket{{{VLLM_MODEL}}}[{RATE}])))",
                        "{{model_name}} p95",
                    ),
                ],
                "s",
            ),
            panel(
                "Generated tokens per second",
                [
                    (
                        f"sum by (model_name) (rate(ray_vllm_generation_tokens_total{{{VLLM_MODEL}}}[{RATE}]))",
                        "{{model_name}}",
                    )
                ],
                "short",
            ),
            panel(
                "Queue: waiting and running requests",
                [
                    (f"sum by (model_name) (ray_vllm_num_requests_waiting{{{VLLM_MODEL}}})", "{{model_name}} waiting"),
                    (f"sum by (model_name) (ray_vllm_num_requests_running{{{VLLM_MODEL}}})", "{{model_name}} running"),
                ],
            ),
            panel(
                "KV cache usage",
                [(f"max by (model_name) (ray_vllm_kv_cache_usage_perc{{{VLLM_MODEL}}})", "{{model_name}}")],
                "percentunit",
            ),
            panel(
                "Requests per second by model and status",
                [
                    (
                        f"sum by (model_id, code) (rate(ray_vram_router_requests_total{{{MODEL}}}[{RATE}]))",
                        "{{model_id}} {{code}}",
                    )
                ],
                "reqps",
                description="Every request the routers answered (health checks aside), by HTTP status code, their "
                "own refusals included. Model (unknown): names no model is served by; (none): requests "
                "naming no model.",
            ),
            panel(
                "Request latency (p50, p95)",
                [router_quantile(q, "ray_vram_router_request_duration_seconds") for q in (0.5, 0.95)],
                "s",
                description="From a request's arrival at a router to the end of its response, for requests sent "
                "on to a replica (the routers' immediate refusals are not timed).",
            ),
            panel(
                "Streamed responses: time to first byte (p50, p95)",
                [router_quantile(q, "ray_vram_router_time_to_first_byte_seconds") for q in (0.5, 0.95)],
                "s",
                description="From a request's arrival at a router to the first byte of its streamed body: the "
                "client's time to first token, the router's hop included.",
            ),
            # Sleep and wake (docs/operations.md "More models than VRAM").
            panel(
                "Held per replica: reservation awake, sleeping footprint asleep, 0 stopped",
                [
                    (f"ray_vram_replica_held_bytes{{{MODEL}}}", "{{replica}} held"),
                    (f"ray_vram_replica_reservation_bytes{{{MODEL}}}", "{{replica}} reservation"),
                    (f"ray_vram_replica_budget_bytes{{{MODEL}}}", "{{replica}} budget"),
                ],
                "bytes",
            ),
            panel(
                "Replicas asleep or stopped",
                [(f"sum by (model_id) (ray_vram_replica_asleep{{{MODEL}}})", "{{model_id}}")],
            ),
            panel(
                "Wakes, sleeps and evictions per minute",
                [
                    (
                        f"sum by (model_id, how) (increase(ray_vram_replica_wakes_total{{{MODEL}}}[1m]))",
                        "{{model_id}} wake {{how}}",
                    ),
                    (
                        f"sum by (model_id, why) (increase(ray_vram_replica_sleeps_total{{{MODEL}}}[1m]))",
                        "{{model_id}} sleep {{why}}",
                    ),
                    (
                        f"sum by (model_id) (increase(ray_vram_replica_evictions_total{{{MODEL}}}[1m]))",
                        "{{model_id}} evicted others",
                    ),
                ],
            ),
            panel(
                "Wake latency (p50, p99): from the wake's call to the engine answering",
                [
                    (
                        f"histogram_quantile({q}, sum by (le, model_id) "
                        f"(rate(ray_vram_replica_wake_seconds_bucket{{{MODEL}}}[{RATE}])))",
                        "{{model_id}} p" + str(round(q * 100)),
                    )
                    for q in (0.5, 0.99)
                ],
                "s",
            ),
        ],
    ),
    "ray-vram-health.json": dashboard(
        "ray-vram-health",
        "ray-vram / Allocator and monitor health",
        "The allocator's ledger, the serving controller's reconciles and the VRAM monitors' polling.",
        [variable("node", "Node", "label_values(ray_vram_monitor_last_poll_timestamp_seconds, node)")],
        [
            panel("Reservations per node", [(f"ray_vram_allocator_reservations{{{GPU}}}", "{{node}}")]),
            panel("Nodes with a stale inventory", [("ray_vram_allocator_stale_nodes", "stale nodes")], kind="stat"),
            panel(
                "Controller reconciles",
                [("sum by (result) (rate(ray_vram_controller_reconciles_total[" + RATE + "]))", "{{result}}")],
                "ops",
            ),
            panel(
                "Seconds since the last monitor poll",
                [(f"time() - ray_vram_monitor_last_poll_timestamp_seconds{{{GPU}}}", "{{node}}")],
                "s",
            ),
            panel(
                "Monitor poll duration (p99)",
                [
                    (
                        "histogram_quantile(0.99, sum by (le, node) "
                        f"(rate(ray_vram_monitor_poll_duration_seconds_bucket{{{GPU}}}[{RATE}])))",
                        "{{node}}",
                    )
                ],
                "s",
            ),
            panel(
                "Monitor errors",
                [(f"sum by (node, kind) (rate(ray_vram_monitor_errors_total{{{GPU}}}[{RATE}]))", "{{node}} {{kind}}")],
                "ops",
            ),
            panel("GPU health", [(f"ray_vram_gpu_healthy{{{GPU}}}", "{{node}} GPU {{gpu}}")], kind="stat"),
            panel(
                "Healthy Serve replicas",
                [("sum by (deployment) (ray_serve_deployment_replica_healthy)", "{{deployment}}")],
            ),
        ],
    ),
}


def render(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a committed file differs")
    args = parser.parse_args()
    stale = []
    for name, doc in DASHBOARDS.items():
        path = OUT / name
        text = render(doc)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            OUT.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run python charts/ray-vram/hack/gen-dashboards.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
