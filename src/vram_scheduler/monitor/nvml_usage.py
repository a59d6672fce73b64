"""Per-process GPU memory as NVML reports it: the one reader the monitor, `measure`, the stress
check and the GPU benchmark share."""

from __future__ import annotations

from typing import Any


def process_usage(nvml: Any, handle: Any) -> dict[int, int]:
    """pid → bytes on the GPU of `handle` (compute processes; a pid listed twice is summed).

    `usedGpuMemory` is None where the driver cannot attribute memory (e.g. WDDM): counted as 0.
    """
    usage: dict[int, int] = {}
    for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
        usage[int(process.pid)] = usage.get(int(process.pid), 0) + int(process.usedGpuMemory or 0)
    return usage
