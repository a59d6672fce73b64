"""`ray-vram sleep MODEL` / `ray-vram wake MODEL`: an operator puts a model's replicas to sleep, or
wakes them, now (docs/operations.md "More models than VRAM")."""

from __future__ import annotations

import argparse
import json
import sys

from ...core.contract import SleepReport, WakeReport
from ...core.exit_codes import ExitCode
from ...core.flags import add_output_option
from ...sdk.client import SchedulerError, VRAMScheduler, exit_code_for
from .options import add_controller_address_option


def register(subparsers: argparse._SubParsersAction) -> None:
    for name, what, detail in (
        (
            "sleep",
            "put a model's awake replicas to sleep now",
            "Each replica leaves the routers, finishes its requests in flight, and sleeps: on a GPU with sleep mode\n"
            "its engine keeps its sleeping footprint; on CPU its engine stops. The next request wakes it.\n"
            "A pinned model (or one without a sleep policy) is refused.",
        ),
        (
            "wake",
            "wake a model's sleeping or stopped replicas now",
            "Each replica takes its whole reservation back, putting the least recently used idle replicas of\n"
            "its GPU to sleep where room is short (never a pinned one or one with requests in flight), then\n"
            "wakes its engine (starts it where stopped). Prints how long each took.",
        ),
    ):
        parser = subparsers.add_parser(
            name,
            help=what,
            description=f"{what[0].upper()}{what[1:]}.\n\n{detail}\n\nexit codes: 0 done, 1 refused or failed "
            f"(the reason is printed)\n\nexample:\n  ray-vram {name} qwen",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("model_id", help=f"model to {name}")
        add_output_option(parser)
        add_controller_address_option(parser)
        parser.set_defaults(func=run, action=name)


def run(args: argparse.Namespace) -> int:
    with VRAMScheduler(args.address, token=args.token) as scheduler:
        try:
            replicas: list[SleepReport] | list[WakeReport] = (
                scheduler.sleep(args.model_id) if args.action == "sleep" else scheduler.wake(args.model_id)
            )
        except SchedulerError as error:
            print(f"error: {error}", file=sys.stderr)
            return exit_code_for(error)
    if args.output == "json":
        answers = [r.model_dump(mode="json") for r in replicas]
        print(json.dumps({"model_id": args.model_id, "replicas": answers}))
        return ExitCode.OK
    for replica in replicas:
        if isinstance(replica, WakeReport):
            evicted = f", evicted {', '.join(replica.evicted)}" if replica.evicted else ""
            how = "started" if replica.cold else "woken"
            print(f"{replica.replica_id}: awake ({how} in {replica.seconds:.2f}s{evicted})")
        else:
            print(f"{replica.replica_id}: {replica.state or 'asleep'}")
    return ExitCode.OK
