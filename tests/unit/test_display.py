"""The one VRAM table, fed by the allocator's state (status, up, the SDK) and by a plan (plan)."""

from __future__ import annotations

import io

from rich.console import Console

from vram_scheduler.core.config import GIB, ModelSpec, PlacementSettings
from vram_scheduler.core.contract import GPUState, ReplicaState, VRAMState
from vram_scheduler.core.inventory import Inventory
from vram_scheduler.core.planner import plan
from vram_scheduler.sdk.display import render_plan, render_vram

HEADERS = [
    "node",
    "gpu",
    "name",
    "total GiB",
    "unmanaged GiB",
    "reserved GiB",
    "free GiB",
    "replicas (budget+overhead GiB)",
]


def shown(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system="standard")
    console.print(renderable)
    return console.file.getvalue()


def ledger_state(used_by_replica: int | None) -> VRAMState:
    replica = ReplicaState(
        replica_id="tiny-0",
        model_id="tiny",
        bytes=GIB * 3 // 2,
        overhead_bytes=2 * GIB,
        cap_bytes=GIB * 7 // 2,
        pid=7,
        pids=[7],
        used_bytes=used_by_replica,
        owner=None,
    )
    gpu = GPUState(
        node="n",
        index=0,
        uuid="GPU-0",
        name="NVIDIA Test 8GB",
        total_bytes=8 * GIB,
        used_bytes=2 * GIB,
        unmanaged_bytes=GIB,
        reserved_bytes=GIB * 7 // 2,
        free_bytes=GIB * 7 // 2,
        healthy=True,
        stale=True,
        replicas=[replica],
    )
    return VRAMState(
        timestamp=0,
        gpus=[gpu],
        nodes=[],
        stale_nodes=["n"],
        orphaned=[],
        startup_locks={},
        settings=PlacementSettings(),
    )


def test_state_table_shows_use_budgets_and_flags() -> None:
    text = shown(render_vram(ledger_state(GIB)))
    assert "VRAM per GPU" in text and all(header in text for header in [*HEADERS, "used GiB"])
    assert "n stale" in text and "NVIDIA Test 8GB" in text
    assert "8.00" in text and "2.00" in text and "3.50" in text
    assert "tiny-0 1.50+2.00 (uses 1.00, within reservation)" in text
    # over its budget (every CUDA engine is) but within budget + overhead: normal, not flagged
    normal = shown(render_vram(ledger_state(3 * GIB)))
    assert "tiny-0 1.50+2.00 (uses 3.00, within reservation)" in normal and "\x1b[1;31m" not in normal
    assert "over reservation" not in normal
    over = shown(render_vram(ledger_state(4 * GIB)))
    assert "tiny-0 1.50+2.00 (uses 4.00, over reservation by 0.50)" in over and "\x1b[1;31m" in over  # bold red


def test_plan_table_is_the_same_table_without_current_use() -> None:
    inventory = Inventory.model_validate(
        {"nodes": [{"node": "g", "gpus": [{"index": 0, "uuid": "u", "name": "L4", "total_gb": 24, "used_gb": 1}]}]}
    )
    result = plan(
        inventory,
        [ModelSpec(model_id="m", model="x", vram_gb=9, replicas=3)],
        settings=PlacementSettings(replica_overhead_gb=2),
    )
    text = shown(render_plan(result))
    assert "Placement plan (per GPU)" in text and all(header in text for header in HEADERS)
    assert "used GiB" not in text
    assert "m-0 9.00+2.00, m-1 9.00+2.00" in text and "24.00" in text and "1.00" in text and "22.00" in text
    assert "not placed:" in text and "2 replica(s) placed, 1 not placed" in text
