"""The one VRAM table: `ray-vram status`, `ray-vram up`, `ray-vram plan` and
`VRAMScheduler.display_vram_state` show a GPU's room the same way, whether it comes from the
allocator's ledger (`VRAMState`) or from a plan that touched no cluster (`Plan`).

Sizes are GiB with two decimals, the unit in the header; free = total − unmanaged − reserved, and
reserved counts each replica's reservation: its budget plus its model's overhead. A replica's use is
judged against its reservation (the cap its engine runs under), never against the budget alone: a
CUDA engine always uses somewhat more than its budget, which is what the overhead holds room for.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ..core import capacity
from ..core.config import GIB, PlacementSettings
from ..core.contract import DeploymentStatus, GPUState, Plan, VRAMState

CAPTION = (
    "replicas: budget + overhead = reservation; reserved = what they hold (awake: the reservation, asleep: the "
    "sleeping footprint, stopped: nothing, started by its first request); free = total − unmanaged − reserved"
)


def wide_console(stderr: bool = False) -> Console:
    """A console that does not squeeze tables to 80 columns when output goes to a pipe or file."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=160)


@dataclass(frozen=True)
class _Replica:
    replica_id: str
    bytes: int
    overhead_bytes: int
    used_bytes: int | None = None
    state: str = "awake"
    held_bytes: int | None = None
    asleep_level: int | None = None
    planned: bool = False
    settling: bool = False

    def state_text(self) -> str:
        """Nothing awake; `asleep L1, holds 2.30` / `stopped` (a plan: `starts stopped`) otherwise;
        `going to sleep L1, holds 12.00` / `stopping, holds 12.00` while its engine lets go."""
        if self.state == "awake":
            return ""
        if self.settling:
            going = f"going to sleep L{self.asleep_level}" if self.state == "asleep" else "stopping"
            return f" {going}, holds {_gib(self.held_bytes or 0)}"
        if self.state == "asleep":
            return f" asleep L{self.asleep_level}, holds {_gib(self.held_bytes or 0)}"
        return " starts stopped" if self.planned else " stopped"


@dataclass(frozen=True)
class _Row:
    """One GPU, whichever source: a plan knows no current use, health or staleness."""

    node: str
    index: int
    name: str
    total_bytes: int
    used_bytes: int | None
    unmanaged_bytes: int
    reserved_bytes: int
    free_bytes: int
    healthy: bool = True
    stale: bool = False
    replicas: list[_Replica] = field(default_factory=list)


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / GIB:.2f}"


def _state_row(gpu: GPUState, settings: PlacementSettings) -> _Row:
    return _Row(
        node=gpu.node,
        index=gpu.index,
        name=gpu.name,
        total_bytes=gpu.total_bytes,
        used_bytes=gpu.used_bytes,
        unmanaged_bytes=gpu.unmanaged_bytes,
        reserved_bytes=gpu.reserved_bytes,
        free_bytes=gpu.free_bytes,
        healthy=gpu.healthy,
        stale=gpu.stale,
        replicas=[
            _Replica(
                r.replica_id,
                r.bytes,
                capacity.held_overhead(r.overhead_bytes, settings),
                r.used_bytes,
                state=r.state,
                held_bytes=r.held_bytes,
                asleep_level=r.asleep_level,
                settling=r.settling,
            )
            for r in gpu.replicas
        ],
    )


def _replicas_cell(replicas: Sequence[_Replica]) -> Text:
    """`id budget+overhead (uses now, within reservation)`; bold red, with by how much, for a replica
    over its reservation."""
    if not replicas:
        return Text("-")
    cell = Text()
    for i, replica in enumerate(replicas):
        label = f"{replica.replica_id} {_gib(replica.bytes)}+{_gib(replica.overhead_bytes)}{replica.state_text()}"
        over = False
        if replica.used_bytes is not None:
            verdict = capacity.verdict(replica.used_bytes, replica.bytes, replica.overhead_bytes)
            over = verdict == "over reservation"
            label += f" (uses {_gib(replica.used_bytes)}, {verdict}"
            if over:
                excess = -capacity.headroom_bytes(replica.used_bytes, replica.bytes, replica.overhead_bytes)
                label += f" by {_gib(excess)}"
            label += ")"
        cell.append(", " if i else "")
        cell.append(label, style="bold red" if over else "")
    return cell


def _vram_table(title: str, rows: Sequence[_Row]) -> Table:
    """Red marks a GPU over its total (reservations and unmanaged memory, or use); yellow a stale node.
    The used column appears only when some row knows its current use (never for a plan)."""
    show_used = any(row.used_bytes is not None for row in rows)
    table = Table(title=title, title_justify="left", caption=CAPTION, caption_justify="left")
    columns = ["node", "gpu", "name", "total GiB", *(["used GiB"] if show_used else [])]
    for column in (*columns, "unmanaged GiB", "reserved GiB", "free GiB", "replicas (budget+overhead GiB)"):
        table.add_column(
            column, justify="left" if column in {"node", "name", "replicas (budget+overhead GiB)"} else "right"
        )
    for row in rows:
        used = row.used_bytes or 0
        over = row.reserved_bytes + row.unmanaged_bytes > row.total_bytes or used > row.total_bytes
        flags = ("" if row.healthy else " unhealthy") + (" stale" if row.stale else "")
        table.add_row(
            row.node + flags,
            str(row.index),
            row.name,
            _gib(row.total_bytes),
            *([_gib(used) if row.used_bytes is not None else "-"] if show_used else []),
            _gib(row.unmanaged_bytes),
            _gib(row.reserved_bytes),
            Text(_gib(row.free_bytes), style="bold red" if over or row.free_bytes < 0 else "green"),
            _replicas_cell(row.replicas),
            style="red" if over or not row.healthy else ("yellow" if row.stale else None),
        )
    return table


def render_vram(state: VRAMState, deployments: Sequence[DeploymentStatus] = ()) -> Group:
    """The allocator's VRAM table (one row per node and GPU) and, when given, the models table."""
    parts: list[Any] = [_vram_table("VRAM per GPU", [_state_row(gpu, state.settings) for gpu in state.gpus])]
    if state.orphaned:
        parts.append(Text(f"orphaned reservations (GPU gone): {', '.join(r.replica_id for r in state.orphaned)}"))
    if deployments:
        parts.extend(_models(deployments))
    return Group(*parts)


def _models(deployments: Sequence[DeploymentStatus]) -> list[Any]:
    table = Table(title="Models", title_justify="left")
    for column in ("model_id", "model", "GiB/replica", "max_model_len", "replicas", "states", "pending (not placed)"):
        table.add_column(column)
    now = time.time()
    for status in deployments:
        states = (
            ", ".join(
                f"{r.replica_id}:{r.state}" + (f" ({r.sleep})" if r.sleep not in (None, "awake") else "")
                for r in status.replicas
            )
            or "-"
        )
        ready = sum(r.state == "ready" for r in status.replicas)
        wanted = "max" if status.requested is None else str(status.requested)
        pending = status.pending
        since = f"for {now - pending[0].since:.0f}s: " if pending and pending[0].since is not None else ""
        sizes = status.resolved
        per_replica = f"{status.vram_gb:g}"
        if sizes is not None:
            per_replica += f" + {_gib(sizes.overhead_bytes)} ({sizes.overhead_from})"
        table.add_row(
            status.model_id,
            status.model,
            per_replica,
            str(sizes.max_model_len) if sizes is not None and sizes.max_model_len else "-",
            f"{ready}/{wanted} ready",
            states,
            since + "; ".join(status.unplaced) if pending else "-",
            style="red" if any(r.state == "failed" for r in status.replicas) else ("yellow" if pending else None),
        )
    failed = [(r.replica_id, r.error) for status in deployments for r in status.replicas if r.state == "failed"]
    events = [
        Text(f"{status.model_id} {time.strftime('%H:%M:%S', time.localtime(e.at))} {e.kind}: {e.message}", style="dim")
        for status in deployments
        for e in status.events[-1:]
    ]
    failures = [Text(f"{rid} failed: {error or 'no reason given'}", style="red") for rid, error in failed]
    return [table, *failures, *([Text("latest events:")] if events else []), *events]


def _overheads(overheads: dict[str, capacity.Overhead]) -> Table:
    table = Table(title="Overhead per replica", title_justify="left")
    for column in ("model_id", "overhead GiB", "from"):
        table.add_column(column, justify="right" if column == "overhead GiB" else "left")
    for model_id, found in sorted(overheads.items()):
        table.add_row(model_id, _gib(found.bytes), found.describe())
    return table


def render_plan(result: Plan, overheads: dict[str, capacity.Overhead] | None = None) -> Group:
    """A plan as the same VRAM table, each model's overhead and where it came from, then each
    shortfall and how many replicas were placed."""
    held = {r.replica_id: r for r in result.reservations}
    rows = [
        _Row(
            node=gpu.node,
            index=gpu.index,
            name=gpu.name,
            total_bytes=gpu.total_bytes,
            used_bytes=None,
            unmanaged_bytes=gpu.unmanaged_bytes,
            reserved_bytes=gpu.reserved_bytes,
            free_bytes=gpu.free_bytes,
            replicas=[
                _Replica(
                    rid,
                    held[rid].bytes,
                    held[rid].overhead_bytes or 0,
                    state=held[rid].state,
                    held_bytes=held[rid].held_bytes,
                    asleep_level=held[rid].asleep_level,
                    planned=True,
                )
                for rid in gpu.replicas
            ],
        )
        for gpu in result.gpus
    ]
    parts: list[Any] = [_vram_table("Placement plan (per GPU)", rows)]
    if overheads:
        parts.append(_overheads(overheads))
    parts.extend(
        Text.assemble(("not placed (needs a bigger GPU):" if u.too_big else "not placed:", "red"), f" {u.reason}")
        for u in result.unplaced
    )
    not_placed = sum(u.count for u in result.unplaced)
    asleep = sum(r.state != "awake" for r in result.reservations)
    parts.append(
        Text(
            f"{len(result.reservations)} replica(s) placed"
            + (
                f": {len(result.reservations) - asleep} awake, {asleep} start stopped (their models sleep)"
                if asleep
                else ""
            )
            + (f", {not_placed} not placed" if not_placed else "")
        )
    )
    return Group(*parts)
