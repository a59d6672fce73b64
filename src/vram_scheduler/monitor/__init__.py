"""The VRAM monitor: reads every GPU of a node, exports Prometheus metrics, publishes the
inventory to the allocator and holds replicas to their budgets (``ray-vram monitor``).

readers   — where the numbers come from: NVML, a declared inventory file, or host memory
pids      — which GPU processes belong to which replica (pid, child processes, pid namespaces)
watchdog  — budget vs actual per replica, flagged after N polls over
exporter  — Prometheus metrics and the HTTP endpoints (/metrics, /healthz, /inventory)
publisher — the link to the allocator actor, in its own thread, with backoff
service   — the poll loop tying them together
"""

from __future__ import annotations

from .readers import FileReader, HostMemoryReader, MonitorUnavailable, NVMLReader, Reader, ReadError, Reading

__all__ = [
    "FileReader",
    "HostMemoryReader",
    "MonitorUnavailable",
    "NVMLReader",
    "ReadError",
    "Reader",
    "Reading",
]
