"""The flags every `ray-vram` command shares, defined once so that one spelling means one thing.

`-f/--values` is the values/config file, `--output table|json` the output format, `--address` the
serving controller and `--ray-address` a Ray cluster the command joins itself. Old spellings
(`--file`, `--config`, `--output text`, `--address` for a Ray cluster) keep working and say on
stderr what replaces them. Only argparse and the configuration error are imported here, so the
monitor's entry point stays light.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ...core.config import ConfigError

OUTPUT_FORMATS = ("table", "json")
RAY_ADDRESS_ENV = "RAY_ADDRESS"
VALUES_FLAGS = "-f/--values"
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


def add_values_option(
    parser: argparse.ArgumentParser, *, help: str, required: bool = False, deprecated: Sequence[str] = ()
) -> None:
    """`-f/--values FILE`; `deprecated` are the command's former spellings. With aliases, a mutually
    exclusive group lets any of them satisfy `required` while only the canonical flag shows in --help."""
    if not deprecated:
        parser.add_argument("-f", "--values", metavar="FILE", required=required, help=help)
        return
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("-f", "--values", metavar="FILE", help=help)
    for old in deprecated:
        group.add_argument(old, dest="values", metavar="FILE", action=DeprecatedAlias, canonical=VALUES_FLAGS)


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


def add_controller_address_option(parser: argparse.ArgumentParser) -> None:
    """`--address` and `--token`: the serving controller this command talks to, and its token."""
    from ...sdk.controller_http import CONTROLLER_ENV, DEFAULT_CONTROLLER

    parser.add_argument(
        "--address",
        default=None,
        metavar="CONTROLLER",
        help=f"the serving controller: its URL (http://host:8080), or a Ray address (host:6379, "
        f"ray://host:10001, auto) to reach it through Ray from this process; default ${CONTROLLER_ENV}, "
        f"else {DEFAULT_CONTROLLER} (what `ray-vram up` starts)",
    )
    parser.add_argument(
        "--token",
        default=None,
        metavar="TOKEN",
        help="the controller token; default $RAY_VRAM_CONTROLLER_TOKEN, else the file `ray-vram up` keeps in "
        "~/.config/ray-vram/controller-token (a Helm release: its Secret <release>-ray-vram-auth)",
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


def is_http_url(address: str) -> bool:
    """A controller (or dashboard) URL, as opposed to a Ray address."""
    return address.startswith(("http://", "https://"))


def ray_address(value: str | None, flag: str = "--ray-address") -> str:
    """The Ray address to join: the flag, else $RAY_ADDRESS, else `auto`. A controller URL is refused
    here, where the mix-up is made, rather than as an obscure failure inside ray.init."""
    address = value or os.environ.get(RAY_ADDRESS_ENV) or "auto"
    if is_http_url(address):
        source = flag if value else f"${RAY_ADDRESS_ENV}"
        raise ConfigError(
            source,
            [
                f"{address} is an HTTP URL, not a Ray address; this command joins the Ray cluster itself: "
                f"give the Ray address (host:6379) as --ray-address or ${RAY_ADDRESS_ENV}"
            ],
        )
    return address
