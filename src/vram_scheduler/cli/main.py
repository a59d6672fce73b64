"""The `ray-vram` command line: one entry point, one module per sub-command in `commands/`.

Exit codes shared by every command are `exit_codes.ExitCode`: 0 success, 1 runtime failure,
2 invalid input, 3 not everything fits (placement), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .. import __version__
from ..core.config import ConfigError
from ..core.exit_codes import ExitCode
from ..core.extras import missing_dependency

#: Sub-command modules under vram_scheduler.cli.commands, in --help order. Each has
#: `register(subparsers)` that adds its parser and sets `func(args) -> int`.
COMMANDS = ["plan", "schema", "demo_model", "node_start", "up", "serve", "monitor"]
COMMANDS += ["deploy", "status", "shutdown", "sleep", "check", "chat", "measure", "ensure_secret"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-vram",
        description="VRAM-aware LLM serving on Ray: plan, serve, monitor and drive models packed onto GPUs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ray-vram {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return ExitCode.INVALID
    try:
        return int(args.func(args) or ExitCode.OK)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return ExitCode.INVALID
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except ModuleNotFoundError as error:
        message = missing_dependency(error, args.command)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return ExitCode.INVALID
