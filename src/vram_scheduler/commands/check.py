"""`ray-vram check`: prove the cluster works end to end, one step at a time.

Cluster connectivity, an allocator round trip, a reservation that must be refused (and must
leave nothing behind), and one inference per deployed model. Non-zero exit on any failure.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from pydantic import BaseModel
from rich.table import Table

from .. import inference as inf
from ..client import (
    DeploymentStatus,
    PlacementError,
    SchedulerError,
    VRAMScheduler,
    add_address_option,
    model_spec,
    wide_console,
)
from ..config import GIB, format_gib

PROBE_MODEL_ID = "ray-vram-check-refused"


class CheckResult(BaseModel):
    name: str
    ok: bool
    detail: str
    seconds: float


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="check the cluster end to end: connectivity, allocator, a refused reservation, inference",
        description="Run the cluster checks: controller reachable, allocator round trip, a reservation\n"
        "larger than any GPU must be refused and leave nothing behind, and one short inference per\n"
        "deployed model.\n\n"
        "exit codes: 0 every check passed, 1 a check failed\n\n"
        "examples:\n  ray-vram check\n  ray-vram check --output json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", choices=["table", "json"], default="table")
    parser.add_argument("--endpoint", help="OpenAI base URL for the inference checks (default: discovered)")
    add_address_option(parser)
    parser.set_defaults(func=run)


def _timed(name: str, step: Callable[[], str]) -> CheckResult:
    start = time.monotonic()
    try:
        detail, ok = step(), True
    except (SchedulerError, inf.InferenceError, AssertionError) as error:
        detail, ok = f"{type(error).__name__}: {error}", False
    return CheckResult(name=name, ok=ok, detail=detail, seconds=round(time.monotonic() - start, 3))


def run_checks(scheduler: VRAMScheduler, endpoint: str | None = None) -> list[CheckResult]:
    results = [_timed("controller reachable", lambda: _connectivity(scheduler))]
    if not results[0].ok:
        return results
    results.append(_timed("allocator round trip", lambda: _allocator(scheduler)))
    if results[-1].ok:
        results.append(_timed("oversized reservation refused", lambda: _refusal(scheduler)))
    for status in scheduler.deployments():
        name = f"inference {status.model_id}"
        results.append(_timed(name, lambda s=status: _inference(s, endpoint)))
    return results


def _connectivity(scheduler: VRAMScheduler) -> str:
    assert scheduler.api.healthz(), f"{scheduler.address}/healthz did not answer 200"
    return f"{scheduler.address} healthy"


def _allocator(scheduler: VRAMScheduler) -> str:
    state = scheduler.get_vram_state()
    assert state.gpus, "the allocator knows no GPU: no node inventory has arrived (is a monitor running?)"
    reserved = sum(len(g.replicas) for g in state.gpus)
    stale = f", stale nodes: {', '.join(state.stale_nodes)}" if state.stale_nodes else ""
    return f"{len(state.nodes)} node(s), {len(state.gpus)} GPU(s), {reserved} reservation(s){stale}"


def _refusal(scheduler: VRAMScheduler) -> str:
    state = scheduler.get_vram_state()
    largest = max(state.gpus, key=lambda g: g.total_bytes)
    vram_gb = round(largest.total_bytes * 2 / GIB, 2)
    spec = model_spec(PROBE_MODEL_ID, "demo", vram_gb, 1)
    before = sorted(r.replica_id for g in state.gpus for r in g.replicas)
    try:
        scheduler.api.deploy(spec)
    except PlacementError as refusal:
        after_state = scheduler.get_vram_state()
        after = sorted(r.replica_id for g in after_state.gpus for r in g.replicas)
        listed = [s.model_id for s in scheduler.deployments() if s.model_id == PROBE_MODEL_ID]
        assert after == before, f"the refused request changed the ledger: {before} → {after}"
        assert not listed, f"the refused model {PROBE_MODEL_ID} is still listed by the controller"
        return f"{format_gib(spec.vram_bytes)} refused: {'; '.join(refusal.reasons)}"
    scheduler.shutdown(PROBE_MODEL_ID)
    raise AssertionError(
        f"a {format_gib(spec.vram_bytes)} replica was accepted although the largest GPU "
        f"({largest.node}, GPU {largest.index}) has {format_gib(largest.total_bytes)}"
    )


def _inference(status: DeploymentStatus, endpoint: str | None) -> str:
    ready = [r for r in status.replicas if r.state == "ready"]
    assert ready, f"no ready replica ({', '.join(f'{r.replica_id}:{r.state}' for r in status.replicas) or 'none'})"
    text = inf.inference("ping", status.model_id, base_url=endpoint or status.endpoint, max_tokens=1, timeout_s=120)
    return f"{len(ready)} ready replica(s); answered {len(text)} char(s)"


def run(args: argparse.Namespace) -> int:
    with VRAMScheduler(args.address) as scheduler:
        results = run_checks(scheduler, args.endpoint)
    ok = all(r.ok for r in results)
    if args.output == "json":
        print(json.dumps({"ok": ok, "checks": [r.model_dump() for r in results]}, indent=2))
    else:
        table = Table(title="ray-vram check", title_justify="left")
        for column in ("check", "result", "seconds", "detail"):
            table.add_column(column)
        for r in results:
            mark = "[green]ok[/green]" if r.ok else "[bold red]FAILED[/bold red]"
            table.add_row(r.name, mark, f"{r.seconds:.2f}", r.detail)
        wide_console().print(table)
    return 0 if ok else 1
