"""`ray-vram schema`: print the JSON schema generated from the configuration models."""

from __future__ import annotations

import argparse
import json

from ...core.config import config_json_schema
from ...core.exit_codes import ExitCode


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "schema",
        help="print the JSON schema of the configuration (or of the chart's `models` list)",
        description="Print the JSON schema generated from ray-vram's pydantic configuration models.\n\n"
        "examples:\n  ray-vram schema\n  ray-vram schema --part models > models.schema.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--part", choices=["config", "models"], default="config")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(json.dumps(config_json_schema(args.part), indent=2, sort_keys=True))
    return ExitCode.OK
