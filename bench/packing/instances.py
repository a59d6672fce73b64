"""Generated packing instances: heterogeneous clusters and model mixes, reproducible from a seed.

Clusters mix 8–80 GiB GPUs, 1–8 GPUs per node; most nodes hold one GPU type, some mix types (as
a workstation or an upgraded server does); some GPUs carry memory used by other processes.
Model mixes ask for 0.5–30 GiB per replica, and the total demand ranges from well under to well
over the cluster's free memory, so both fragmentation and shortage are exercised.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vram_scheduler.core import capacity
from vram_scheduler.core.config import GIB, ModelSpec, PlacementSettings, gib_to_bytes
from vram_scheduler.core.inventory import Inventory

GPU_TYPES = [
    ("NVIDIA RTX 4060", 8),
    ("NVIDIA RTX 3060", 12),
    ("NVIDIA RTX A4000", 16),
    ("NVIDIA RTX 4090", 24),
    ("NVIDIA A100 40GB", 40),
    ("NVIDIA L40S", 48),
    ("NVIDIA H100 80GB", 80),
]
# Part of each generated instance, fixed rather than the product default (0.75 GiB) so the suite
# and bench/results/packing.json stay comparable when the default changes.
OVERHEAD_GB = 0.5


@dataclass
class Instance:
    name: str
    inventory: Inventory
    models: list[ModelSpec]
    settings: PlacementSettings
    load: float  # requested VRAM (with overhead) / free VRAM of the cluster

    @property
    def overhead(self) -> int:
        return capacity.placement_overhead_bytes(self.settings)

    def need(self, model: ModelSpec) -> int:
        return capacity.reservation_bytes(model.vram_bytes, self.overhead)

    @property
    def gpus(self) -> int:
        return len(self.inventory.gpus)

    @property
    def replicas(self) -> int:
        return sum(m.replicas for m in self.models)


def _cluster(rng: random.Random, nodes: int, name: str) -> Inventory:
    data = []
    for n in range(nodes):
        count = rng.randint(1, 8)
        mixed = rng.random() < 0.3
        base = rng.choice(GPU_TYPES)
        gpus = []
        for index in range(count):
            gpu_name, total_gb = rng.choice(GPU_TYPES) if mixed else base
            used = 0
            if rng.random() < 0.3:  # another workload (or a display) already holds some memory
                used = gib_to_bytes(round(total_gb * rng.uniform(0.02, 0.35), 2))
            gpus.append(
                {
                    "index": index,
                    "uuid": f"GPU-{name}-{n}-{index}",
                    "name": gpu_name,
                    "total_bytes": gib_to_bytes(total_gb),
                    "used_bytes": used,
                }
            )
        data.append({"node": f"node-{n}", "gpus": gpus})
    return Inventory.model_validate({"nodes": data})


def generate(index: int, seed: int = 2026) -> Instance:
    """Instance number `index` of the suite for `seed` (same numbers → same instance)."""
    rng = random.Random(seed * 10_000 + index)
    name = f"c{index:02d}"
    inventory = _cluster(rng, rng.randint(2, 6), name)
    settings = PlacementSettings(replica_overhead_gb=OVERHEAD_GB)
    free = sum(g.total_bytes - g.used_bytes for g in inventory.gpus)
    largest = max(g.total_bytes - g.used_bytes for g in inventory.gpus) / GIB - OVERHEAD_GB
    load_target = rng.uniform(0.6, 1.5)
    sizes = sorted({round(rng.uniform(0.5, min(30.0, largest)) * 2) / 2 for _ in range(rng.randint(3, 8))})
    sizes = [max(0.5, s) for s in sizes]
    weights = [rng.uniform(0.5, 2) for _ in sizes]
    total_weight = sum(weights)
    models = []
    for number, (size, weight) in enumerate(zip(sizes, weights, strict=True)):
        share = free * load_target * weight / total_weight
        replicas = max(1, min(1024, round(share / gib_to_bytes(size + OVERHEAD_GB))))
        models.append(ModelSpec(model_id=f"m{number}-{size:g}g", model="bench/none", vram_gb=size, replicas=replicas))
    demand = sum(m.replicas * (m.vram_bytes + gib_to_bytes(OVERHEAD_GB)) for m in models)
    return Instance(name=name, inventory=inventory, models=models, settings=settings, load=demand / free)


def large_instance(seed: int = 2026) -> Instance:
    """The timing case: 100 GPUs on 13 nodes and 1,000 replicas of 10 models, nearly all fitting."""
    rng = random.Random(seed)
    data, left, n = [], 100, 0
    while left:
        count = min(8, left)
        gpu_name, total_gb = rng.choice(GPU_TYPES[2:])
        gpus = [
            {"index": i, "uuid": f"GPU-big-{n}-{i}", "name": gpu_name, "total_bytes": gib_to_bytes(total_gb)}
            for i in range(count)
        ]
        data.append({"node": f"node-{n:02d}", "gpus": gpus})
        left, n = left - count, n + 1
    inventory = Inventory.model_validate({"nodes": data})
    sizes = [0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16]
    models = [ModelSpec(model_id=f"m{i}", model="bench/none", vram_gb=s, replicas=100) for i, s in enumerate(sizes)]
    settings = PlacementSettings(replica_overhead_gb=OVERHEAD_GB)
    free = sum(g.total_bytes for g in inventory.gpus)
    demand = sum(m.replicas * (m.vram_bytes + gib_to_bytes(OVERHEAD_GB)) for m in models)
    return Instance(name="large", inventory=inventory, models=models, settings=settings, load=demand / free)
