"""The GPU workload of `ray-vram check --stress`, run inside a process already pinned to one GPU.

It holds the reserved budget for the whole run (matrices, copy buffers and a filler written with a
pattern), runs bf16 and fp16 matrix products and a device-to-device copy, checks that what it wrote
reads back unchanged, and reads through NVML the memory the process really holds, temperature,
clocks, ECC counters, critical XID events and throttle reasons.

torch and pynvml are imported inside `run_gpu_stress`: this module loads on a machine without them.
Run on the GPU machine by tests/gpu/test_stress_gpu.py; CI exercises its CPU-side paths only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ...core import capacity
from ...core.config import GIB, format_gib
from ...monitor.nvml_usage import process_usage

MIB = 1024**2
#: NVML clock-event (throttle) reason bits, as documented in nvml.h (nvmlClocksEventReason*).
THROTTLE_BITS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
#: Room kept free inside the budget for cuBLAS workspaces and allocator rounding.
HEADROOM_BYTES = 256 * MIB
#: Bytes compared at a time when reading memory back (their bool temporaries fit the headroom).
CHECK_CHUNK_BYTES = 64 * MIB
#: The byte every filler cell holds; any other value read back is a memory fault.
FILL_PATTERN = 0xA5
#: How often NVML is sampled (temperature, throttle reasons) while the GPU works.
SAMPLE_EVERY_S = 0.5


class SkipGPU(Exception):
    """The GPU cannot take the stress run without squeezing others: report it skipped, not failed."""


def throttle_names(mask: int) -> list[str]:
    """The reasons set in an NVML throttle bitmask, idle left out (a GPU between kernels is idle)."""
    return [name for bit, name in THROTTLE_BITS.items() if mask & bit and name != "gpu_idle"]


def matrix_size(budget_bytes: int) -> int:
    """Side of the square matrices: three of them (a, b, out, 2 bytes each) take ≤ 1/8 of the budget."""
    for n in (8192, 4096, 2048, 1024):
        if 3 * n * n * 2 <= budget_bytes // 8:
            return n
    return 512


class _Sampler:
    """Reads temperature and throttle reasons every SAMPLE_EVERY_S while the GPU is busy."""

    def __init__(self, nvml: Any, handle: Any):
        self.nvml, self.handle = nvml, handle
        self.max_temperature: int | None = None
        self.throttle_mask = 0
        self._next = 0.0

    def __call__(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + SAMPLE_EVERY_S
        nvml = self.nvml
        try:
            temperature = int(nvml.nvmlDeviceGetTemperature(self.handle, nvml.NVML_TEMPERATURE_GPU))
            self.max_temperature = max(temperature, self.max_temperature or temperature)
        except nvml.NVMLError:
            pass
        read = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
        )
        try:
            if read is not None:
                self.throttle_mask |= int(read(self.handle))
        except nvml.NVMLError:
            pass


def _timed_loop(
    step: Callable[[], None], seconds: float, sync: Callable[[], None], sample: _Sampler
) -> tuple[int, float]:
    """Run `step` until `seconds` have passed (synchronising every few steps); (count, elapsed)."""
    sync()
    start = time.perf_counter()
    count = 0
    while True:
        for _ in range(8):
            step()
        count += 8
        sync()
        sample()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count, elapsed


def _ecc(nvml: Any, handle: Any) -> tuple[int, int] | None:
    """(uncorrected, corrected) volatile ECC counts; None where the GPU has no ECC."""
    kinds = (nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED)
    try:
        uncorrected, corrected = (
            int(nvml.nvmlDeviceGetTotalEccErrors(handle, kind, nvml.NVML_VOLATILE_ECC)) for kind in kinds
        )
        return uncorrected, corrected
    except nvml.NVMLError:
        return None


def _xid_events(nvml: Any, handle: Any) -> Any:
    try:
        events = nvml.nvmlEventSetCreate()
        nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
        return events
    except nvml.NVMLError:
        return None  # not supported (some VMs and containers): XIDs stay unknown


def _drain_xids(nvml: Any, events: Any) -> list[int]:
    xids: list[int] = []
    if events is None:
        return xids
    wait = getattr(nvml, "nvmlEventSetWait_v2", None) or nvml.nvmlEventSetWait
    try:
        while True:
            xids.append(int(wait(events, 0).eventData))
    except nvml.NVMLError:
        pass  # NVML_ERROR_TIMEOUT: no more events
    finally:
        nvml.nvmlEventSetFree(events)
    return xids


def _own_usage(before: dict[int, int], after: dict[int, int]) -> tuple[int | None, str]:
    """This process's NVML usage: by its pid, else as the one process that appeared during the run
    (inside a container NVML lists host pids, which the container does not see)."""
    pid = os.getpid()
    if pid in after:
        return after[pid], f"pid {pid}"
    new = sorted(set(after) - set(before))
    if len(new) == 1:
        return after[new[0]], f"host pid {new[0]}, the one process new on the GPU (own pid {pid} not listed)"
    listed = ", ".join(str(p) for p in sorted(after)) or "none"
    return None, f"own pid {pid} not listed; {len(new)} new process(es); listed: {listed}"


def _count_differences(tensor: Any, expected: Any) -> int:
    """Bytes of `tensor` unlike `expected` (a tensor of the same shape or one value), compared in
    chunks so that the comparison's own temporaries stay inside the headroom."""
    differ = 0
    for start in range(0, tensor.numel(), CHECK_CHUNK_BYTES):
        part = expected[start : start + CHECK_CHUNK_BYTES] if hasattr(expected, "numel") else expected
        differ += int((tensor[start : start + CHECK_CHUNK_BYTES] != part).sum().item())
    return differ


def run_gpu_stress(gpu_uuid: str, budget_bytes: int, overhead_bytes: int, seconds: float) -> dict[str, Any]:
    """Stress the one visible GPU (already pinned to `gpu_uuid`) within `budget_bytes`; the measured
    fields of a `GPUStress`. Raises `SkipGPU` when the GPU's live free memory cannot hold the run."""
    import pynvml as nvml
    import torch

    nvml.nvmlInit()
    try:
        handle = nvml.nvmlDeviceGetHandleByUUID(gpu_uuid)
        free = int(nvml.nvmlDeviceGetMemoryInfo(handle).free)
        need = capacity.reservation_bytes(budget_bytes, overhead_bytes)
        if free < need:
            raise SkipGPU(
                f"GPU {gpu_uuid} has {format_gib(free)} free now, less than the stress reservation "
                f"{format_gib(need)} (budget + overhead): not forced"
            )
        pids_before = process_usage(nvml, handle)
        ecc_before = _ecc(nvml, handle)
        events = _xid_events(nvml, handle)
        sample = _Sampler(nvml, handle)

        device = torch.device("cuda:0")
        sync = torch.cuda.synchronize
        n = matrix_size(budget_bytes)
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
        copy_bytes = min(GIB, budget_bytes // 8)
        src = torch.randint(0, 256, (copy_bytes,), device=device, dtype=torch.uint8)
        dst = torch.empty_like(src)
        torch.matmul(a, b, out=out)  # warm-up: cuBLAS allocates its workspace now, inside the budget
        dst.copy_(src)
        sync()
        filler_bytes = budget_bytes - torch.cuda.memory_reserved() - HEADROOM_BYTES
        filler = torch.full((max(filler_bytes, 0),), FILL_PATTERN, device=device, dtype=torch.uint8)

        part = seconds / 3
        fields: dict[str, Any] = {}
        count, elapsed = _timed_loop(lambda: torch.matmul(a, b, out=out), part, sync, sample)
        fields["bf16_tflops"] = round(2 * n**3 * count / elapsed / 1e12, 2)
        a16, b16, out16 = a.view(torch.float16), b.view(torch.float16), out.view(torch.float16)
        a16.normal_()
        b16.normal_()
        count, elapsed = _timed_loop(lambda: torch.matmul(a16, b16, out=out16), part, sync, sample)
        fields["fp16_tflops"] = round(2 * n**3 * count / elapsed / 1e12, 2)
        count, elapsed = _timed_loop(lambda: dst.copy_(src), part, sync, sample)
        fields["copy_gbps"] = round(2 * copy_bytes * count / elapsed / 1e9, 1)

        # Read NVML while everything is still held: that is the peak the ledger must cover.
        nvml_bytes, note = _own_usage(pids_before, process_usage(nvml, handle))
        allocated = int(torch.cuda.max_memory_reserved())
        differ = _count_differences(dst, src)
        if differ:
            raise RuntimeError(
                f"the {format_gib(copy_bytes)} device-to-device copy read back {differ} different byte(s)"
            )
        changed = _count_differences(filler, FILL_PATTERN)
        if changed:
            raise RuntimeError(f"{changed} byte(s) of the {format_gib(filler.numel())} filler read back changed")
        sample(force=True)
        ecc_after = _ecc(nvml, handle)
        fields.update(
            allocated_bytes=allocated,
            nvml_bytes=nvml_bytes,
            nvml_note=note,
            temperature_c=int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
            max_temperature_c=sample.max_temperature,
            sm_clock_mhz=int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
            mem_clock_mhz=int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)),
            xids=_drain_xids(nvml, events),
            throttle_reasons=throttle_names(sample.throttle_mask),
        )
        if ecc_before is not None and ecc_after is not None:
            fields["ecc_uncorrected"] = ecc_after[0] - ecc_before[0]
            fields["ecc_corrected"] = ecc_after[1] - ecc_before[1]
        return fields
    finally:
        nvml.nvmlShutdown()
