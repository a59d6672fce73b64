"""ray-vram's local stack started for a measurement, and each replica's NVML peak against its
reservation: what the GPU benchmark (`bench.gpu.run`) and the GPU tests (tests/gpu) share, so
their peaks are counted alike.

Runs on the GPU machine only (NVML, CUDA vLLM); nothing here is imported by CI's CPU tests.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tools import GIB, NVMLSampler, process_tree


def replica_budget_gb(total_bytes: int) -> float:
    """The replica budget the GPU tests and the benchmark use: a tenth of the GPU, in half GiB."""
    return math.floor(total_bytes / GIB * 0.1 * 2) / 2


def generated_model(directory: Path, kind: str = "text") -> Path:
    """A demo model of real size (`shape="gpu"`) in `directory` unless one is there already, made in
    a child process (no CUDA context in this one)."""
    if not (directory / "config.json").exists():
        code = (
            "import sys; from vram_scheduler.tools.demo.model import generate_demo_model as g; "
            "g(sys.argv[1], shape='gpu', kind=sys.argv[2])"
        )
        subprocess.run([sys.executable, "-c", code, str(directory), kind], check=True)
    return directory


@dataclass
class MeasuredStack:
    """A running local stack, the NVML sampler that watched it start, and how long that took."""

    local: Any
    sampler: NVMLSampler
    ready_s: float

    @property
    def router_base(self) -> str:
        return self.local.controller.endpoint.removesuffix("/v1")


@contextlib.contextmanager
def measured_stack(
    models: list[dict[str, Any]],
    overhead_gb: float | None,
    ready_timeout_s: float = 540,
    placement: dict[str, Any] | None = None,
    serving: dict[str, Any] | None = None,
) -> Iterator[MeasuredStack]:
    """The local stack serving `models` on free ports, an NVML sampler running from before its first
    replica starts (start-up and CUDA-graph capture count towards each peak); entered once every
    replica is ready, stopped on leaving. `placement` and `serving`: settings beside the overhead,
    host, port and queue bound."""
    from vram_scheduler.cli.commands.up import wait_ready_saying_what_loads
    from vram_scheduler.core.config import parse_config
    from vram_scheduler.core.loopback import free_port
    from vram_scheduler.local.stack import LocalStack

    config = parse_config(
        {
            "models": models,
            "placement": {"replica_overhead_gb": overhead_gb, **(placement or {})},
            "serving": {"host": "127.0.0.1", "port": free_port(), "max_ongoing_requests": 512, **(serving or {})},
        }
    )
    local = LocalStack(config, controller_port=free_port())
    with NVMLSampler() as sampler:
        started = time.monotonic()
        try:
            local.start(progress=print)
            # a line every 20 s naming the replicas still loading (a hang is then readable in the log)
            wait_ready_saying_what_loads(local.controller, ready_timeout_s, print)
            yield MeasuredStack(local, sampler, round(time.monotonic() - started, 1))
        finally:
            local.stop()


def replica_infos(model_ids: list[str]) -> list[dict[str, Any]]:
    """`replica_info` of every replica of these models (their Serve applications), model by model."""
    from ray import serve

    from vram_scheduler.serving.app import model_app_name

    return [
        info
        for model_id in model_ids
        for info in serve.get_app_handle(model_app_name(model_id)).replica_info.remote().result(timeout_s=60)
    ]


def replica_tree(info: dict[str, Any]) -> list[int]:
    """A replica's processes: its actor, the engine processes it started, and their descendants now."""
    return sorted({p for pid in info["pids"] for p in process_tree(pid)})


def replica_peaks(
    sampler: NVMLSampler, infos: list[dict[str, Any]], overhead_gb: float | None = None
) -> list[dict[str, Any]]:
    """Each replica's process tree, its NVML peak against its budget and its reservation (budget +
    the overhead its reservation holds; `overhead_gb` for a replica that reports none), and the GPUs
    its engine used."""
    from vram_scheduler.core import capacity
    from vram_scheduler.core.config import gib_to_bytes

    rows = []
    for info in infos:
        tree = replica_tree(info)
        peak = sampler.tree_peak(tree)
        held = info.get("overhead_bytes")
        overhead = held if held is not None else gib_to_bytes(overhead_gb or capacity.DEFAULT_OVERHEAD_GB)
        reservation = capacity.reservation_bytes(info["bytes"], overhead)
        rows.append(
            {
                "replica_id": info["replica_id"],
                "gpu_uuid": info["gpu_uuid"],
                "engine_gpus": sorted({sampler.gpu_of_pid[p] for p in tree if p in sampler.gpu_of_pid}),
                "budget_bytes": info["bytes"],
                "overhead_bytes": overhead,
                "reservation_bytes": reservation,
                "verdict": capacity.verdict(peak, info["bytes"], overhead),
                "nvml_peak_bytes": peak,
                "peak_minus_budget_gib": round((peak - info["bytes"]) / GIB, 3),
                "peak_minus_reservation_gib": round((peak - reservation) / GIB, 3),
                "pids": tree,
            }
        )
    return rows


def declared_as_measured(model_id: str, size: str, root: Path, results: Path, max_model_len: int) -> dict[str, Any]:
    """A model as a user declares it after `ray-vram measure` (the `sizes` stage's result for `size`):
    its recommended `vram_gb` and `overhead_gb`."""
    measured = json.loads((results / f"sizes-{size}.json").read_text())
    return {
        "model_id": model_id,
        "model": str(root / size),
        "vram_gb": measured["vram_gb"],
        "overhead_gb": measured["overhead_gb"],
        "max_model_len": max_model_len,
    }
