"""`ray-vram node-start head|worker [ray start args]`: start this node's Ray with its GPUs and VRAM declared."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys

from ...core.exit_codes import ExitCode
from ...core.flags import add_output_option
from ...monitor.node import KUBERAY_COMMAND_ENV, build_node_start, detect_gpus, kuberay_args

#: Where a GPU node's MPS control daemon listens (inside the Ray container; short for AF_UNIX paths).
MPS_DIR = "/tmp/ray-vram-mps"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "node-start",
        help="start Ray on this node with its GPUs and GPU labels (container entrypoint)",
        description="Detect this node's GPUs through NVML and run `ray start --block` with --num-gpus and node\n"
        "labels (ray-vram.io/gpu-model, ray-vram.io/node-name). A node without GPUs starts with no GPU\n"
        "options. Options of node-start go before the role; everything after it is passed to\n"
        "`ray start`. Without ray start arguments the command KubeRay generated\n"
        f"(${KUBERAY_COMMAND_ENV}) is used.\n\n"
        "exit codes: ray's own once started; 1 Ray could not be started, 2 invalid arguments\n\n"
        "examples:\n"
        "  ray-vram node-start head --port=6379 --dashboard-host=0.0.0.0\n"
        "  ray-vram node-start worker --address=ray-head:6379\n"
        "  ray-vram node-start --dry-run --inventory-file values/inventory-example.yaml --node-name gpu-1 head",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry-run", action="store_true", help="print the `ray start` command instead of running it")
    add_output_option(parser, what="--dry-run")
    parser.add_argument(
        "--node-name",
        default=os.environ.get("NODE_NAME") or os.uname().nodename,
        help="node name for the ray-vram.io/node-name label (default: $NODE_NAME, else the host name)",
    )
    parser.add_argument(
        "--inventory-file",
        help="take this node's GPUs from a declared inventory (machines without a GPU) instead of NVML",
    )
    parser.add_argument("role", choices=["head", "worker"])
    parser.add_argument("ray_args", nargs=argparse.REMAINDER, metavar="RAY_START_ARGS")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ray_args = args.ray_args
    if ray_args and ray_args[0] == "--":
        ray_args = ray_args[1:]
    if not ray_args:
        ray_args = kuberay_args() or []
    try:
        detected = detect_gpus(args.node_name, args.inventory_file)
    except RuntimeError as error:
        print(f"error: node {args.node_name}: {error}", file=sys.stderr)
        return ExitCode.FAILURE
    start = build_node_start(args.role, ray_args, detected.gpus, args.node_name, detected.source)
    if args.dry_run and args.output == "json":
        print(json.dumps(start.model_dump() | {"no_gpu_reason": detected.reason}, indent=2))
        return ExitCode.OK
    if detected.reason:
        print(f"ray-vram node-start: no GPU options on node {args.node_name}: {detected.reason}", file=sys.stderr)
    for note in start.notes:
        print(f"ray-vram node-start: {note}", file=sys.stderr)
    line = shlex.join(start.command)
    if args.dry_run:
        print(line)
        return ExitCode.OK
    ray = shutil.which("ray")
    if ray is None:
        print("error: the `ray` command is not on PATH: install ray-vram[serve] (ray==2.60.0)", file=sys.stderr)
        return ExitCode.FAILURE
    _start_mps(detected.source == "nvml" and bool(detected.gpus))
    print(f"ray-vram node-start: {line}", file=sys.stderr, flush=True)
    # exec: Ray becomes this process, so the container's signals and exit code are Ray's.
    os.execv(ray, [ray, *start.command[1:]])
    return ExitCode.FAILURE  # not reached


def _start_mps(has_gpus: bool) -> None:
    """On a node with real GPUs: start the MPS control daemon that caps each replica's engine at its
    reservation (`serving.mps`), and export its pipe directory to Ray and every worker it starts."""
    from ...serving.replica import mps

    if not has_gpus or os.environ.get(mps.SWITCH_ENV) == "off":
        return
    if mps.control_binary() is None:
        print(
            f"ray-vram node-start: {mps.CONTROL} not found: replicas on this node are sized to their budgets "
            "but not hard-capped (mount the NVIDIA driver's compute utilities, or set RAY_VRAM_MPS=off)",
            file=sys.stderr,
        )
        return
    pipe_dir, log_dir = f"{MPS_DIR}/pipe", f"{MPS_DIR}/log"
    try:
        mps.start_daemon(pipe_dir, log_dir)
    except mps.MPSError as error:
        print(f"ray-vram node-start: MPS not started: {error}", file=sys.stderr)
        return
    os.environ[mps.PIPE_DIR_ENV] = pipe_dir
    print(f"ray-vram node-start: MPS daemon in {pipe_dir}: each replica is capped at its reservation", file=sys.stderr)
