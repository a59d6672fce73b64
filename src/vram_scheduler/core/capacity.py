"""What a replica costs, in one place: its reservation, its hard cap, its overhead, and the verdict
on what it uses. Pure (no Ray, no I/O), so every number the planner, the ledger, the replica, the
monitor, the tables and `ray-vram measure` show comes from the same arithmetic.

- **Budget** (`vram_gb`): what vLLM is given; a CUDA engine runs at the share budget / GPU total.
- **Overhead**: what the engine uses beyond its share and vLLM does not count (its CUDA context,
  allocator growth under load), plus a margin. Per model, first of: the model's own measured
  `overhead_gb`; the cluster's `placement.replica_overhead_gb` when set; derived from the size of
  the model's weights when its files can be read; `DEFAULT_OVERHEAD_GB` when they cannot.
- **Reservation** = budget + overhead: what packing counts, and the MPS hard cap on the engine
  (never above the GPU's total). A replica is *within reservation* while its use is at or under
  it; use above the budget alone is the normal state of a CUDA engine, not a fault.

- **Footprint**: what a replica holds in its state. Awake: its reservation. Asleep: its sleeping
  footprint (the engine's context; its weights went to host RAM at level 1, or were dropped at
  level 2). Stopped: nothing. On CPU (a host-memory pseudo-GPU) vLLM has no sleep mode: a replica
  put to sleep is stopped, so its sleeping footprint is 0.

Where the derived overhead comes from (docs/benchmarks.md "Budgets on a GPU"; H100, vLLM 0.26, replicas sized
by `measure` and share, under MPS; peak under load minus budget): +1.13 to +1.31 GiB for a 1.5B
Qwen2 (2.7 GiB of weights; once +1.69 beside a vision replica), +1.77 to +1.86 GiB for a 7B-class
Llama (10.6 GiB), +1.81 GiB for a 14B-class Llama (20.5 GiB): it grows to 7B class, then levels off.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import GIB, ModelSpec, PlacementSettings, SleepLevel, SleepPolicy, StrictModel, gib_to_bytes

#: Room every overhead leaves above the highest peak over budget measured for its size.
MARGIN_GB = 0.5
#: What vLLM does not count, as a function of the weights' size: base + slope × weights, at most max.
#: Above every measured peak over budget: 1.51 GiB at 2.7 GiB of weights (seen: ≤ 1.31, once 1.69),
#: 1.9 GiB from 9.2 GiB of weights up (seen: ≤ 1.86).
UNCOUNTED_BASE_GB = 1.35
UNCOUNTED_PER_WEIGHT_GB = 0.06
UNCOUNTED_MAX_GB = 1.9
#: The overhead of a model whose size is unknown (its files are not where the planner can read
#: them): the plateau plus the margin, enough for every size measured.
DEFAULT_OVERHEAD_GB = UNCOUNTED_MAX_GB + MARGIN_GB
#: Overheads are derived and recommended in steps of this many GiB (rounded up).
OVERHEAD_STEP_GB = 0.1

#: What a sleeping CUDA engine kept on its GPU (H100, vLLM 0.26, 7B-class Llama, levels 1 and 2 alike).
MEASURED_SLEEP_FOOTPRINT_GB = 1.74
#: The sleeping footprint of a model that states none: the measured one plus the margin, rounded up.
DEFAULT_SLEEP_FOOTPRINT_GB = 2.3

#: A replica's state in the ledger: awake (its whole reservation), asleep (its sleeping footprint),
#: stopped (no engine, nothing held; a wake is a cold start).
ReplicaLife = Literal["awake", "asleep", "stopped"]

OverheadSource = Literal["model", "placement", "weights", "default"]
Verdict = Literal["within reservation", "over reservation"]


class Overhead(BaseModel):
    """A model's overhead and where it came from (what `ray-vram plan` and status show)."""

    model_config = ConfigDict(frozen=True)

    bytes: int = Field(ge=0)
    source: OverheadSource
    weights_bytes: int | None = Field(default=None, description="The weights it was derived from (source weights).")

    def describe(self) -> str:
        if self.source == "model":
            return "measured (the model's overhead_gb)"
        if self.source == "placement":
            return "placement.replica_overhead_gb"
        if self.source == "weights":
            weights = self.weights_bytes or 0
            size = f"{weights / GIB:.2f} GiB" if weights >= GIB else f"{weights / 1024**2:.1f} MiB"
            return f"derived from {size} of weights"
        return "default (model size unknown)"


def round_up_gb(n_bytes: float, step_gb: float = OVERHEAD_STEP_GB) -> float:
    """`n_bytes` in GiB rounded up to a multiple of `step_gb` (at least one step; a byte's rounding
    of an exact multiple does not count as more)."""
    steps = max(1, math.ceil(n_bytes / (step_gb * GIB) - 1e-6))
    return round(steps * step_gb, 3)


def _uncounted_gb(weights_bytes: int) -> float:
    return min(UNCOUNTED_BASE_GB + UNCOUNTED_PER_WEIGHT_GB * max(0, weights_bytes) / GIB, UNCOUNTED_MAX_GB)


def uncounted_bytes(weights_bytes: int) -> int:
    """What a CUDA engine with `weights_bytes` of weights is expected to use beyond its share."""
    return gib_to_bytes(_uncounted_gb(weights_bytes))


def derived_overhead_bytes(weights_bytes: int | None) -> int:
    """The overhead for a model of `weights_bytes` (unknown or 0: `DEFAULT_OVERHEAD_GB`)."""
    if not weights_bytes or weights_bytes <= 0:
        return gib_to_bytes(DEFAULT_OVERHEAD_GB)
    return gib_to_bytes(round_up_gb((_uncounted_gb(weights_bytes) + MARGIN_GB) * GIB))


def placement_overhead_bytes(settings: PlacementSettings) -> int:
    """The overhead of a reservation that names none (an older record, or a caller without a model
    resolution): the cluster's setting, else the default."""
    gb = settings.replica_overhead_gb
    return gib_to_bytes(DEFAULT_OVERHEAD_GB if gb is None else gb)


def resolve_overhead(spec: ModelSpec, settings: PlacementSettings, weights_bytes: int | None = None) -> Overhead:
    """The model's overhead: its own measured `overhead_gb`, else the cluster's
    `placement.replica_overhead_gb` when set, else derived from `weights_bytes`, else the default."""
    if spec.overhead_gb is not None:
        return Overhead(bytes=gib_to_bytes(spec.overhead_gb), source="model")
    if settings.replica_overhead_gb is not None:
        return Overhead(bytes=gib_to_bytes(settings.replica_overhead_gb), source="placement")
    if weights_bytes:
        return Overhead(bytes=derived_overhead_bytes(weights_bytes), source="weights", weights_bytes=weights_bytes)
    return Overhead(bytes=derived_overhead_bytes(None), source="default")


def overhead_stated(spec: ModelSpec, settings: PlacementSettings) -> bool:
    """Whether the configuration states the model's overhead (so its weights need not be read)."""
    return spec.overhead_gb is not None or settings.replica_overhead_gb is not None


def held_overhead(overhead_bytes: int | None, settings: PlacementSettings) -> int:
    """A reservation's overhead: its own, or (a record from before overheads were per reservation)
    the cluster's."""
    return placement_overhead_bytes(settings) if overhead_bytes is None else overhead_bytes


def reservation_bytes(budget_bytes: int, overhead_bytes: int) -> int:
    """What a replica holds on its GPU: budget + overhead."""
    return budget_bytes + overhead_bytes


def reservation_gb(vram_gb: float, overhead_gb: float) -> float:
    """`reservation_bytes` in the GiB of a values file."""
    return round(vram_gb + overhead_gb, 3)


def cap_bytes(budget_bytes: int, overhead_bytes: int, device_total_bytes: int) -> int:
    """The hard cap (MPS) of a replica's engine: its reservation, never above the device."""
    return min(reservation_bytes(budget_bytes, overhead_bytes), device_total_bytes)


def budget_room(free_bytes: int, overhead_bytes: int) -> int:
    """The largest budget a slot of `free_bytes` holds with the overhead on top (may be ≤ 0)."""
    return free_bytes - overhead_bytes


def verdict(used_bytes: int, budget_bytes: int, overhead_bytes: int) -> Verdict:
    """Within reservation while use is at or under budget + overhead; over beyond it."""
    over = used_bytes > reservation_bytes(budget_bytes, overhead_bytes)
    return "over reservation" if over else "within reservation"


def headroom_bytes(used_bytes: int, budget_bytes: int, overhead_bytes: int) -> int:
    """What is left of the reservation (negative: over it by that much)."""
    return reservation_bytes(budget_bytes, overhead_bytes) - used_bytes


def recommend_overhead_gb(peak_over_budget_bytes: int) -> float:
    """The `overhead_gb` covering a measured peak over the budget with `MARGIN_GB` to spare."""
    return round_up_gb(max(0, peak_over_budget_bytes) + gib_to_bytes(MARGIN_GB))


class SleepTerms(StrictModel):
    """How a replica of a model that sleeps sleeps: what it keeps on its GPU and in host RAM, and
    when. A replica without terms never sleeps and is never put to sleep (pinned, or no policy)."""

    model_config = ConfigDict(frozen=True)

    after_idle_s: float = Field(gt=0)
    level: SleepLevel = 1
    sleep_bytes: int = Field(ge=0, description="What it keeps on its GPU asleep (0 on CPU: its engine stops).")
    host_bytes: int = Field(ge=0, description="Host RAM its weights take while asleep at level 1.")


def sleeping_footprint_bytes(
    policy: SleepPolicy, budget_bytes: int, overhead_bytes: int, *, host_memory: bool = False
) -> int:
    """What a replica keeps on its GPU asleep: the policy's measured `footprint_gb`, else
    `DEFAULT_SLEEP_FOOTPRINT_GB`, never more than its reservation; 0 on a host-memory pseudo-GPU,
    where sleeping stops the engine."""
    if host_memory:
        return 0
    gb = DEFAULT_SLEEP_FOOTPRINT_GB if policy.footprint_gb is None else policy.footprint_gb
    return min(gib_to_bytes(gb), reservation_bytes(budget_bytes, overhead_bytes))


def level1_host_bytes(budget_bytes: int, weights_bytes: int | None) -> int:
    """Host RAM a level-1 sleeper's weights take: their size when known, else its budget (which holds them)."""
    return weights_bytes if weights_bytes and weights_bytes > 0 else budget_bytes


def sleep_terms(
    policy: SleepPolicy | None,
    budget_bytes: int,
    overhead_bytes: int,
    *,
    host_memory: bool = False,
    weights_bytes: int | None = None,
) -> SleepTerms | None:
    """The terms of a model's replica on one GPU (None: it never sleeps)."""
    if policy is None:
        return None
    return SleepTerms(
        after_idle_s=policy.after_idle_s,
        level=policy.level,
        sleep_bytes=sleeping_footprint_bytes(policy, budget_bytes, overhead_bytes, host_memory=host_memory),
        host_bytes=0 if host_memory else level1_host_bytes(budget_bytes, weights_bytes),
    )


def footprint_bytes(
    state: ReplicaLife, budget_bytes: int, overhead_bytes: int, terms: SleepTerms | None, *, settling: bool = False
) -> int:
    """What a replica in `state` holds on its GPU: its reservation awake, its sleeping footprint
    asleep, nothing stopped. `settling`: on its way to `state` while its engine still holds the memory
    (its sleep or stop has not returned yet): its whole reservation, until the engine let go."""
    if state == "awake" or settling:
        return reservation_bytes(budget_bytes, overhead_bytes)
    if state == "asleep":
        return terms.sleep_bytes if terms is not None else reservation_bytes(budget_bytes, overhead_bytes)
    return 0


def wake_need_bytes(state: ReplicaLife, budget_bytes: int, overhead_bytes: int, terms: SleepTerms | None) -> int:
    """What a wake must find free beyond what the replica already holds."""
    return reservation_bytes(budget_bytes, overhead_bytes) - footprint_bytes(state, budget_bytes, overhead_bytes, terms)
