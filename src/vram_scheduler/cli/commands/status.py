"""`ray-vram status`: the VRAM table per node and GPU, and every model's replicas."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator

from rich.live import Live

from ...core.exit_codes import ExitCode
from ...core.flags import add_output_option
from ...sdk.client import SchedulerError, VRAMScheduler, as_json, exit_code_for
from ...sdk.display import render_vram, wide_console
from .options import add_controller_address_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show VRAM per node and GPU (total, used, reserved, free, replicas) and the models",
        description="Show the allocator's VRAM ledger per node and GPU and the state of every model's replicas.\n"
        "Red marks a replica over its budget or a GPU over its total.\n\n"
        "examples:\n"
        "  ray-vram status\n"
        "  ray-vram status --watch 2\n"
        "  ray-vram status --output json | jq '.vram.gpus[].free_bytes'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=float,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    add_output_option(parser)
    add_controller_address_option(parser)
    parser.set_defaults(func=run)


def snapshot(scheduler: VRAMScheduler) -> dict:
    return {"vram": as_json(scheduler.get_vram_state()), "deployments": as_json(scheduler.deployments())}


def run(args: argparse.Namespace) -> int:
    with VRAMScheduler(args.address, token=args.token) as scheduler:
        try:
            if args.output == "json":
                return _json(scheduler, args.watch)
            if args.watch:
                return _watch(scheduler, args.watch)
            scheduler.display_vram_state(wide_console())
        except SchedulerError as error:
            print(f"error: {error}", file=sys.stderr)
            return exit_code_for(error)
    return ExitCode.OK


def _ticks(interval: float) -> Iterator[None]:
    """Yield every `interval` seconds until Ctrl-C. SIGINT only sets a flag: a KeyboardInterrupt
    raised inside rich's live display (its lock, its refresh thread) could leave it hanging."""
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
        while not interrupted.wait(interval):
            yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _json(scheduler: VRAMScheduler, watch: float | None) -> int:
    print(json.dumps(snapshot(scheduler), indent=None if watch else 2), flush=True)
    if not watch:
        return ExitCode.OK
    for _ in _ticks(watch):
        print(json.dumps(snapshot(scheduler)), flush=True)
    return ExitCode.INTERRUPTED


def _watch(scheduler: VRAMScheduler, interval: float) -> int:
    console = wide_console()

    def view():
        return render_vram(scheduler.get_vram_state(), scheduler.deployments())

    with Live(view(), console=console, refresh_per_second=4, screen=False) as live:
        for _ in _ticks(interval):
            live.update(view())
    return ExitCode.INTERRUPTED
