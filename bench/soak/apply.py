"""The soak's `helm upgrade`: a fresh process joins the stack's Ray cluster and applies a whole
values file, exactly as the chart's controller pod does when an upgrade restarts it with new
values (`ray-vram serve`: `join_ray`, `start_controller`, `controller.apply(config)`).

It then waits for every model of the values to be ready (`--wait`) and prints one JSON line:
the apply's result, its timings, and what the controller and the ledger hold afterwards (the
models listed, the model of every reservation).

Usage: python -m bench.soak.apply GCS_ADDRESS VALUES [--wait]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from vram_scheduler.cli.commands.serve import join_ray, start_controller
from vram_scheduler.core.config import load_config


def apply_values(address: str, values: str, wait: bool, timeout_s: float) -> dict[str, Any]:
    started = time.monotonic()
    config = load_config(values)
    join_ray(address, timeout_s=60)
    controller = start_controller(config)
    joined = time.monotonic()
    result = controller.apply(config)
    applied = time.monotonic()
    out: dict[str, Any] = {
        "result": result.model_dump(),
        "join_s": round(joined - started, 1),
        "apply_s": round(applied - joined, 1),
    }
    if wait:
        controller.wait_ready([m.model_id for m in config.models], timeout_s=timeout_s)
        out["ready_s"] = round(time.monotonic() - joined, 1)  # from the apply call

    out["listed"] = sorted(m.model_id for m in controller.status().models)
    out["reserved"] = sorted(r.model_id for r in controller.allocator.reservations())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address", help="the stack's Ray GCS address (127.0.0.1:PORT)")
    parser.add_argument("values", help="values file: the whole new configuration")
    parser.add_argument("--wait", action="store_true", help="wait until every model of the values is ready")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for readiness")
    args = parser.parse_args()
    print(json.dumps(apply_values(args.address, args.values, args.wait, args.timeout)), flush=True)


if __name__ == "__main__":
    main()
