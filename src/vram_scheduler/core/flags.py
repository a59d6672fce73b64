"""The command-line flags that `ray-vram`'s commands and `python -m vram_scheduler.monitor` share:
`--output table|json` and `--ray-address`, with their old spellings, which keep working and say on
stderr what replaces them. Only argparse is imported here, so the monitor's entry point stays light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

OUTPUT_FORMATS = ("table", "json")
RAY_ADDRESS_ENV = "RAY_ADDRESS"
#: What replaces `--address` where it used to name a Ray cluster.
RAY_ADDRESS_INSTEAD = "--ray-address (--address names the serving controller)"


def warn_deprecated(old: str, new: str) -> None:
    """One wording for every old spelling, on stderr so that `--output json` stays parseable."""
    print(f"warning: {old} is deprecated; use {new}", file=sys.stderr)


class DeprecatedAlias(argparse.Action):
    """An old option string, hidden from --help: stores into the canonical flag's dest and warns."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, canonical: str, **kwargs: Any) -> None:
        kwargs["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kwargs)
        self.canonical = canonical

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        warn_deprecated(option_string or self.dest, self.canonical)
        setattr(namespace, self.dest, values)


def output_format(value: str) -> str:
    """argparse type of --output: `text`, the former name of the human format, becomes `table`."""
    if value == "text":
        warn_deprecated("--output text", "--output table")
        return "table"
    return value


def add_output_option(parser: argparse.ArgumentParser, *, what: str = "") -> None:
    """`--output table|json`, default table; `what` says what is printed when it is not the result."""
    suffix = f" of {what}" if what else ""
    parser.add_argument(
        "--output",
        type=output_format,
        choices=OUTPUT_FORMATS,
        default="table",
        help=f"format{suffix}: table (for people, the default) or json (for scripts)",
    )


def add_ray_address_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    *,
    help: str | None = None,
    deprecated: Sequence[str] = (),
) -> None:
    """`--ray-address`: a Ray cluster the command joins itself (resolve it with `ray_address`)."""
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="RAY",
        help=help
        or f"the Ray cluster to join: host:6379, ray://host:10001 or auto; default ${RAY_ADDRESS_ENV}, else auto",
    )
    for old in deprecated:
        parser.add_argument(
            old, dest="ray_address", metavar="RAY", action=DeprecatedAlias, canonical=RAY_ADDRESS_INSTEAD
        )
