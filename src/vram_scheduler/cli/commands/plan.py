"""`ray-vram plan`: show where every replica would go on a described cluster, or why not."""

from __future__ import annotations

import argparse
import json

from ...core.capacity import Overhead
from ...core.config import load_config, with_source
from ...core.contract import Plan
from ...core.exit_codes import ExitCode
from ...core.flags import add_output_option
from ...core.inventory import load_inventory
from ...core.model_limits import resolve_overheads
from ...core.planner import plan
from ...sdk.display import render_plan, wide_console
from ...tools.demo.model import demo_sources
from .options import add_values_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="plan replica placement for a values file against a GPU inventory",
        description="Plan where each model replica goes, per GPU, without touching any cluster.\n\n"
        "A replica larger than every GPU of the inventory is listed as needing a bigger GPU (not a free one).\n"
        "Replicas of models that sleep beyond the room awake start stopped: their first request starts them.\n\n"
        "exit codes: 0 everything fits, 3 some replicas do not fit, 2 invalid input\n\n"
        "examples:\n"
        "  ray-vram plan --inventory values/inventory-example.yaml -f values/local.yaml\n"
        "  ray-vram plan --inventory inv.yaml --values my-values.yaml --output json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--inventory", required=True, help="GPU inventory file (YAML/JSON, see docs/configuration.md)")
    add_values_option(parser, required=True, help="values/config file with a `models` list")
    add_output_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    inventory = load_inventory(args.inventory)
    # Models named in serving.model_sources (the demo models already generated here among them) are
    # planned from their directory, as the controller serves them: their weights size their overhead.
    config = demo_sources(load_config(args.values), generate=False)
    models = [with_source(spec, config.serving) for spec in config.models]
    overheads = resolve_overheads(models, config.placement)
    result = plan(
        inventory,
        models,
        settings=config.placement,
        overheads={k: o.bytes for k, o in overheads.items()},
        weights_bytes={k: o.weights_bytes for k, o in overheads.items() if o.weights_bytes},
    )
    if args.output == "json":
        print(json.dumps(plan_as_json(result, overheads), indent=2))
    else:
        wide_console().print(render_plan(result, overheads))
    return ExitCode.OK if result.complete else ExitCode.UNPLACED


def plan_as_json(result: Plan, overheads: dict[str, Overhead] | None = None) -> dict:
    by_gpu = {g.uuid: [] for g in result.gpus}
    for reservation in result.reservations:
        by_gpu[reservation.gpu_uuid].append(reservation.model_dump())
    return {
        "complete": result.complete,
        "gpus": [gpu.model_dump() | {"assignments": by_gpu[gpu.uuid]} for gpu in result.gpus],
        "unplaced": [u.model_dump() for u in result.unplaced],
        "release": [r.model_dump() for r in result.release],
        "overheads": {
            model_id: found.model_dump() | {"from": found.describe()} for model_id, found in (overheads or {}).items()
        },
    }
