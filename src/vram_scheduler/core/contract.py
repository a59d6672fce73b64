"""Everything that crosses the serving controller's boundary, defined once.

The controller and its HTTP API write these; the SDK, the CLI, `inference`, the routers (through
the endpoint board) and the monitor's publisher read them. One definition per shape means a field
cannot exist on one side only (the server's per-model status once lacked `router_name`, so alias
lookups never matched).
Readers ignore unknown fields, so an older client still reads a newer controller's answers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .capacity import ReplicaLife, SleepTerms, footprint_bytes
from .config import ModelSpec, PlacementSettings, SleepLevel, StrictModel

#: A replica's state, one record per replica the values ask for: "pending" (no reservation: the
#: planner found no room, `reason` says why), "reserved" (planned, its Serve replica not started),
#: "loading", "ready", "failed" (`error`: the last one). A later state (e.g. asleep) is one more value.
ReplicaPhase = Literal["pending", "reserved", "loading", "ready", "failed"]

#: Whether a model can answer, as routers are told: "serving" (a replica is ready), "loading" (one is
#: starting), "failed" (its replicas failed: `detail` is the last error), "pending" (none placed).
Availability = Literal["serving", "loading", "failed", "pending"]


class WireModel(BaseModel):
    """Base of every wire model: tolerant of fields a newer peer adds."""

    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------- GET /v1/deployments


class ReplicaStatus(WireModel):
    """One replica of a model, its phase and where it landed."""

    replica_id: str
    state: ReplicaPhase
    node: str | None = None
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    bytes: int | None = None
    error: str | None = None
    reason: str | None = Field(default=None, description="Why a pending replica is not placed (the planner's words).")
    since: float | None = Field(default=None, description="Unix time a pending replica was first found without room.")
    sleep: Literal["awake", "asleep", "stopped"] | None = Field(
        default=None,
        description="A placed replica's state in the ledger: awake, asleep (its sleeping footprint) or stopped "
        "(a request starts it); None: not placed.",
    )

    @property
    def where(self) -> str:
        return f"node {self.node}, GPU {self.gpu_index}" if self.node is not None else "not placed"


class ModelEvent(WireModel):
    """Something the controller did to a model, with its reason (placed, pending, moved): the last
    few are kept in the model's record and shown by `ray-vram status`."""

    at: float = Field(description="Unix time.")
    kind: str = Field(description='"placed", "pending" or "moved".')
    message: str


class ResolvedSizes(WireModel):
    """What the controller resolved for a model, once, when it deployed it; its replicas use these."""

    max_model_len: int | None = Field(
        default=None,
        description="The effective max_model_len (None: the model's files are not on the controller's node; "
        "each replica resolves it from its own).",
    )
    budget_bytes: int = Field(description="vram_gb in bytes: the engine's share.")
    overhead_bytes: int = Field(description="The model's overhead, held beside the budget.")
    overhead_from: str = Field(description="Where the overhead came from (measured, setting, weights, default).")
    reservation_bytes: int = Field(description="budget + overhead: what each replica holds and is capped to.")
    weights_bytes: int | None = Field(default=None, description="The weights' size where the controller read it.")


class DeploymentStatus(WireModel):
    """One model as the controller sees it."""

    model_id: str
    model: str
    vram_gb: float
    requested: int | None = Field(default=None, description="Replicas asked for; None means max_replicas.")
    router_name: str | None = Field(default=None, description="The alias the OpenAI router also serves it under.")
    replicas: list[ReplicaStatus] = Field(default_factory=list)
    unplaced: list[str] = Field(
        default_factory=list, description="The pending replicas' reasons (each replica also says its own)."
    )
    endpoint: str | None = Field(default=None, description="The OpenAI base URL (ending in /v1) serving it.")
    events: list[ModelEvent] = Field(default_factory=list, description="The latest placements and their reasons.")
    resolved: ResolvedSizes | None = Field(default=None, description="Sizes resolved at deploy (None: older record).")

    @property
    def ready(self) -> bool:
        return bool(self.replicas) and all(r.state == "ready" for r in self.replicas)

    @property
    def pending(self) -> list[ReplicaStatus]:
        """Replicas the values ask for that hold no reservation (placed when room appears)."""
        return [r for r in self.replicas if r.state == "pending"]

    @property
    def answers(self) -> bool:
        """Whether a request for it can be answered now (a replica is ready)."""
        return any(r.state == "ready" for r in self.replicas)

    def serves(self, name: str) -> bool:
        """Whether requests for `name` (its model id or its alias) reach this model."""
        return name in {self.model_id, self.router_name}


#: The controller's name for the same per-model status.
ModelStatus = DeploymentStatus


class DeploymentList(WireModel):
    """The body of `GET /v1/deployments`."""

    models: list[DeploymentStatus] = Field(default_factory=list)


class ApplyResult(WireModel):
    """What converging to a values file did (`Controller.apply`): models kept as they ran, deployed
    (new or changed), removed, and those with pending replicas and why."""

    kept: list[str] = Field(default_factory=list)
    deployed: list[str] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)
    unplaced: dict[str, list[str]] = Field(default_factory=dict, description="Model id -> the planner's reasons.")


# --------------------------------------------------------------------------- GET /v1/vram


class ReplicaState(WireModel):
    replica_id: str
    model_id: str
    bytes: int = Field(description="Reserved budget (its overhead comes on top).")
    overhead_bytes: int | None = Field(default=None, description="Its overhead (None: an older allocator's record).")
    cap_bytes: int | None = Field(default=None, description="Its engine's hard cap: budget + overhead, ≤ the GPU.")
    pid: int | None = Field(description="Latest attached process id, None before the replica attached one.")
    pids: list[int]
    used_bytes: int | None = Field(description="VRAM the replica's processes use now (inventory); None if unknown.")
    owner: str | None
    state: Literal["awake", "asleep", "stopped"] = Field(
        default="awake", description="awake: holds its reservation; asleep: its sleeping footprint; stopped: nothing."
    )
    held_bytes: int | None = Field(default=None, description="What it holds on its GPU in its state.")
    sleep_bytes: int | None = Field(default=None, description="Its sleeping footprint (None: it never sleeps).")
    asleep_level: int | None = Field(default=None, description="The level it sleeps at (1 or 2), while asleep.")
    settling: bool = Field(
        default=False,
        description="Going to sleep or stopping: it holds its whole reservation until its engine let go.",
    )
    pinned: bool = Field(default=True, description="Never sleeps, never evicted (pinned, or no sleep policy).")
    last_used_at: float | None = Field(default=None, description="When it last served a request, as recorded.")


class GPUState(WireModel):
    node: str
    index: int
    uuid: str
    name: str
    total_bytes: int
    used_bytes: int = Field(description="All memory in use on the GPU (latest inventory).")
    unmanaged_bytes: int = Field(description="Memory used by processes no replica attached.")
    reserved_bytes: int = Field(
        description="What its replicas hold: budget + overhead awake, the sleeping footprint asleep, 0 stopped."
    )
    free_bytes: int = Field(description="Room for new reservations: total − unmanaged − reserved.")
    healthy: bool
    stale: bool
    asleep: int = Field(default=0, description="How many of its replicas sleep (placement.sleep.max_asleep_per_gpu).")
    replicas: list[ReplicaState]


class NodeState(WireModel):
    node: str
    source: str
    gpus: int
    age_s: float = Field(description="Seconds since the node's monitor last showed life (inventory or heartbeat).")
    stale: bool
    level1_host_bytes: int = Field(default=0, description="Host RAM its level-1 sleepers' weights take.")


class VRAMState(WireModel):
    """The allocator's view, per GPU: what `get_vram_state()` returns (as a dict)."""

    timestamp: float
    gpus: list[GPUState]
    nodes: list[NodeState]
    stale_nodes: list[str]
    orphaned: list[ReplicaState] = Field(
        description="Reservations on GPUs missing from the latest inventory of their node."
    )
    startup_locks: dict[str, str] = Field(description="GPU uuid → replica id initialising on it.")
    settings: PlacementSettings


# --------------------------------------------------------------------------- replica → router


class MediaAccepts(WireModel):
    """What a replica's model takes besides text, as the router enforces it (from the model's `media`
    settings and what vLLM says the model supports)."""

    items_per_prompt: dict[str, int] = Field(
        default_factory=dict,
        description='Input kind ("image", "audio") → most items per request; empty: text only.',
    )
    max_item_bytes: int = Field(default=10 * 1024**2, ge=1, description="Largest image or audio file, as sent.")
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    local_media_dir: str | None = Field(default=None, description="Where `file://` URLs may point; None: nowhere.")
    media_domains: list[str] = Field(default_factory=list, description="Hosts http(s) image URLs may name; []: none.")


class ReplicaEndpoint(WireModel):
    """What a replica announces to the router so it can be sent requests."""

    replica_id: str
    model_id: str
    names: list[str]
    url: str
    max_ongoing_requests: int = Field(ge=1)
    max_tokens: int = Field(ge=1, description="Completion length of requests that set none.")
    node: str
    gpu_uuid: str
    gpu_index: int
    bytes: int
    pids: list[int]
    tasks: list[str] = Field(
        default_factory=lambda: ["generate"],
        description='What vLLM serves for the model: "generate" (completions, chat), "transcription" (audio).',
    )
    media: MediaAccepts = Field(default_factory=MediaAccepts)
    state: Literal["awake", "asleep", "stopped"] = Field(
        default="awake",
        description="awake: routable at `url`; asleep or stopped: a router wakes it (its `wake` method) first.",
    )
    app: str | None = Field(default=None, description="The Serve application of its deployment (where to wake it).")


class SleepReport(WireModel):
    """What a replica put to sleep by an operator answers (`ray-vram sleep`, `POST .../sleep`): the
    state it went to (the replica's announcement carries more; readers ignore it)."""

    replica_id: str
    state: ReplicaLife | None = Field(
        default=None, description="asleep or stopped (CPU: the engine stops); None: the replica said nothing."
    )
    node: str | None = None
    gpu_uuid: str | None = None
    pids: list[int] = Field(default_factory=list, description="Its engine's processes (empty: stopped).")


class WakeReport(WireModel):
    """What a replica's `wake` answers (`ray-vram wake`, `POST .../wake`): how long it took and what
    it evicted."""

    replica_id: str
    state: Literal["awake", "asleep", "stopped"]
    seconds: float = Field(ge=0, description="From the call to the engine answering (0: it was awake).")
    cold: bool = Field(default=False, description="The engine was started (stopped before), not woken.")
    evicted: list[str] = Field(default_factory=list, description="Replicas put to sleep or stopped to make room.")


# --------------------------------------------------------------------------- endpoint board → routers


class ModelAvailability(WireModel):
    """Why a declared model may have no ready replica, as the controller last saw it: what a router
    says in its 503 when no replica of the model is registered."""

    state: Availability
    detail: str | None = Field(default=None, description="pending: the planner's reason; failed: the last error.")
    since: float | None = Field(default=None, description="pending: unix time since it has had no room.")


class RoutedModel(WireModel):
    """A configured model as every router knows it before a replica registers: its names tell an
    unknown model (404) from one without a ready replica (503, saying why: `availability`), and
    `max_tokens` is its default length."""

    model_id: str
    names: list[str]
    max_tokens: int = Field(ge=1)
    availability: ModelAvailability | None = Field(
        default=None, description="None: not known yet (loading until a replica registers)."
    )


class EndpointTable(WireModel):
    """Everything a router routes by, as the endpoint board holds it; `version` grows with each change."""

    version: int = Field(ge=0)
    models: list[RoutedModel] = Field(default_factory=list)
    endpoints: list[ReplicaEndpoint] = Field(default_factory=list)


# --------------------------------------------------------------------------- the allocator's calls
# What the `vram_allocator` actor takes and answers (`allocator.AllocatorClient`). These are also
# what the ledger stores and the planner returns, so they are strict: a field one side lacks fails.

#: While it has requests in flight, a replica reports them to the allocator (`report_use`) at least this
#: often; an idle one reports once, when it becomes idle. A restarted allocator, which keeps no
#: busy map, learns every busy replica within this period.
BUSY_REPORT_INTERVAL_S = 5.0

#: A Ray actor id: what an owner must be (`ray.get_runtime_context().get_actor_id()`).
ACTOR_ID_PATTERN = r"^[0-9a-f]{32}$"


class Reservation(StrictModel):
    """VRAM held for one replica on one GPU (the ledger's unit)."""

    replica_id: str
    model_id: str
    node: str
    gpu_uuid: str
    gpu_index: int = Field(ge=0)
    bytes: int = Field(gt=0, description="The replica's budget; its overhead comes on top.")
    overhead_bytes: int | None = Field(
        default=None,
        ge=0,
        description="The model's overhead, held beside the budget (None: a record from before overheads were "
        "per reservation; the cluster's setting applies).",
    )
    cap_bytes: int | None = Field(
        default=None, gt=0, description="The engine's hard cap (MPS): budget + overhead, at most the GPU's total."
    )
    state: ReplicaLife = Field(
        default="awake",
        description="awake: holds budget + overhead; asleep: its sleeping footprint; stopped: nothing (a plan's "
        "replica beyond the room awake starts stopped, and its first request starts it).",
    )
    sleep: SleepTerms | None = Field(
        default=None, description="How it sleeps; None: it never sleeps and is never put to sleep (pinned)."
    )
    asleep_level: SleepLevel | None = Field(default=None, description="The level it sleeps at, while asleep.")
    settling: bool = Field(
        default=False,
        description="On its way to its state (asleep or stopped) while its engine still holds the memory: it "
        "holds its whole reservation until the engine's sleep or stop returned (`settle`, `stop`).",
    )

    @property
    def held_bytes(self) -> int:
        """What it holds on its GPU in its state (`capacity.footprint_bytes`)."""
        overhead = self.overhead_bytes or 0
        return footprint_bytes(self.state, self.bytes, overhead, self.sleep, settling=self.settling)


class Unplaced(StrictModel):
    """Replicas of one model that fit nowhere, and why."""

    model_id: str
    count: int = Field(ge=1, description="How many requested replicas did not fit.")
    need_bytes: int = Field(description="Budget plus the model's overhead.")
    largest_free_bytes: int
    largest_free_gpu: str | None = Field(description="'node N, GPU i' holding the largest free slot.")
    too_big: bool = Field(
        default=False,
        description="A replica is larger than every (matching) GPU of the inventory, empty: it needs a bigger "
        "GPU, not a free one. False: no room now (a release, a scale-down or a joining GPU can make room).",
    )
    largest_gpu: str | None = Field(
        default=None, description="The largest matching GPU: 'NAME, SIZE on node N, GPU i' (None without one)."
    )
    reason: str


class GPUPlan(StrictModel):
    """One GPU after the plan: what it holds and what room is left."""

    node: str
    index: int
    uuid: str
    name: str
    total_bytes: int
    unmanaged_bytes: int
    reserved_bytes: int = Field(description="Budgets plus overheads of every replica on this GPU.")
    free_bytes: int
    replicas: list[str]


class Plan(StrictModel):
    """The result of planning: keep what is placed, add `new`, release `release`."""

    kept: list[Reservation] = Field(default_factory=list)
    new: list[Reservation] = Field(default_factory=list)
    release: list[Reservation] = Field(default_factory=list)
    unplaced: list[Unplaced] = Field(default_factory=list)
    gpus: list[GPUPlan] = Field(default_factory=list)

    @property
    def reservations(self) -> list[Reservation]:
        return self.kept + self.new

    @property
    def complete(self) -> bool:
        return not self.unplaced

    def replicas_of(self, model_id: str) -> list[Reservation]:
        return [r for r in self.reservations if r.model_id == model_id]


class ReserveRequest(StrictModel):
    """One item of `reserve_many`: the arguments of one `reserve` call."""

    replica_id: str = Field(min_length=1)
    model_id: str = Field(min_length=1)
    bytes: int = Field(gt=0, description="The replica's budget; its overhead comes on top.")
    overhead_bytes: int | None = Field(default=None, ge=0, description="The model's overhead; None: the cluster's.")
    gpu_uuid: str | None = None
    owner: str | None = Field(default=None, pattern=ACTOR_ID_PATTERN, description="Ray actor id of the replica.")
    state: ReplicaLife = Field(default="awake", description="awake, or stopped (placed beyond the room awake).")
    sleep: SleepTerms | None = Field(default=None, description="How it sleeps; None: never (pinned).")


class Eviction(StrictModel):
    """A replica a wake puts to sleep or stops: its engine must let go (its reservation settles)
    before the waker takes the room."""

    replica_id: str
    model_id: str
    state: ReplicaLife
    level: SleepLevel | None = None
    freed_bytes: int


class WakeOutcome(StrictModel):
    """What `wake` did: the replica's reservation, whole again (awake); or, when the room was short, the
    replicas it evicted, which still hold their reservations (settling) until their engines let go,
    and the replica's reservation as it was: the waker has them sleep, then asks again."""

    reservation: Reservation
    evicted: list[Eviction] = Field(default_factory=list)


class ReserveOutcome(StrictModel):
    """What `reserve_many` answers per item: the reservation, or why this item was refused."""

    replica_id: str
    reservation: Reservation | None = None
    error: str | None = None


class PlanRequest(StrictModel):
    """`plan`'s arguments: the models to plan and how (see `AllocatorClient.plan`)."""

    models: list[ModelSpec]
    settings: PlacementSettings | None = Field(default=None, description="None: the settings in force.")
    exclude_nodes: list[str] = Field(default_factory=list, description="Nodes that take nothing new.")
    keep_others: bool = Field(
        default=False, description="The models are some of the cluster's: other models' reservations keep their room."
    )
    overheads: dict[str, int] = Field(
        default_factory=dict, description="Model id -> its overhead in bytes, as the caller resolved it."
    )


class LoadReport(StrictModel):
    """What the last load found: where the ledger came from and what replaying it cost."""

    source: Literal["empty", "snapshot", "legacy"] = "empty"
    reservations: int = 0
    journal_writes: int = Field(default=0, description="Deltas replayed on top of the snapshot.")
    bytes_read: int = 0
    stale_keys_deleted: int = Field(default=0, description="Journal keys of an older generation, left by a kill.")
    seconds: float = 0.0


class StoreStats(StrictModel):
    """The store's counters since the actor started."""

    generation: int
    journal_writes: int = Field(description="Deltas in the current generation's journal.")
    journal_bytes: int
    snapshot_bytes: int
    deltas_written: int = 0
    snapshots_written: int = 0
    loaded: LoadReport


class WriterStats(StrictModel):
    """What the writer did since the actor started, and the store's own counters."""

    rounds: int
    writes: int
    failed_writes: int
    store: StoreStats


# --------------------------------------------------------------------------- POST /v1/deployments


class DeployPlan(WireModel):
    """One model's part of the plan a deploy made: its replicas placed, and what did not fit."""

    replicas: list[Reservation] = Field(default_factory=list)
    unplaced: list[Unplaced] = Field(default_factory=list)


class DeployAnswer(WireModel):
    """The body of a successful `POST /v1/deployments` (HTTP 202): the model and where it goes
    (`plan` None: a max_replicas model with no room yet, pending)."""

    model_id: str
    plan: DeployPlan | None = None

    @classmethod
    def of(cls, model_id: str, plan: Plan) -> DeployAnswer:
        mine = [u for u in plan.unplaced if u.model_id == model_id]
        return cls(model_id=model_id, plan=DeployPlan(replicas=plan.replicas_of(model_id), unplaced=mine))
