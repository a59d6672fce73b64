"""The soak's numbers from its records: requests per model, failures by kind, latency, memory."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from bench.serving.load import percentile


def read_records(paths: list[Path]) -> list[dict[str, Any]]:
    """Every request record the clients wrote (a line cut by a killed client is skipped)."""
    records = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def per_model(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """ok/failed, failures by kind (with one example each), p50/p99 latency and TTFT, and req/s
    over the span of the model's own requests."""
    out: dict[str, dict[str, Any]] = {}
    for model in sorted({r["model"] for r in records}):
        mine = [r for r in records if r["model"] == model]
        ok = [r for r in mine if r["kind"] == "ok"]
        failures = Counter(r["kind"] for r in mine if r["kind"] != "ok")
        examples = {}
        for r in mine:
            if r["kind"] != "ok":
                examples.setdefault(r["kind"], r.get("detail", ""))
        latencies = [r["latency_ms"] for r in ok]
        ttfts = [r["ttft_ms"] for r in ok if "ttft_ms" in r]
        span_s = max(r["end"] for r in mine) - min(r["start"] for r in mine)
        out[model] = {
            "requests": len(mine),
            "ok": len(ok),
            "failed": sum(failures.values()),
            "failures": dict(failures),
            "failure_examples": examples,
            "by_shape": dict(Counter(f"{r['api']}{' stream' if r['stream'] else ''}" for r in ok)),
            "p50_ms": _round(percentile(latencies, 50)),
            "p99_ms": _round(percentile(latencies, 99)),
            "ttft_p50_ms": _round(percentile(ttfts, 50)),
            "ttft_p99_ms": _round(percentile(ttfts, 99)),
            "span_s": round(span_s, 1),
            "req_per_s": round(len(ok) / span_s, 2) if span_s > 0 else None,
        }
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value)


def table(result: dict[str, Any]) -> str:
    """The printed report (also stored in the results file)."""
    lines = [
        f"soak: {result['duration_s']:.0f} s of load at concurrency {result['settings']['concurrency']} "
        f"({result['settings']['client_processes']} client processes), stack ready in {result['stack_ready_s']:.0f} s",
        "",
        "| model | requests | ok | failed | failures by kind | p50 ms | p99 ms | TTFT p50 ms | req/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, row in result["models"].items():
        kinds = ", ".join(f"{n} {kind}" for kind, n in row["failures"].items()) or "none"
        changed = " (added, removed)" if model == result["extra_model"] else ""
        lines.append(
            f"| {model}{changed} | {row['requests']} | {row['ok']} | {row['failed']} | {kinds} | "
            f"{row['p50_ms']} | {row['p99_ms']} | {row['ttft_p50_ms']} | {row['req_per_s']} |"
        )
    lines += [
        "",
        "| process (MiB) | pids | samples | RSS start | RSS end | RSS max | USS start → end | RSS trend /min |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|")
    for role, row in result["memory"].items():
        if not row["samples"]:
            lines.append(f"| {role} | not found | 0 | | | | | |")
            continue
        lines.append(
            f"| {role} | {','.join(map(str, row['pids']))} | {row['samples']} | {row['rss_start_mib']} | "
            f"{row['rss_end_mib']} | {row['rss_max_mib']} | {row['uss_start_mib']} → {row['uss_end_mib']} | "
            f"{row.get('rss_trend_mib_per_min', '-')} |"
        )
    lines += [
        "",
        "| event | at s | took s | driver join s | apply s | ready s | result | listed after | reserved after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for event in result["events"]:
        changes = {k: v for k, v in event.get("result", {}).items() if v and k != "kept"}
        lines.append(
            f"| {event['event']} | {event['at_s']} | {event['took_s']} | {event['join_s']} | {event['apply_s']} | "
            f"{event.get('ready_s', '-')} | "
            f"{json.dumps(changes)} | {','.join(event.get('listed', []))} | {','.join(event.get('reserved', []))} |"
        )
    status = result.get("extra_status_after_removal")
    lines.append(f"\nafter the removal, a request for {result['extra_model']} is answered HTTP {status}")
    return "\n".join(lines)
