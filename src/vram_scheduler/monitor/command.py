"""`ray-vram monitor` and `python -m vram_scheduler.monitor`: the per-node VRAM monitor (the chart's
DaemonSet entrypoint), its flags and its run. Imports nothing of the CLI: the monitor image carries
the monitor alone."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ..core.config import GIB, gib_to_bytes
from ..core.exit_codes import ExitCode
from ..core.flags import RAY_ADDRESS_ENV, add_output_option, add_ray_address_option
from .readers import FileReader, HostMemoryReader, MonitorUnavailable, NVMLReader, Reader, default_node_name
from .watchdog import DEFAULT_WATCHDOG_MARGIN_GB

DESCRIPTION = (
    "Poll every GPU of this node, serve /metrics, /healthz and /inventory, publish the\n"
    "inventory to the allocator and flag replicas that stay over their VRAM budget.\n\n"
    "sources: NVML (default; exits 1 when no NVIDIA driver or GPU is visible), --inventory-file\n"
    "(a declared inventory, for CI and planning), --host-memory (local mode without a GPU)\n\n"
    "exit codes: 0 stopped by SIGTERM/SIGINT, 1 cannot read the GPUs or listen, 2 invalid input\n\n"
    "examples:\n"
    "  ray-vram monitor --ray-address ray://ray-head:10001\n"
    "  ray-vram monitor --inventory-file values/inventory-example.yaml --node gpu-1 --port 9400\n"
    "  ray-vram monitor --once --output json"
)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vram_scheduler.monitor`: the monitor alone, without the other commands' imports."""
    from ..core.config import ConfigError

    parser = argparse.ArgumentParser(
        prog="ray-vram monitor", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.INVALID
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except ModuleNotFoundError as error:
        from ..core.extras import missing_dependency

        message = missing_dependency(error, "monitor")
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return ExitCode.INVALID


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--inventory-file", help="serve a declared inventory (YAML/JSON) instead of reading NVML")
    source.add_argument(
        "--host-memory", action="store_true", help="no GPU: the host's RAM as one pseudo-GPU (local mode)"
    )
    parser.add_argument("--node", help="node name (default: $NODE_NAME, else the host name; or the file's only node)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between polls (default 0.5)")
    parser.add_argument("--host", default="0.0.0.0", help="listen address of the HTTP endpoints (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=9400, help="port of /metrics, /healthz, /inventory (default 9400)")
    add_ray_address_option(
        parser,
        help="the Ray cluster whose allocator gets this node's inventory: host:6379 or ray://host:10001 "
        f"(no default: without it nothing is published; ${RAY_ADDRESS_ENV} is not read)",
    )
    parser.add_argument(
        "--watchdog-margin-gb",
        type=float,
        default=DEFAULT_WATCHDOG_MARGIN_GB,
        help="GiB a replica may use above its reservation (budget + its overhead, as the allocator records it)"
        f" before it counts as over (default {DEFAULT_WATCHDOG_MARGIN_GB:g})",
    )
    parser.add_argument("--watchdog-polls", type=int, default=3, help="consecutive polls over to flag (default 3)")
    parser.add_argument(
        "--restart-over-budget",
        action="store_true",
        help="restart a flagged replica through Ray (kill its owner actor; Serve starts a new one)",
    )
    parser.add_argument("--once", action="store_true", help="read once, print the inventory and exit")
    add_output_option(parser, what="--once")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.set_defaults(func=run)


def open_reader(args: argparse.Namespace) -> Reader:
    """The source the flags ask for; raises MonitorUnavailable / ConfigError when it cannot be used."""
    if args.inventory_file:
        return FileReader(args.inventory_file, args.node)
    node = args.node or default_node_name()
    if args.host_memory:
        return HostMemoryReader(node)
    return NVMLReader(node)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `ray-vram --help` does not pay for prometheus_client and pydantic models.
    from ..core.config import ConfigError
    from .service import MonitorService, MonitorSettings

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for flag, value, ok in (
        ("--interval", args.interval, args.interval > 0),
        ("--watchdog-margin-gb", args.watchdog_margin_gb, args.watchdog_margin_gb >= 0),
        ("--watchdog-polls", args.watchdog_polls, args.watchdog_polls >= 1),
        ("--port", args.port, 0 <= args.port <= 65535),
    ):
        if not ok:
            raise ConfigError("ray-vram monitor", [f"{flag} = {value}: out of range"])
    try:
        reader = open_reader(args)
    except MonitorUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.FAILURE
    if args.once:
        try:
            return _print_once(reader, args.output)
        finally:
            reader.close()
    settings = MonitorSettings(
        node=reader.node,
        interval_s=args.interval,
        host=args.host,
        port=args.port,
        ray_address=args.ray_address,
        watchdog_margin_bytes=gib_to_bytes(args.watchdog_margin_gb),
        watchdog_polls=args.watchdog_polls,
        restart_over_budget=args.restart_over_budget,
    )
    service = MonitorService(reader, settings)
    try:
        port = service.start_http()
    except OSError as error:
        reader.close()
        print(f"error: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return ExitCode.FAILURE

    def stop(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info("%s received: stopping", signal.Signals(signum).name)
        service.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger(__name__).info(
        "monitoring node %s (%s) every %gs; http://%s:%d/metrics; allocator: %s",
        reader.node,
        reader.source,
        args.interval,
        args.host,
        port,
        args.ray_address or "not published (no --ray-address)",
    )
    service.run()
    logging.getLogger(__name__).info("stopped after %d poll(s)", service.polls)
    return ExitCode.OK


def _print_once(reader: Reader, output: str) -> int:
    reading = reader.read()
    inventory = reading.inventory
    if output == "json":
        print(json.dumps(inventory.model_dump(mode="json"), indent=2))
    else:
        print(f"node {inventory.node} ({inventory.source})")
        for gpu in inventory.gpus:
            state = "healthy" if gpu.healthy else "UNHEALTHY"
            print(
                f"  GPU {gpu.index} {gpu.name} {gpu.uuid}: {gpu.used_bytes / GIB:.2f} / {gpu.total_bytes / GIB:.2f} GiB"
                f" used, {len(gpu.processes)} process(es), {state}"
            )
    for error in reading.errors:
        print(f"warning: {error.message}", file=sys.stderr)
    return ExitCode.OK
