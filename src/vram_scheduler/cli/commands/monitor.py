"""`ray-vram monitor`: the per-node VRAM monitor; its flags and run are `monitor.command`'s."""

from __future__ import annotations

import argparse

from ...monitor.command import DESCRIPTION, add_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "monitor",
        help="read this node's GPUs (NVML), export Prometheus metrics, publish to the allocator",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
