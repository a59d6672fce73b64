"""The GPU inventory: what each node's monitor publishes and what the planner packs against.

Always per GPU, never summed per node: a 24 GiB replica does not fit on a node of two
16 GiB GPUs, however much "node VRAM" it has.

File format (YAML or JSON; ``ray-vram monitor`` publishes the same shape, and
``--inventory-file`` reads it)::

    nodes:
      - node: gpu-1                 # Kubernetes node / Ray node name
        gpus:
          - index: 0                # CUDA/NVML index on that node
            uuid: GPU-3f1c...       # NVML UUID (placement key)
            name: NVIDIA H100 80GB HBM3
            total_gb: 79.6          # or total_bytes
            used_gb: 0.0            # optional, or used_bytes: all memory in use now
            processes:              # optional: per-process usage (NVML)
              - {pid: 4242, used_bytes: 2147483648}
"""

from __future__ import annotations

import time
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from .config import ConfigError, StrictModel, describe_validation_error, gib_to_bytes


class GPUProcess(StrictModel):
    """One process holding memory on a GPU, as NVML reports it."""

    pid: int = Field(ge=0)
    used_bytes: int = Field(ge=0)


class GPUInfo(StrictModel):
    """One GPU of one node."""

    node: str = Field(default="", description="Filled from the enclosing node entry.")
    index: int = Field(ge=0)
    uuid: str = Field(min_length=1)
    name: str = Field(default="GPU")
    total_bytes: int = Field(gt=0)
    used_bytes: int = Field(default=0, ge=0)
    processes: list[GPUProcess] = Field(default_factory=list)
    healthy: bool = Field(default=True, description="False after an NVML error on this GPU.")

    @model_validator(mode="before")
    @classmethod
    def _accept_gib(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for unit_key, byte_key in (("total_gb", "total_bytes"), ("used_gb", "used_bytes")):
                if unit_key in data:
                    if byte_key in data:
                        raise ValueError(f"give {unit_key} or {byte_key}, not both")
                    value = data.pop(unit_key)
                    if not isinstance(value, int | float) or isinstance(value, bool):
                        raise ValueError(f"{unit_key} must be a number of GiB, got {value!r}")
                    data[byte_key] = gib_to_bytes(value)
        return data

    @model_validator(mode="after")
    def _used_within_total(self) -> GPUInfo:
        if self.used_bytes > self.total_bytes:
            raise ValueError(f"used_bytes {self.used_bytes} exceeds total_bytes {self.total_bytes}")
        return self

    @property
    def free_bytes(self) -> int:
        return self.total_bytes - self.used_bytes

    def unmanaged_bytes(self, managed_pids: AbstractSet[int] = frozenset()) -> int:
        """Memory used by processes ray-vram does not manage (other workloads, display, ...)."""
        managed = sum(p.used_bytes for p in self.processes if p.pid in managed_pids)
        return max(0, self.used_bytes - managed)

    @property
    def label(self) -> str:
        return f"node {self.node}, GPU {self.index}"


class NodeInventory(StrictModel):
    """Every GPU of one node at one moment."""

    node: str = Field(min_length=1)
    gpus: list[GPUInfo] = Field(default_factory=list)
    source: Literal["nvml", "file", "host-memory"] = "file"
    timestamp: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _stamp_node(self) -> NodeInventory:
        for gpu in self.gpus:
            if not gpu.node:
                object.__setattr__(gpu, "node", self.node)
            elif gpu.node != self.node:
                raise ValueError(f"GPU {gpu.index} says node {gpu.node!r} inside node {self.node!r}")
        indexes = [g.index for g in self.gpus]
        if len(set(indexes)) != len(indexes):
            raise ValueError(f"duplicate GPU index on node {self.node!r}: {sorted(indexes)}")
        return self


class Inventory(StrictModel):
    """The cluster's GPUs, node by node."""

    nodes: list[NodeInventory] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Inventory:
        names = [n.node for n in self.nodes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"node listed twice: {', '.join(duplicates)}")
        uuids = [g.uuid for g in self.gpus]
        repeated = sorted({u for u in uuids if uuids.count(u) > 1})
        if repeated:
            raise ValueError(f"GPU uuid listed twice: {', '.join(repeated)}")
        return self

    @property
    def gpus(self) -> list[GPUInfo]:
        return [gpu for node in self.nodes for gpu in node.gpus]

    def gpu(self, uuid: str) -> GPUInfo:
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise KeyError(f"no GPU with uuid {uuid!r} in the inventory")


def parse_inventory(data: Any, source: str = "inventory") -> Inventory:
    """Validate a loaded mapping; raise `ConfigError` naming each bad field."""
    if not isinstance(data, dict):
        raise ConfigError(source, [f"expected a mapping with a `nodes` list, got {type(data).__name__}"])
    try:
        return Inventory.model_validate(data)
    except ValidationError as error:
        raise ConfigError(source, describe_validation_error(error)) from None


def load_inventory(path: str | Path) -> Inventory:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except yaml.YAMLError as error:
        raise ConfigError(str(path), [f"not valid YAML: {error}"]) from None
    return parse_inventory(data, str(path))
