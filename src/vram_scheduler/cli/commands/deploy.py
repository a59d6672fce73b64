"""`ray-vram deploy`: deploy models from a values file or from flags, wait until they are ready."""

from __future__ import annotations

import argparse
import json
import sys

import yaml
from rich.console import Console
from rich.table import Table

from ...core.config import ConfigError, ModelSpec, load_config
from ...core.exit_codes import ExitCode
from ...core.flags import add_output_option
from ...sdk.client import DeployResult, SchedulerError, VRAMScheduler, as_json, exit_code_for, model_spec
from ...sdk.display import wide_console
from .options import add_controller_address_option, add_values_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help="deploy models (from a values file or flags) and wait until every replica is ready",
        description="Plan, deploy and wait: each replica is shown going reserved → loading → ready.\n"
        "Nothing is deployed when not every replica fits (unless --max-replicas).\n\n"
        "exit codes: 0 ready, 1 a replica failed or timed out, 2 invalid input, 3 not everything fits\n\n"
        "examples:\n"
        "  ray-vram deploy -f values/local.yaml\n"
        "  ray-vram deploy qwen --model Qwen/Qwen2-0.5B-Instruct --vram-gb 4 --replicas 2\n"
        "  ray-vram deploy demo --model demo --vram-gb 1 --max-replicas --engine-arg enforce_eager=true",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model_id", nargs="?", help="model id clients will use (omit with -f)")
    add_values_option(parser, help="values/config file: deploy every model in its `models` list", deprecated=["--file"])
    parser.add_argument("--model", help="model source: Hugging Face name, local directory, or `demo`")
    parser.add_argument("--vram-gb", type=float, help="VRAM budget per replica in GiB")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--replicas", type=int, help="number of replicas (default 1)")
    count.add_argument("--max-replicas", action="store_true", help="as many replicas as fit")
    parser.add_argument("--router-name", help="extra name the model answers to")
    parser.add_argument(
        "--max-model-len",
        type=int,
        help="longest prompt + completion in tokens (default: 8192 or the model's maximum, whichever is smaller)",
    )
    parser.add_argument("--max-tokens", type=int, default=256, help="default completion length")
    parser.add_argument("--gpu-type", help="only GPUs whose name contains this text, e.g. H100")
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra vLLM engine argument (VALUE parsed as YAML: numbers, true/false); repeatable",
    )
    parser.add_argument("--no-wait", action="store_true", help="return once the controller accepted the models")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for readiness (default 900)")
    add_output_option(parser)
    add_controller_address_option(parser)
    parser.set_defaults(func=run)


def engine_kwargs(pairs: list[str]) -> dict[str, object]:
    kwargs: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError("--engine-arg", [f"{pair!r}: expected KEY=VALUE"])
        kwargs[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return kwargs


def specs_from_args(args: argparse.Namespace) -> list[ModelSpec]:
    if args.values:
        if args.model_id or args.model or args.vram_gb is not None:
            raise ConfigError("deploy", ["give either -f FILE or MODEL_ID --model --vram-gb, not both"])
        config = load_config(args.values)
        if not config.models:
            raise ConfigError(args.values, ["the `models` list is empty: nothing to deploy"])
        return config.models
    missing = [flag for flag, value in (("MODEL_ID", args.model_id), ("--model", args.model)) if not value]
    if args.vram_gb is None:
        missing.append("--vram-gb")
    if missing:
        raise ConfigError("deploy", [f"missing {', '.join(missing)} (or pass -f FILE)"])
    spec = model_spec(
        args.model_id,
        args.model,
        args.vram_gb,
        args.replicas,
        args.max_replicas,
        args.router_name,
        args.max_model_len,
        args.max_tokens,
        args.gpu_type,
        **engine_kwargs(args.engine_arg),
    )
    return [spec]


def run(args: argparse.Namespace) -> int:
    specs = specs_from_args(args)
    with VRAMScheduler(args.address, console=Console(stderr=True), token=args.token) as scheduler:
        try:
            results = scheduler.deploy(specs, wait=not args.no_wait, timeout_s=args.timeout)
        except SchedulerError as error:
            print(f"error: {error}", file=sys.stderr)
            return exit_code_for(error)
    if args.output == "json":
        print(json.dumps(as_json(results), indent=2))
    else:
        print_results(results, wide_console())
    return ExitCode.OK


def print_results(results: list[DeployResult], console: Console) -> None:
    table = Table(title="Deployed replicas", title_justify="left")
    for column in ("model_id", "replica", "state", "node", "gpu", "budget"):
        table.add_column(column)
    for result in results:
        for replica in result.replicas:
            table.add_row(
                result.model_id,
                replica.replica_id,
                replica.state,
                replica.node or "-",
                "-" if replica.gpu_index is None else str(replica.gpu_index),
                "-" if replica.bytes is None else f"{replica.bytes / 2**30:.2f} GiB",
            )
    console.print(table)
    for result in results:
        if result.unplaced:
            console.print(f"[yellow]{result.model_id}: not placed:[/yellow] " + "; ".join(result.unplaced))
        if result.endpoint:
            console.print(f"{result.model_id}: {result.endpoint}")
