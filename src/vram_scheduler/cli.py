"""The `ray-vram` command line: one entry point, one module per sub-command in `commands/`.

Exit codes shared by every command: 0 success, 1 runtime failure, 2 invalid input,
3 not everything fits (placement), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .config import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INVALID = 2
EXIT_UNPLACED = 3

#: Sub-command modules under vram_scheduler.commands, in --help order. Each has
#: `register(subparsers)` that adds its parser and sets `func(args) -> int`.
COMMANDS = ["plan", "schema", "demo_model", "node_start", "up", "serve", "monitor"]
COMMANDS += ["deploy", "status", "shutdown", "check", "chat", "measure"]


#: Optional dependencies: the extra that installs each module a command may need.
EXTRAS: dict[str, tuple[str, ...]] = {
    "gpu": ("pynvml", "prometheus_client"),
    "serve": ("ray", "orjson", "prometheus_client", "gunicorn", "openai"),
    "vllm-cpu": ("vllm", "torch", "ray"),
}
#: The extra a command is documented with, preferred when a module is in several.
COMMAND_EXTRA = {"monitor": "gpu", "node_start": "gpu", "up": "serve", "serve": "serve"}


def missing_dependency(error: ModuleNotFoundError, command: str | None) -> str | None:
    """One line naming the extra that installs a missing optional module; None for any other module."""
    module = (error.name or "").split(".")[0]
    extras = [extra for extra, modules in EXTRAS.items() if module in modules]
    if not extras:
        return None
    preferred = COMMAND_EXTRA.get(command or "")
    extra = preferred if preferred in extras else extras[0]
    what = f"ray-vram {command.replace('_', '-')}" if command else "ray-vram"
    return f"{what} needs the Python module {module!r}, which is not installed: pip install 'ray-vram[{extra}]'"


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
        return EXIT_INVALID
    try:
        return int(args.func(args) or 0)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as error:
        message = missing_dependency(error, args.command)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
