"""`ray-vram up`: local mode — Ray, allocator, monitor, controller and OpenAI endpoint on this machine."""

from __future__ import annotations

import argparse
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

from ...core.config import load_config
from ...core.contract import DeploymentList
from ...core.exit_codes import ExitCode
from ...core.installation import TOKEN_ENV, token_file
from ...sdk.display import render_vram
from .options import add_values_option

#: How often `up` says which replicas it still waits for (a 14B-class engine with CUDA graphs takes
#: minutes to start on a GPU: a silent `up` looks hung).
WAIT_REPORT_S = 20.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "up",
        help="local mode: serve the values' models on this machine until Ctrl-C",
        description="Start an embedded Ray, the VRAM allocator, a monitor (NVML, or host memory without a GPU),\n"
        "the serving controller and the OpenAI-compatible endpoint, deploy the values' models, print the\n"
        "endpoint and the VRAM table, and stay in the foreground until Ctrl-C (then shut everything down).\n\n"
        "A model without room now is pending (a not-placed line says why) and placed once room appears;\n"
        "one larger than every GPU of this machine is refused before any engine starts.\n\n"
        "exit codes: 0 stopped by Ctrl-C/SIGTERM once ready, 1 a replica failed to start, 2 invalid values,\n"
        "3 a model larger than every GPU here, 130 stopped by Ctrl-C/SIGTERM during start-up (everything\n"
        "started so far is stopped)\n\n"
        "examples:\n"
        "  ray-vram up -f values/local.yaml\n"
        "  ray-vram up -f my-values.yaml --controller-port 9080",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_values_option(parser, required=True, help="values/config file with `models` (and `serving`)")
    parser.add_argument("--controller-port", type=int, default=8080, help="controller HTTP API port (default 8080)")
    parser.add_argument("--num-cpus", type=int, help="CPUs Ray may use (default: all)")
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for replicas (default 600)")
    parser.add_argument(
        "--report-every",
        type=float,
        default=WAIT_REPORT_S,
        metavar="SECONDS",
        help=f"while waiting, say which replicas still load every SECONDS (default {WAIT_REPORT_S:g})",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ...local.stack import LocalStack, NoGPULargeEnough, wait_for_interrupt
    from ...tools.demo.model import demo_sources

    config = load_config(args.values)
    console = Console()
    started = time.monotonic()
    stack: LocalStack | None = None
    code = ExitCode.OK
    # SIGINT and SIGTERM stop start-up with a KeyboardInterrupt, so every phase cleans up. SIGINT is
    # set explicitly too: a process started in the background by a shell inherits it as ignored.
    stop = StopSignal()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:

        def progress(text: str) -> None:
            stop.check()  # between phases: a signal whose KeyboardInterrupt Python dropped
            console.print(f"[dim]{text}[/dim]")

        # The demo models the values name are generated here and served from their directory.
        config = demo_sources(config, progress)
        stack = LocalStack(config, controller_port=args.controller_port, num_cpus=args.num_cpus)
        try:
            stack.start(progress=progress)
        except NoGPULargeEnough as error:
            for reason in error.reasons:
                console.print(f"[red]refused (no GPU here is large enough; local mode: none can join):[/red] {reason}")
            return ExitCode.UNPLACED
        for _, reasons in sorted(stack.applied.unplaced.items()):
            for reason in reasons:
                console.print(f"[yellow]not placed (pending: placed when room appears):[/yellow] {reason}")
        progress("waiting for replicas to load ...")
        try:
            status = wait_ready_saying_what_loads(stack.controller, args.ready_timeout, progress, args.report_every)
        except (RuntimeError, TimeoutError) as error:
            stop.check()
            console.print(f"[red]replicas failed:[/red] {error}")
            return ExitCode.FAILURE
        stop.check()
        import ray

        state = stack.controller.allocator.vram_state()
        console.print(render_vram(state))
        answering, pending = _split(status)
        models = f"models: {', '.join(answering) or 'none'}" + (
            f"; pending, not placed: {', '.join(pending)}" if pending else ""
        )
        console.print(
            f"[green]ready in {time.monotonic() - started:.0f}s[/green] — OpenAI endpoint "
            f"[bold]{stack.controller.endpoint}[/bold] ({models}); controller API "
            f"http://127.0.0.1:{args.controller_port}/v1/deployments (token: {token_source()}); Ray GCS "
            f"{ray.get_runtime_context().gcs_address}\n"
            f"try: curl {stack.controller.endpoint}/chat/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{answering[0] if answering else "MODEL"}", '
            f'"messages": [{{"role": "user", "content": "hello"}}]}}\'\n'
            "Ctrl-C to stop"
        )
        wait_for_interrupt()
        console.print("[dim]shutting down ...[/dim]")
    except KeyboardInterrupt:
        console.print("[dim]interrupted: shutting down ...[/dim]")
        code = ExitCode.INTERRUPTED
    except Exception:
        if stop.received is None:
            raise
        # a phase failed after a signal whose KeyboardInterrupt was dropped (e.g. the monitor's
        # first report never came): the stop that was asked for, not a failure
        console.print("[dim]interrupted: shutting down ...[/dim]")
        code = ExitCode.INTERRUPTED
    except SystemExit as stop:
        if stop.code != signal.SIGTERM:  # Ray's own SIGTERM handler, active inside ray.init, exits with 15
            raise
        console.print("[dim]interrupted: shutting down ...[/dim]")
        code = ExitCode.INTERRUPTED
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        try:
            if stack is not None:
                stack.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    console.print("stopped: no replicas, reservations or Ray processes left")
    return code


def wait_ready_saying_what_loads(
    controller: Any, timeout_s: float, progress: Callable[[str], None], every_s: float = WAIT_REPORT_S
) -> DeploymentList:
    """`controller.wait_ready`, in steps of `every_s`; after each step still waiting, one line saying
    which replicas are ready and which still load. Raises as `wait_ready` does, TimeoutError after
    `timeout_s` in all."""
    started = time.monotonic()
    deadline = started + timeout_s
    while True:
        try:
            return controller.wait_ready(timeout_s=max(0.1, min(every_s, deadline - time.monotonic())))
        except TimeoutError:
            status = controller.status()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"replicas not ready after {timeout_s:g}s: {_replica_states(status)}") from None
            progress(f"still waiting ({time.monotonic() - started:.0f}s): {_replica_states(status)}")


def _replica_states(status: DeploymentList) -> str:
    """Placed replicas grouped by state, e.g. `ready: big-0; loading: huge-0 (GPU 0)`."""
    groups: dict[str, list[str]] = {}
    for model in status.models:
        for replica in model.replicas:
            if replica.state == "pending":
                continue
            where = f" (GPU {replica.gpu_index})" if replica.state != "ready" and replica.gpu_index is not None else ""
            groups.setdefault(replica.state, []).append(replica.replica_id + where)
    return "; ".join(f"{state}: {', '.join(ids)}" for state, ids in groups.items()) or "no replica placed"


def _split(status: DeploymentList) -> tuple[list[str], list[str]]:
    """The models that answer (a ready replica) and those with pending replicas, from the status."""
    models = status.models
    return [m.model_id for m in models if m.answers], [m.model_id for m in models if m.pending]


def token_source() -> str:
    """Where clients find the controller token (what `LocalStack` took)."""
    return f"${TOKEN_ENV}" if os.environ.get(TOKEN_ENV, "").strip() else str(token_file())


class StopSignal:
    """The SIGINT/SIGTERM handler of `up`: a KeyboardInterrupt, and the signal remembered. Python
    drops an exception raised while the main thread runs a finalizer or releases a logging lock
    ("Exception ignored in ..."), so start-up checks `received` between phases as well."""

    def __init__(self) -> None:
        self.received: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.received = signum
        raise KeyboardInterrupt(f"signal {signum}")

    def check(self) -> None:
        """Raise the KeyboardInterrupt again if a signal came (its first one may have been dropped)."""
        if self.received is not None:
            raise KeyboardInterrupt(f"signal {self.received}")
