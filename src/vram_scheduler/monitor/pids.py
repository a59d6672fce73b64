"""Which replica a GPU process belongs to.

NVML lists the processes holding memory by host pid. A replica registers the pid it sees for
itself, which is not always the process holding the memory: vLLM's engine core runs in a child
process, and inside a container `os.getpid()` is the pid in the pod's namespace. So a GPU process
matches a replica when the replica's pid is the process's own pid, one of its ancestors' pids, or
one of those pids as seen from a nested pid namespace (`NSpid` in /proc/<pid>/status) — in that
order of preference.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

_MAX_DEPTH = 64


class ProcessMatcher:
    """Resolves GPU pids to the pids a replica may have registered; cached per live pid."""

    def __init__(self, proc_root: str | Path = "/proc"):
        self._proc = Path(proc_root)
        self._cache: dict[int, tuple[int, ...]] = {}

    def _status(self, pid: int) -> tuple[int, list[int]]:
        """(parent pid, NSpid list) of `pid`; (0, []) when it cannot be read."""
        try:
            text = (self._proc / str(pid) / "status").read_text()
        except OSError:
            return 0, []
        ppid, nspids = 0, []
        for line in text.splitlines():
            if line.startswith("PPid:"):
                ppid = int(line.split()[1])
            elif line.startswith("NSpid:"):
                nspids = [int(v) for v in line.split()[1:]]
        return ppid, nspids

    def identities(self, pid: int) -> tuple[int, ...]:
        """Pids that identify `pid`, most specific first: itself, its ancestors, then namespace pids."""
        cached = self._cache.get(pid)
        if cached is not None:
            return cached
        chain, namespaced = [pid], []
        current = pid
        for _ in range(_MAX_DEPTH):
            ppid, nspids = self._status(current)
            # Pid 1 of a pod is its init process, never a replica: it would match every pod.
            namespaced.extend(v for v in nspids[1:] if v > 1 and v not in namespaced)
            if ppid <= 1 or ppid in chain:
                break
            chain.append(ppid)
            current = ppid
        result = tuple(chain) + tuple(v for v in namespaced if v not in chain)
        self._cache[pid] = result
        return result

    def forget_except(self, live: Iterable[int]) -> None:
        """Drop cached entries of processes that are gone (their pid may be reused)."""
        keep = set(live)
        for pid in [p for p in self._cache if p not in keep]:
            del self._cache[pid]

    def owner(self, pid: int, registered: dict[int, str]) -> str | None:
        """The key in `registered` (pid → replica id) that `pid` belongs to, if any."""
        if not registered:
            return None
        for candidate in self.identities(pid):
            if candidate in registered:
                return registered[candidate]
        return None
