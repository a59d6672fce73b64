"""`ray-vram shutdown`: stop one model (or all) and free its VRAM reservations."""

from __future__ import annotations

import argparse
import json
import sys

from ...core.exit_codes import ExitCode
from ...core.flags import add_output_option
from ...sdk.client import SchedulerError, VRAMScheduler, exit_code_for
from .options import add_controller_address_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shutdown",
        help="shut down a model (or every model) and free its reservations",
        description="Shut down MODEL_ID, or every model when none is given, and free their VRAM reservations.\n"
        "Idempotent: shutting down what is not running succeeds and says so.\n\n"
        "examples:\n  ray-vram shutdown qwen\n  ray-vram shutdown            # every model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_id", nargs="?", help="model to shut down (default: all)")
    add_output_option(parser)
    add_controller_address_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with VRAMScheduler(args.address, token=args.token) as scheduler:
        try:
            removed = scheduler.shutdown(args.model_id)
        except SchedulerError as error:
            print(f"error: {error}", file=sys.stderr)
            return exit_code_for(error)
    if args.output == "json":
        print(json.dumps({"removed": removed}))
    elif removed:
        print(f"shut down: {', '.join(removed)}")
    else:
        print(f"nothing to shut down ({args.model_id or 'no models'} not running)")
    return ExitCode.OK
