"""`ray-vram measure`: run a model under a workload and print the `vram_gb` to declare for it."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.status import Status
from rich.table import Table

from ...core.config import ConfigError
from ...core.exit_codes import ExitCode
from ...core.flags import add_output_option
from ...tools.measure import format_size as _size


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "measure",
        help="measure the vram_gb a model needs for a max_model_len and a concurrency",
        description="Start the model in vLLM's own server (on a GPU, or on CPU) with its KV cache sized for\n"
        "CONCURRENCY sequences of MAX_MODEL_LEN tokens, send CONCURRENCY long prompts at a time,\n"
        "read the peak footprint of the server's processes (NVML on CUDA, resident memory on CPU)\n"
        "every 50 ms, and print the vram_gb to declare, with a ready-to-paste `models:` entry.\n\n"
        "exit codes: 0 measured, 1 the engine failed to start or requests failed, 2 invalid input\n\n"
        "examples:\n"
        "  ray-vram measure --model Qwen/Qwen2.5-0.5B-Instruct --max-model-len 4096 --concurrency 16\n"
        "  ray-vram measure --model demo --max-model-len 512 --concurrency 2 --device cpu --output json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="`demo`, a local model directory or a Hugging Face name")
    parser.add_argument("--max-model-len", type=int, required=True, help="longest prompt + completion in tokens")
    parser.add_argument("--concurrency", type=int, required=True, help="requests in flight at once")
    parser.add_argument("--num-prompts", type=int, help="requests in all (default 4 × concurrency)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    parser.add_argument(
        "--device", choices=["auto", "cuda", "cpu"], default="auto", help="default: cuda when NVML finds a GPU"
    )
    parser.add_argument("--gpu", help="GPU index or UUID (default: the one with most free memory)")
    parser.add_argument(
        "--engine-kwargs",
        type=json.loads,
        default={},
        metavar="JSON",
        help='extra vLLM arguments as in models[].engine_kwargs, e.g. \'{"dtype": "bfloat16"}\'',
    )
    parser.add_argument("--model-id", help="model_id for the printed models: entry (default: from the model name)")
    parser.add_argument("--start-timeout", type=float, default=1200.0, help="seconds to wait for the engine (1200)")
    parser.add_argument("--log-file", type=Path, help="where vLLM's server log goes (default: a temporary file)")
    parser.add_argument(
        "--no-replica-run",
        dest="replica_run",
        action="store_false",
        help="CUDA: skip the second run at vram_gb as a replica runs it (share, MPS cap), which measures the "
        "peak over the share that overhead_gb covers; without it overhead_gb is derived from the sizing run",
    )
    add_output_option(parser)
    parser.set_defaults(func=run)


class _ConsoleProgress:
    """Step lines on stderr, and a live status line for the long waits when stderr is a terminal."""

    def __init__(self, console: Console):
        self.console = console
        self.status: Status | None = console.status("") if console.is_terminal else None
        self.started = time.monotonic()

    def step(self, message: str) -> None:
        self.console.print(f"[dim]{time.monotonic() - self.started:6.1f}s[/dim] {message}", highlight=False)

    def tick(self, message: str) -> None:
        if self.status is not None:
            self.status.update(message)
            self.status.start()

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()


def run(args: argparse.Namespace) -> int:
    from ...tools.measure import EngineStartError, MeasureRequest, measure

    if not isinstance(args.engine_kwargs, dict):
        raise ConfigError("--engine-kwargs", [f"engine_kwargs = {args.engine_kwargs!r}: must be a JSON object"])
    request = MeasureRequest(
        model=args.model,
        max_model_len=args.max_model_len,
        concurrency=args.concurrency,
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
        device=args.device,
        gpu=args.gpu,
        engine_kwargs=args.engine_kwargs,
        model_id=args.model_id,
        start_timeout_s=args.start_timeout,
        log_path=args.log_file,
        replica_run=args.replica_run,
    )
    err = Console(stderr=True, soft_wrap=True)  # paths and vLLM lines unbroken
    progress = _ConsoleProgress(err)
    try:
        result = measure(request, progress)
    except EngineStartError as error:
        progress.close()
        err.print(f"[red]error:[/red] {error}; vLLM's own error lines:", highlight=False)
        for line in error.lines:
            err.print(f"  {line}", highlight=False, markup=False)
        err.print(f"full log: {error.log_path}", highlight=False)
        return ExitCode.FAILURE
    finally:
        progress.close()
    if args.output == "json":
        print(json.dumps(result.model_dump(), indent=2))
    else:
        console = Console()
        print_result(result, console if console.is_terminal else Console(width=120))
    if result.failed:
        err.print(f"[red]error:[/red] {result.failed} request(s) failed: {'; '.join(result.errors)}", highlight=False)
        return ExitCode.FAILURE
    return ExitCode.OK


def print_result(result: Any, console: Console) -> None:
    table = Table(title=f"ray-vram measure: {result.model}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_column("note", style="dim")
    where = result.gpu if result.device == "cuda" else "CPU"
    rows = [
        ("device", where, f"vLLM {result.vllm_version}, {result.dtype}"),
        ("max_model_len", str(result.max_model_len), f"prompts up to {result.prompt_tokens_max} tokens"),
        ("concurrency", str(result.concurrency), f"{result.num_prompts} requests × {result.max_tokens} tokens"),
        ("weights", _size(result.weights_bytes), "checkpoint files"),
        (
            "KV cache",
            _size(result.kv_cache_bytes),
            f"{result.kv_bytes_per_token} B/token, blocks of {result.block_size}",
        ),
        ("footprint after start", _size(result.idle_bytes), result.footprint_source),
        ("peak at start", _size(result.peak_start_bytes), f"ready in {result.start_seconds:g}s"),
        ("peak under load", _size(result.peak_load_bytes), f"{result.output_tokens_per_s:g} output tok/s"),
        ("requests", f"{result.completed} ok, {result.failed} failed", f"in {result.load_seconds:g}s"),
        ("vram_gb", f"[bold]{result.vram_gb:g}[/bold]", _vram_note(result)),
        *_replica_rows(result),
        ("peak over the share", _size(result.peak_over_share_bytes), "peak − vram_gb"),
        (
            "overhead_gb",
            f"[bold]{result.overhead_gb:g}[/bold]",
            f"peak over the share + {result.margin_gb:g} GiB margin, up to 0.1 GiB",
        ),
        ("reservation", f"{result.reservation_gb:g} GiB", "vram_gb + overhead_gb: packing and the MPS cap"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(result.snippet, markup=False, highlight=False)


def _replica_rows(result: Any) -> list[tuple[str, str, str]]:
    run = result.replica_run
    if run is None:
        return []
    cap = f"MPS cap {_size(run.cap_bytes)}" if run.mps_capped else "no MPS daemon: not capped"
    return [
        (
            "replica run",
            f"peak {_size(run.peak_bytes)}",
            f"share {run.gpu_memory_utilization:g} of the GPU, {cap}; {run.completed} ok, {run.failed} failed",
        )
    ]


def _vram_note(result: Any) -> str:
    if result.device == "cuda":
        return "peak − 0.5 GiB CUDA context (the overhead covers it), up to 0.5 GiB"
    return f"peak, at least weights + 1.25 GiB runtime + KV ({_size(result.sizing_floor_bytes)}), up to 0.5 GiB"
