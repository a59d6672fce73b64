"""The flags every `ray-vram` command shares, defined once so that one spelling means one thing.

`-f/--values` is the values/config file, `--output table|json` the output format, `--address` the
serving controller and `--ray-address` a Ray cluster the command joins itself. Old spellings
(`--file`, `--config`, `--output text`, `--address` for a Ray cluster) keep working and say on
stderr what replaces them. `--output` and `--ray-address` are `core.flags`'s, shared with
`python -m vram_scheduler.monitor`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ...core.config import ConfigError
from ...core.flags import RAY_ADDRESS_ENV, DeprecatedAlias

VALUES_FLAGS = "-f/--values"


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
