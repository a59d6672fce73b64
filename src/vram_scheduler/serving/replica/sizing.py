"""Engine sizing from a reservation: how many bytes vLLM may use, never a guessed fraction.

On CUDA, vLLM's `gpu_memory_utilization` is a share of the GPU's *total* memory that bounds what
vLLM itself profiles — weights, peak activations, its CUDA-graph estimate and the KV cache — so
the budget divided by the GPU's total is the share. What vLLM does not count lies outside the
share: the engine process's CUDA context (0.5 GiB, measured on an H200 under MPS) and what its
allocators grow by under load. The model's overhead, held beside the budget, covers those, and the
reservation (budget + overhead, `capacity`) is the hard cap MPS enforces on the engine (see `mps`).
The measurements behind the overheads are in docs/benchmarks.md ("Budgets on a GPU").

A utilization share rather than an explicit `kv_cache_memory_bytes`: with bytes, the engine's
footprint is weights + KV + everything else, and "everything else" (2.4 GiB for a 1.3B model at
`max_model_len` 2048 on the H200) depends on the model and is unknown before vLLM profiles it;
with a share, vLLM measures it and only the unprofiled remainder needs a margin.

On CPU (vLLM's CPU backend, local mode and CI), the reservation is accounted in host memory,
where the monitor measures the private memory of the replica's processes: vLLM takes an explicit
`kv_cache_memory_bytes`, so the KV cache gets the budget minus the weights and the resident
runtime of the replica's processes.

A vision or speech model also holds an encoder cache, a processor cache and its encoder's
activations (`media_budget`): on CPU they come out of the KV cache's share; on CUDA vLLM's
profiling counts what lies on the GPU, and the budget must at least hold the encoder cache.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from ...core import capacity
from ...core.config import format_gib
from ...core.errors import RayVramError
from .media_budget import MediaNeed

MIB = 1024**2
#: What a CPU replica holds besides weights and KV cache: the Python/PyTorch/vLLM runtime of the
#: replica and its engine-core process plus activations, as the host-memory monitor counts it
#: (private memory: RssAnon + RssShmem). Measured with the demo model (values/local.yaml's engine
#: settings): 0.89 GiB at rest, 0.97 GiB after bench/serving's load (200 + 200 requests at
#: concurrency 8, then 100 streamed 64-token answers at 16); 1.25 GiB leaves ~0.28 GiB for growth.
CPU_RUNTIME_BYTES = 1280 * MIB
#: Smallest KV cache worth starting an engine with.
MIN_KV_CACHE_BYTES = 16 * MIB


class EngineBudget(BaseModel):
    """What the replica hands vLLM and PyTorch so the engine stays inside its reservation."""

    device: Literal["cuda", "cpu"]
    budget_bytes: int = Field(gt=0)
    device_total_bytes: int = Field(gt=0)
    weight_bytes: int = Field(ge=0, description="Estimated from the checkpoint files (0 if unknown).")
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    cap_bytes: int | None = Field(
        default=None, description="Hard cap of the engine process on CUDA: the reservation, budget + overhead."
    )
    media: MediaNeed = Field(default_factory=MediaNeed, description="The multimodal part (vision/speech models).")

    def engine_kwargs(self) -> dict[str, float | int]:
        """The vLLM engine arguments this budget sets (the spec's `engine_kwargs` may not)."""
        if self.device == "cuda":
            return {"gpu_memory_utilization": self.gpu_memory_utilization or 0.0}
        return {"kv_cache_memory_bytes": self.kv_cache_memory_bytes or 0}


class BudgetTooSmall(RayVramError, ValueError):
    """The reservation cannot hold the model's weights plus a minimal KV cache."""


def size_engine(
    model_id: str,
    budget_bytes: int,
    device: Literal["cuda", "cpu"],
    device_total_bytes: int,
    weight_bytes: int = 0,
    overhead_bytes: int = 0,
    media: MediaNeed | None = None,
) -> EngineBudget:
    """Engine settings that keep a replica of `model_id` inside `budget_bytes` (+ `overhead_bytes`
    on CUDA: the part of the reservation vLLM does not count), `media` included."""
    media = media or MediaNeed()
    if budget_bytes > device_total_bytes:
        raise BudgetTooSmall(
            f"model {model_id}: budget {format_gib(budget_bytes)} exceeds the device's total "
            f"{format_gib(device_total_bytes)}"
        )
    if device == "cuda":
        share = math.floor(budget_bytes / device_total_bytes * 10_000) / 10_000  # never above the budget
        if weight_bytes + media.encoder_cache_bytes + MIN_KV_CACHE_BYTES > budget_bytes:
            raise BudgetTooSmall(_too_small(model_id, budget_bytes, weight_bytes, 0, media.encoder_cache_bytes))
        return EngineBudget(
            device=device,
            budget_bytes=budget_bytes,
            device_total_bytes=device_total_bytes,
            weight_bytes=weight_bytes,
            gpu_memory_utilization=share,
            cap_bytes=capacity.cap_bytes(budget_bytes, overhead_bytes, device_total_bytes),
            media=media,
        )
    kv_bytes = budget_bytes - weight_bytes - CPU_RUNTIME_BYTES - media.cpu_bytes
    if kv_bytes < MIN_KV_CACHE_BYTES:
        raise BudgetTooSmall(_too_small(model_id, budget_bytes, weight_bytes, CPU_RUNTIME_BYTES, media.cpu_bytes))
    return EngineBudget(
        device=device,
        budget_bytes=budget_bytes,
        device_total_bytes=device_total_bytes,
        weight_bytes=weight_bytes,
        kv_cache_memory_bytes=kv_bytes,
        media=media,
    )


def _too_small(model_id: str, budget: int, weights: int, runtime: int, media: int = 0) -> str:
    need = weights + runtime + media + MIN_KV_CACHE_BYTES
    media_part = f" + image/audio encoder and caches {format_gib(media)}" if media else ""
    fix = "raise vram_gb" + (" or lower media.processor_cache_gb" if media else "")
    return (
        f"model {model_id}: budget {format_gib(budget)} cannot hold weights {format_gib(weights)} + runtime "
        f"{format_gib(runtime)}{media_part} + a minimal KV cache {format_gib(MIN_KV_CACHE_BYTES)} (short by "
        f"{format_gib(need - budget)}); {fix}"
    )
