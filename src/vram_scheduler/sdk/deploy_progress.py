"""How a deploy shows its replicas coming up: bars on a terminal, one line per change elsewhere."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from ..core.contract import DeploymentStatus

PHASES: tuple[str, ...] = ("reserved", "loading", "ready")


class DeployProgress:
    """Each replica's way from reserved → loading → ready: a progress bar per replica on a
    terminal, and one line per change otherwise (logs, pipes, notebooks)."""

    def __init__(self, console: Console, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self._seen: dict[str, str] = {}
        self._tasks: dict[str, Any] = {}
        self._progress = Progress(
            TextColumn("{task.fields[replica]:<24}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[phase]:<9} {task.fields[where]}"),
            console=console,
            transient=False,
        )

    def __enter__(self) -> DeployProgress:
        if self.live:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self._progress.stop()

    def update(self, status: DeploymentStatus) -> None:
        if not self.enabled:
            return
        for replica in status.replicas:
            before = self._seen.get(replica.replica_id)
            if before == replica.state:
                continue
            self._seen[replica.replica_id] = replica.state
            step = PHASES.index(replica.state) + 1 if replica.state in PHASES else 0
            if self.live:
                fields = {"replica": replica.replica_id, "phase": replica.state, "where": replica.where}
                if replica.replica_id not in self._tasks:
                    self._tasks[replica.replica_id] = self._progress.add_task("", total=len(PHASES), **fields)
                self._progress.update(self._tasks[replica.replica_id], completed=step, **fields)
            else:
                arrow = f"{before} → {replica.state}" if before else replica.state
                detail = f": {replica.error}" if replica.error else ""
                line = f"{status.model_id}: {replica.replica_id} ({replica.where}) {arrow}{detail}"
                self.console.print(line, markup=False, highlight=False)
