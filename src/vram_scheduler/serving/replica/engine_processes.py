"""The processes that hold an engine's memory: vLLM's engine core (it names itself
`VLLM::EngineCore`) and its descendants. vLLM's shutdown returns once it asked them to stop, and
one may still hold memory for a moment after; a replica frees its reservation only once they are
all gone, so the ledger never hands out memory an engine still holds."""

from __future__ import annotations

import contextlib
import logging

import psutil

log = logging.getLogger("ray.serve")

#: What vLLM's engine-core process carries in its name or command line.
ENGINE_CORE_MARK = "EngineCore"
#: How long the engine's processes get to exit after vLLM's shutdown before they are killed.
EXIT_GRACE_S = 10.0


def engine_processes() -> list[psutil.Process]:
    """This process's engine cores and every process below them (none when no engine runs)."""
    found: dict[int, psutil.Process] = {}
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if any(ENGINE_CORE_MARK in part for part in [child.name(), *child.cmdline()]):
                    found[child.pid] = child
                    found.update((p.pid, p) for p in child.children(recursive=True))
    return sorted(found.values(), key=lambda p: p.pid)


def wait_gone(processes: list[psutil.Process], grace_s: float = EXIT_GRACE_S) -> list[int]:
    """Block until every process is gone: those still running after `grace_s` are killed. Returns
    the pids that had to be killed."""
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    if alive:
        log.warning("process(es) %s still ran %gs after being asked to stop: killed", alive, grace_s)
    return [p.pid for p in alive]
