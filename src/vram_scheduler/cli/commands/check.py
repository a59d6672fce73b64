"""`ray-vram check`: prove the cluster works end to end, one step at a time.

Cluster connectivity, an allocator round trip, a reservation that must be refused (and must
leave nothing behind), and one inference per deployed model. Non-zero exit on any failure.

`--stress` runs the burn-in instead (`vram_scheduler.tools.stress`): every GPU and every CPU node under
load, through Ray, each compared with the median of its own model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from pydantic import BaseModel
from rich.table import Table

from ...core.config import GIB, ConfigError, format_gib
from ...core.contract import DeploymentStatus
from ...core.exit_codes import ExitCode
from ...core.flags import RAY_ADDRESS_INSTEAD, add_output_option, add_ray_address_option, warn_deprecated
from ...sdk.client import PlacementError, SchedulerError, VRAMScheduler, model_spec
from ...sdk.display import wide_console
from ...sdk.inference import inference
from ...sdk.inference_errors import InferenceError
from .options import add_controller_address_option, is_http_url, ray_address

PROBE_MODEL_ID = "ray-vram-check-refused"


class CheckResult(BaseModel):
    name: str
    ok: bool
    detail: str
    seconds: float


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check",
        help="check the cluster end to end (connectivity, allocator, inference), or burn it in (--stress)",
        description="Run the cluster checks: controller reachable, allocator round trip, a reservation\n"
        "larger than any GPU must be refused and leave nothing behind, and one short inference per\n"
        "deployed model.\n\n"
        "--stress runs a burn-in instead, through Ray: on every GPU a Ray actor reserves F x its free\n"
        "memory from the allocator (a GPU without that room is skipped), holds it and runs bf16/fp16\n"
        "matrix products and a device-to-device copy; on every Ray node with CPUs a task runs a CPU\n"
        "matrix product. A GPU or node that fails, computes slower than --slow-ratio x the median of\n"
        "its own model, or whose memory NVML misreports fails the burn-in.\n\n"
        "exit codes: 0 every check passed, 1 a check failed, 2 invalid input\n\n"
        "examples:\n  ray-vram check\n  ray-vram check --output json\n"
        "  ray-vram check --stress --ray-address head:6379 --seconds 60\n"
        "  ray-vram check --stress --ray-address head:6379 --nodes gpu-3 --gpu-fraction 0.8 --output json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_output_option(parser)
    parser.add_argument("--endpoint", help="OpenAI base URL for the inference checks (default: discovered)")
    add_controller_address_option(parser)
    stress = parser.add_argument_group("burn-in (--stress: joins the Ray cluster itself, the controller is not used)")
    stress.add_argument("--stress", action="store_true", help="run the GPU and CPU burn-in instead of the checks")
    add_ray_address_option(stress)
    stress.add_argument("--seconds", type=float, default=60.0, help="load per GPU and per node (default 60)")
    stress.add_argument(
        "--gpu-fraction",
        type=float,
        default=0.5,
        help="share of each GPU's free memory to reserve and hold, capped by the ledger's room (default 0.5)",
    )
    stress.add_argument("--nodes", nargs="+", metavar="NODE", help="only these nodes (inventory or Ray node names)")
    stress.add_argument(
        "--slow-ratio",
        type=float,
        default=0.7,
        help="fail what runs slower than this x the median of its own GPU or CPU model; 0 turns it off (default 0.7)",
    )
    parser.set_defaults(func=run)


def _timed(name: str, step: Callable[[], str]) -> CheckResult:
    start = time.monotonic()
    try:
        detail, ok = step(), True
    except (SchedulerError, InferenceError, AssertionError) as error:
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
    text = inference("ping", status.model_id, base_url=endpoint or status.endpoint, max_tokens=1, timeout_s=120)
    return f"{len(ready)} ready replica(s); answered {len(text)} char(s)"


def stress_address(args: argparse.Namespace) -> str:
    """The Ray address the burn-in joins: --ray-address, else $RAY_ADDRESS, else `auto`. Before
    --address named the controller everywhere, `--stress --address host:6379` gave it: still accepted."""
    if args.ray_address is None and args.address:
        if not is_http_url(args.address):
            warn_deprecated("--address with --stress", RAY_ADDRESS_INSTEAD)
        return ray_address(args.address, "--address")
    return ray_address(args.ray_address)


def validate_stress(args: argparse.Namespace) -> None:
    problems = []
    if not args.seconds > 0:
        problems.append(f"--seconds must be > 0, got {args.seconds:g}")
    if not 0 < args.gpu_fraction <= 0.95:
        problems.append(f"--gpu-fraction must be in (0, 0.95], got {args.gpu_fraction:g}")
    if not 0 <= args.slow_ratio <= 1:
        problems.append(f"--slow-ratio must be in [0, 1], got {args.slow_ratio:g}")
    if problems:
        raise ConfigError("ray-vram check --stress", problems)


def run_stress(args: argparse.Namespace) -> int:
    import ray

    from ...core.loopback import prepare_ray_join
    from ...core.ray_names import NAMESPACE
    from ...tools.stress import report as stress_report
    from ...tools.stress.runner import run_stress as run_burn_in

    validate_stress(args)
    address = stress_address(args)
    if not ray.is_initialized():
        prepare_ray_join(address)
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise SchedulerError(f"cannot join the Ray cluster at {address}: {error}") from None
    result = run_burn_in(args.seconds, args.gpu_fraction, args.slow_ratio, args.nodes)
    if args.output == "json":
        print(result.model_dump_json(indent=2))
    else:
        title = (
            f"ray-vram check --stress ({args.seconds:g} s, GPU fraction {args.gpu_fraction:g}, "
            f"slow ratio {args.slow_ratio:g})"
        )
        table = Table(title=title, title_justify="left")
        for column in stress_report.COLUMNS:
            table.add_column(column)
        for row in stress_report.rows(result):
            style = {"ok": "green", "skipped": "yellow"}.get(row[-1], "bold red")
            table.add_row(*row[:-1], f"[{style}]{row[-1]}[/{style}]")
        console = wide_console()
        console.print(table)
        for line in stress_report.notes(result):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        verdict = "passed" if result.ok else "FAILED"
        print(f"burn-in {verdict}: {len(result.gpus)} GPU(s), {len(result.cpus)} node(s)")
    return ExitCode.OK if result.ok else ExitCode.FAILURE


def run(args: argparse.Namespace) -> int:
    if args.stress:
        try:
            return run_stress(args)
        except SchedulerError as error:
            print(f"error: {error}", file=sys.stderr)
            return ExitCode.FAILURE
    with VRAMScheduler(args.address, token=args.token) as scheduler:
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
    return ExitCode.OK if ok else ExitCode.FAILURE
