"""Where the monitor's numbers come from: NVML on a GPU node, a declared inventory file, or the
host's memory standing in for one GPU (local mode on a machine without a GPU).

Every reader returns a `Reading`: the node's inventory, per GPU, plus the errors met on the way.
A reader never raises during a poll: a GPU that cannot be read is reported unhealthy and the
error is returned, so the poll loop keeps running and the GPU is withdrawn from placement.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..core.config import ConfigError
from ..core.errors import RayVramError
from ..core.inventory import GPUInfo, GPUProcess, NodeInventory, load_inventory
from .nvml_usage import process_usage

log = logging.getLogger(__name__)

#: XID events after which a GPU should take no new work (DCGM treats these as fatal or as
#: needing a reset: double-bit ECC, fallen off the bus, NVLink, GSP and row-remap failures).
#: Application faults (13, 31, 43, ...) are counted but leave the GPU healthy.
CRITICAL_XIDS = frozenset({48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 109, 119, 120, 140, 143})


class MonitorUnavailable(RayVramError, RuntimeError):
    """The chosen source cannot be read at all (no NVML library, no GPU): the monitor must exit."""


@dataclass(frozen=True)
class ReadError:
    """One problem met during a poll. `kind` is the `kind` label of ray_vram_monitor_errors_total."""

    kind: str
    message: str
    gpu_index: int | None = None


@dataclass
class Reading:
    inventory: NodeInventory
    errors: list[ReadError] = field(default_factory=list)


class Reader(Protocol):
    """A source of per-GPU memory numbers for one node."""

    node: str
    source: str

    def read(self, watch_pids: Collection[int] = ()) -> Reading:
        """Read every GPU now. `watch_pids`: processes whose usage the caller needs even where the
        source does not list processes by itself (host memory)."""
        ...

    def close(self) -> None: ...


def _gpu(
    node: str, index: int, uuid: str, name: str, total: int, used: int, processes: list[GPUProcess], healthy: bool
):
    # Built without validation: the numbers come from the driver, and this runs every poll.
    return GPUInfo.model_construct(
        node=node,
        index=index,
        uuid=uuid,
        name=name,
        total_bytes=total,
        used_bytes=min(used, total),
        processes=processes,
        healthy=healthy,
    )


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class _Device:
    index: int
    handle: Any
    uuid: str
    name: str
    total: int
    used: int = 0
    critical_xid: int | None = None
    reopen: bool = False
    last_key: tuple | None = None
    last_gpu: GPUInfo | None = None


class NVMLReader:
    """Every GPU of this node through NVML: memory info and per-process usage, one call each per GPU."""

    source = "nvml"

    def __init__(self, node: str):
        self.node = node
        try:
            import pynvml
        except ImportError:
            raise MonitorUnavailable(
                "nvidia-ml-py is not installed: install ray-vram[gpu] or pass --inventory-file / --host-memory"
            ) from None
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:
            raise MonitorUnavailable(
                f"cannot initialise NVML on node {node!r}: {error}. No NVIDIA driver library (libnvidia-ml.so.1) "
                "is visible here: run on a GPU node with the NVIDIA container runtime, or pass --inventory-file "
                "(a declared inventory) or --host-memory (local mode)"
            ) from None
        try:
            count = pynvml.nvmlDeviceGetCount()
            if count == 0:
                raise MonitorUnavailable(f"NVML found no GPU on node {node!r} (driver loaded, 0 devices visible)")
            self._devices = [self._open(index) for index in range(count)]
        except BaseException:
            pynvml.nvmlShutdown()
            raise
        self._events = self._watch_xids()

    def _open(self, index: int) -> _Device:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        total = int(nvml.nvmlDeviceGetMemoryInfo(handle).total)
        return _Device(
            index, handle, _decode(nvml.nvmlDeviceGetUUID(handle)), _decode(nvml.nvmlDeviceGetName(handle)), total
        )

    def _watch_xids(self) -> Any:
        nvml = self._nvml
        try:
            events = nvml.nvmlEventSetCreate()
            for device in self._devices:
                nvml.nvmlDeviceRegisterEvents(device.handle, nvml.nvmlEventTypeXidCriticalError, events)
            return events
        except nvml.NVMLError as error:
            log.info("XID events not available on node %s (%s): health comes from read errors only", self.node, error)
            return None

    @property
    def gpu_count(self) -> int:
        return len(self._devices)

    def read(self, watch_pids: Collection[int] = ()) -> Reading:
        nvml = self._nvml
        errors: list[ReadError] = []
        if self._events is not None:
            errors.extend(self._drain_xids())
        gpus = []
        for device in self._devices:
            try:
                if device.reopen:
                    # After an error the handle may be dead (driver reloaded, NVML re-initialised):
                    # look the GPU up again by UUID, so a GPU that comes back is healthy again.
                    device.handle = nvml.nvmlDeviceGetHandleByUUID(device.uuid)
                    device.reopen = False
                memory = nvml.nvmlDeviceGetMemoryInfo(device.handle)
                processes = self._processes(device.handle)
            except nvml.NVMLError as error:
                device.reopen = True
                kind = "gpu_lost" if error.value == nvml.NVML_ERROR_GPU_IS_LOST else "nvml"
                errors.append(
                    ReadError(kind, f"node {self.node}, GPU {device.index} ({device.uuid}): {error}", device.index)
                )
                gpus.append(
                    _gpu(self.node, device.index, device.uuid, device.name, device.total, device.used, [], False)
                )
                continue
            device.used = int(memory.used)
            key = (int(memory.total), device.used, processes, device.critical_xid is None)
            if key != device.last_key:
                # Model objects only when a number changed: a serving GPU's memory is mostly steady,
                # and building them is most of a poll's Python time.
                total, used, pairs, healthy = key
                listed = [GPUProcess.model_construct(pid=pid, used_bytes=n) for pid, n in pairs]
                device.last_gpu = _gpu(self.node, device.index, device.uuid, device.name, total, used, listed, healthy)
                device.last_key = key
            gpus.append(device.last_gpu)
        inventory = NodeInventory.model_construct(node=self.node, gpus=gpus, source="nvml", timestamp=time.time())
        return Reading(inventory, errors)

    def _processes(self, handle: Any) -> tuple[tuple[int, int], ...]:
        """(pid, bytes) pairs, sorted by pid."""
        return tuple(sorted(process_usage(self._nvml, handle).items()))

    def _drain_xids(self) -> list[ReadError]:
        nvml = self._nvml
        errors = []
        while True:
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError_Timeout:
                return errors
            except nvml.NVMLError as error:
                # Stop watching rather than count the same failure every poll; reads still mark health.
                self._events = None
                errors.append(
                    ReadError("nvml", f"node {self.node}: reading XID events failed, stopped watching: {error}")
                )
                return errors
            xid = int(event.eventData)
            device = self._device_by_uuid(event.device)
            where = f"GPU {device.index} ({device.uuid})" if device else "an unknown GPU"
            critical = xid in CRITICAL_XIDS
            if device is not None and critical:
                device.critical_xid = xid
            errors.append(
                ReadError(
                    "xid",
                    f"node {self.node}, {where}: XID {xid}"
                    + (" (critical: GPU withdrawn from placement)" if critical else " (not critical: counted only)"),
                    device.index if device else None,
                )
            )

    def _device_by_uuid(self, handle: Any) -> _Device | None:
        try:
            uuid = _decode(self._nvml.nvmlDeviceGetUUID(handle))
        except self._nvml.NVMLError:
            return None
        return next((d for d in self._devices if d.uuid == uuid), None)

    def close(self) -> None:
        nvml = self._nvml
        try:
            if self._events is not None:
                nvml.nvmlEventSetFree(self._events)
            nvml.nvmlShutdown()
        except nvml.NVMLError as error:
            log.debug("NVML shutdown: %s", error)


class FileReader:
    """A declared inventory (YAML/JSON, docs/configuration.md "Inventory file format") served as if read from GPUs.

    The file is read again whenever it changes, so a test or an operator can edit it while the
    monitor runs; a file that turns invalid is reported as an error and the last valid state kept.
    """

    source = "file"

    def __init__(self, path: str | Path, node: str | None = None):
        self.path = Path(path)
        inventory = load_inventory(self.path)
        names = [n.node for n in inventory.nodes]
        if node is None:
            if len(names) != 1:
                raise ConfigError(
                    str(self.path),
                    [f"nodes: the file lists {len(names)} nodes ({', '.join(names) or 'none'}); pick one with --node"],
                )
            node = names[0]
        elif node not in names:
            raise ConfigError(str(self.path), [f"nodes: no node {node!r} in the file (it lists {', '.join(names)})"])
        self.node = node
        self._declared = self._pick(inventory)
        self._mtime = self._stat()

    def _pick(self, inventory: Any) -> NodeInventory:
        return next(n for n in inventory.nodes if n.node == self.node)

    def _stat(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return None

    def read(self, watch_pids: Collection[int] = ()) -> Reading:
        errors = []
        mtime = self._stat()
        if mtime != self._mtime:
            try:
                inventory = load_inventory(self.path)
                self._declared = self._pick(inventory)
                self._mtime = mtime
            except ConfigError as error:
                errors.append(ReadError("inventory_file", f"{error} (keeping the last valid inventory)"))
            except StopIteration:
                errors.append(ReadError("inventory_file", f"{self.path}: node {self.node!r} is no longer listed"))
        inventory = self._declared.model_copy(update={"source": "file", "timestamp": time.time()})
        return Reading(inventory, errors)

    def close(self) -> None:
        pass


class HostMemoryReader:
    """Local mode without a GPU: the host's RAM as one pseudo-GPU ``host-<node>``.

    total = physical memory, used = memory not available to new allocations, per-process usage =
    the private memory of the processes asked for (the replicas the allocator knows on this node):
    resident anonymous + shared-memory pages (`RssAnon + RssShmem` in /proc/PID/status), not the
    whole resident set. RSS also counts file-backed pages (libtorch, vLLM's and Python's shared
    libraries, ~0.3 GiB per process), which every process mapping them counts again — a replica
    and its engine core count them twice — and which the kernel can drop at will, as `used`
    (total - available) already assumes. Where /proc is not there, RSS is used.
    """

    source = "host-memory"

    def __init__(self, node: str):
        import psutil

        self._psutil = psutil
        self.node = node
        self.uuid = f"host-{node}"

    def read(self, watch_pids: Collection[int] = ()) -> Reading:
        psutil = self._psutil
        memory = psutil.virtual_memory()
        processes = []
        for pid in sorted(set(watch_pids)):
            used = private_memory_bytes(pid)
            if used is None:
                try:
                    used = int(psutil.Process(pid).memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
                    continue
            processes.append(GPUProcess.model_construct(pid=pid, used_bytes=used))
        used = int(memory.total - memory.available)
        gpu = _gpu(self.node, 0, self.uuid, "host memory", int(memory.total), used, processes, True)
        inventory = NodeInventory.model_construct(
            node=self.node, gpus=[gpu], source="host-memory", timestamp=time.time()
        )
        return Reading(inventory, [])

    def close(self) -> None:
        pass


def private_memory_bytes(pid: int) -> int | None:
    """A process's resident anonymous + shared-memory bytes (Linux /proc/PID/status; cheap, no page walk).

    None when /proc has no such file (no such process, or not Linux).
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            text = status.read()
    except OSError:
        return None
    total, found = 0, 0
    for line in text.splitlines():
        if line.startswith((b"RssAnon:", b"RssShmem:")):
            total += int(line.split()[1]) * 1024  # kB
            found += 1
    return total if found else None


def default_node_name() -> str:
    """The Kubernetes node name (downward API `NODE_NAME`) or the host name."""
    return os.environ.get("NODE_NAME") or os.uname().nodename
