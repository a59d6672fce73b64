"""The `vram_allocator` actor on a real multi-node Ray cluster: contract, stale nodes, reclaim of
dead owners (killed actor, lost node), startup locks, and the ledger surviving a restart."""

from __future__ import annotations

import os
import time

import pytest
import ray
from ray.cluster_utils import Cluster
from waiting import wait_until

from vram_scheduler.allocator.actor import AllocatorClient, ReservationError, get_vram_allocator
from vram_scheduler.core.capacity import SleepTerms
from vram_scheduler.core.config import GIB, ConfigError, ModelSpec, PlacementSettings
from vram_scheduler.core.contract import Reservation, VRAMState, WakeOutcome
from vram_scheduler.core.inventory import NodeInventory
from vram_scheduler.core.ray_names import ALLOCATOR_ACTOR, NAMESPACE

pytestmark = pytest.mark.slow


def node_inventory(node: str, *totals_gb: float, used_gb: float = 0, processes=()) -> NodeInventory:
    return NodeInventory.model_validate(node_inventory_data(node, *totals_gb, used_gb=used_gb, processes=processes))


def node_inventory_data(node: str, *totals_gb: float, used_gb: float = 0, processes=()) -> dict:
    """A monitor's inventory as the fields it publishes."""
    return {
        "node": node,
        "gpus": [
            {
                "index": i,
                "uuid": f"GPU-{node}-{i}",
                "name": "NVIDIA L4",
                "total_gb": total,
                "used_gb": used_gb,
                "processes": list(processes),
            }
            for i, total in enumerate(totals_gb)
        ],
    }


def actor_pid(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))


@ray.remote(num_cpus=0)
class Replica:
    """Stands for a serving replica: an actor whose id owns reservations and startup locks."""

    def actor_id(self) -> str:
        return ray.get_runtime_context().get_actor_id()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def reserve(self, replica_id: str, model_id: str, n_bytes: int) -> Reservation:
        allocator = AllocatorClient()
        return allocator.reserve(replica_id, model_id, n_bytes, owner=self.actor_id())

    def start(self, gpu_uuid: str, replica_id: str, hold_s: float) -> tuple[bool, float, float]:
        """Acquire the GPU's startup lock, 'initialise' for hold_s, release; report the window."""
        allocator = AllocatorClient()
        granted = allocator.acquire_startup_lock(gpu_uuid, replica_id, 60)
        began = time.time()
        time.sleep(hold_s)
        ended = time.time()
        allocator.release_startup_lock(gpu_uuid, replica_id)
        return granted, began, ended


def test_contract_round_trip(allocator) -> None:
    assert allocator.ping() == "pong"
    allocator.configure(PlacementSettings.model_validate({"replica_overhead_gb": 2}))
    allocator.update_inventory(node_inventory("gpu-a", 24, 16))
    placed = allocator.reserve("m-0", "m", 10 * GIB)
    assert placed.model_dump() == {
        "replica_id": "m-0",
        "model_id": "m",
        "node": "gpu-a",
        "gpu_uuid": "GPU-gpu-a-1",
        "gpu_index": 1,
        "bytes": 10 * GIB,
        "overhead_bytes": 2 * GIB,  # the cluster's, as the request named none
        "cap_bytes": 12 * GIB,
        "state": "awake",  # a model without `sleep` is reserved awake and never sleeps
        "asleep_level": None,
        "sleep": None,
        "settling": False,  # not between awake and asleep
    }
    assert allocator.reserve("m-0", "m", 10 * GIB) == placed
    with pytest.raises(ReservationError) as caught:
        allocator.reserve("x-0", "x", 40 * GIB)
    assert (
        "model x needs 42.00 GiB per replica (40.00 GiB budget + 2.00 GiB overhead); "
        "the largest free slot is 24.00 GiB on node gpu-a, GPU 0 (short by 18.00 GiB)"
    ) in str(caught.value)
    allocator.attach_process("m-0", 4242)

    state = allocator.vram_state()
    assert VRAMState.model_validate_json(state.model_dump_json()) == state  # JSON all the way down (GET /v1/vram)
    gpu = state.gpus[1]
    assert (gpu.reserved_bytes, gpu.free_bytes) == (12 * GIB, 4 * GIB)  # budget 10 + the overhead 2
    assert gpu.replicas[0].model_dump() | {"owner": None} == {
        "replica_id": "m-0",
        "model_id": "m",
        "bytes": 10 * GIB,
        "overhead_bytes": 2 * GIB,
        "cap_bytes": 12 * GIB,
        "pid": 4242,
        "pids": [4242],
        "used_bytes": None,
        "owner": None,
        "state": "awake",
        "held_bytes": 12 * GIB,  # awake: its whole reservation
        "sleep_bytes": None,
        "asleep_level": None,
        "pinned": True,  # no sleep policy: never sleeps, never evicted
        "last_used_at": None,
        "settling": False,
    }
    result = allocator.plan([ModelSpec(model_id="m", model="org/m", vram_gb=10, replicas=3)])
    assert [r.replica_id for r in result.kept] == ["m-0"]
    assert [r.gpu_uuid for r in result.new] == ["GPU-gpu-a-0", "GPU-gpu-a-0"]
    assert allocator.reservations() == [placed]  # planning reserves nothing
    # a replica's own overhead (the one its model resolved to) is held, and caps it, whatever the cluster's
    own = allocator.reserve("o-0", "o", 4 * GIB, "GPU-gpu-a-0", None, int(2.4 * GIB))
    assert (own.overhead_bytes, own.cap_bytes) == (int(2.4 * GIB), 4 * GIB + int(2.4 * GIB))
    assert allocator.release("o-0") is True

    assert allocator.release("m-0") is True
    assert allocator.release("m-0") is False
    assert allocator.reservations() == []
    settings = allocator.configure(PlacementSettings.model_validate({"replica_overhead_gb": 1, "stale_after_s": 5}))
    assert settings.replica_overhead_gb == 1
    assert allocator.vram_state().settings.stale_after_s == 5


def test_invalid_input_is_refused_with_names(allocator) -> None:
    """A caller outside the type checks (fields as dicts, straight to the actor) gets errors naming each field."""
    actor = allocator.handle
    allocator.update_inventory(node_inventory("gpu-a", 24))
    with pytest.raises(ReservationError, match=r"owner 'someone' is not a Ray actor id"):
        allocator.reserve("m-0", "m", GIB, owner="someone")
    with pytest.raises(ValueError, match=r"models\[0\].vram_gb = -1: Input should be greater than 0"):
        ray.get(actor.plan.remote({"models": [{"model_id": "m", "model": "x", "vram_gb": -1}]}))
    with pytest.raises(ConfigError, match=r"gpus\[0\].total_bytes: required key is missing"):
        ray.get(actor.update_inventory.remote({"node": "n", "gpus": [{"index": 0, "uuid": "u"}]}))
    with pytest.raises(ConfigError, match=r"node 'n' reports GPU GPU-gpu-a-0 that node 'gpu-a' already reports"):
        clash = {"node": "n", "gpus": [{"index": 0, "uuid": "GPU-gpu-a-0", "total_gb": 8}]}
        ray.get(actor.update_inventory.remote(clash))
    with pytest.raises(ConfigError, match=r"configure\(settings\): invalid configuration\n  - stale_after_s = -1"):
        ray.get(actor.configure.remote({"stale_after_s": -1}))
    with pytest.raises(ConfigError, match=r"reserve_many\(requests\): invalid configuration\n  - requests\[0\].bytes"):
        ray.get(actor.reserve_many.remote([{"replica_id": "m-1", "model_id": "m", "bytes": 0}]))
    # The typed client's answers are the models.
    assert isinstance(allocator.reserve("m-0", "m", GIB), Reservation)


def test_sleep_and_wake_cross_the_boundary_as_models(allocator) -> None:
    """reserve with sleep terms, sleep, settle, wake, stop, report_use and in_flight through the typed client:
    each answer is the contract's model (a wake's evictions included); a reserve in a state other than
    awake or stopped is refused, naming the replica and the state."""
    allocator.configure(PlacementSettings.model_validate({"replica_overhead_gb": 1}))
    allocator.update_inventory(node_inventory("gpu-a", 24))
    terms = SleepTerms(after_idle_s=60, level=1, sleep_bytes=GIB, host_bytes=8 * GIB)
    a = allocator.reserve("a-0", "a", 10 * GIB, sleep=terms)
    assert (a.state, a.sleep, a.held_bytes) == ("awake", terms, 11 * GIB)
    allocator.reserve("b-0", "b", 10 * GIB, sleep=terms)
    slept = allocator.sleep("a-0")  # held whole until its engine slept
    assert isinstance(slept, Reservation) and (slept.state, slept.settling, slept.held_bytes) == (
        "asleep",
        True,
        11 * GIB,
    )
    slept = allocator.settle("a-0")
    assert isinstance(slept, Reservation) and (slept.state, slept.asleep_level, slept.held_bytes) == ("asleep", 1, GIB)
    allocator.reserve("c-0", "c", 10 * GIB, sleep=terms)  # in the room a gave back: 11 + 11 + 1 of 24 GiB
    allocator.report_use("b-0", 1)  # b busy: a's wake must evict c, though b was used first
    assert allocator.in_flight() == {"b-0": 1}
    woke = allocator.wake("a-0")  # short of room: c goes to sleep first, a is left as it was
    assert isinstance(woke, WakeOutcome) and woke.reservation.state == "asleep"
    assert [(e.replica_id, e.state, e.level) for e in woke.evicted] == [("c-0", "asleep", 1)]
    allocator.settle("c-0")
    woke = allocator.wake("a-0")
    assert (woke.reservation.state, woke.evicted) == ("awake", [])
    allocator.report_use("b-0", 0)
    assert allocator.in_flight() == {}
    stopped = allocator.stop("c-0")
    assert (stopped.state, stopped.held_bytes) == ("stopped", 0)
    placed_stopped = allocator.reserve("d-0", "d", 10 * GIB, state="stopped", sleep=terms)
    assert (placed_stopped.state, placed_stopped.held_bytes) == ("stopped", 0)
    held = {r.replica_id: r.state for gpu in allocator.vram_state().gpus for r in gpu.replicas}
    assert held == {"a-0": "awake", "b-0": "awake", "c-0": "stopped", "d-0": "stopped"}
    with pytest.raises(ReservationError, match=r"replica e-0: state must be awake or stopped, got 'asleep'"):
        ray.get(allocator.handle.reserve.remote("e-0", "e", GIB, None, None, None, "asleep", terms))


def test_the_typed_clients_read_an_older_actors_plain_answers() -> None:
    """An allocator or controller from before the typed boundary answers dicts (a cluster mid-upgrade):
    the clients read them as the same models, and refuse a shape that is not one, naming the field."""
    from pydantic import ValidationError

    from vram_scheduler.allocator.actor import _checked, _checked_list
    from vram_scheduler.core.contract import DeploymentList
    from vram_scheduler.serving.controller.actor import _typed

    held = {"replica_id": "m-0", "model_id": "m", "node": "n", "gpu_uuid": "u", "gpu_index": 0, "bytes": GIB}
    assert _checked(Reservation, held) == Reservation(**held)
    assert _checked_list(Reservation, [held]) == [Reservation(**held)]
    same = Reservation(**held)
    assert _checked(Reservation, same) is same
    assert _typed(DeploymentList, {"models": []}) == DeploymentList()
    with pytest.raises(ValidationError, match="gpu_index"):
        _checked(Reservation, held | {"gpu_index": -1})


def test_get_vram_allocator_is_race_safe(allocator, forget_allocator) -> None:
    @ray.remote(num_cpus=0)
    def find() -> str:
        return get_vram_allocator()._actor_id.hex()

    forget_allocator()
    ids = ray.get([find.remote() for _ in range(6)])
    assert len(set(ids)) == 1
    assert ray.get_actor(ALLOCATOR_ACTOR, namespace=NAMESPACE)._actor_id.hex() == ids[0]


def test_stale_node_gets_no_new_reservations(allocator) -> None:
    allocator.configure(PlacementSettings.model_validate({"stale_after_s": 2.0, "replica_overhead_gb": 2}))

    def publish_a() -> None:  # only gpu-a keeps publishing
        allocator.update_inventory(node_inventory("gpu-a", 24))

    publish_a()
    allocator.update_inventory(node_inventory("gpu-b", 80))
    kept = allocator.reserve("k-0", "k", 30 * GIB)
    assert kept.node == "gpu-b"
    deadline = time.monotonic() + 2.6
    while time.monotonic() < deadline:
        publish_a()
        time.sleep(0.2)
    publish_a()
    state = allocator.vram_state()
    assert state.stale_nodes == ["gpu-b"]
    assert [(g.node, g.stale) for g in state.gpus] == [("gpu-a", False), ("gpu-b", True)]
    with pytest.raises(ReservationError, match=r"node gpu-b is stale \(last inventory \d+\.\d s ago, limit 2 s\)"):
        allocator.reserve("k-1", "k", GIB, "GPU-gpu-b-0")
    publish_a()
    assert allocator.reserve("k-1", "k", GIB).node == "gpu-a"
    publish_a()
    # 24 − (1 + the 2 GiB overhead) on gpu-a; gpu-b's 48 GiB free are stale and not offered.
    with pytest.raises(ReservationError, match=r"largest free slot is 21\.00 GiB on node gpu-a, GPU 0"):
        allocator.reserve("k-2", "k", 30 * GIB)
    publish_a()
    plan = allocator.plan([ModelSpec.model_validate({"model_id": "k", "model": "x", "vram_gb": 30, "replicas": 2})])
    assert [r.replica_id for r in plan.kept] == ["k-0"]
    assert "stale" not in plan.unplaced[0].reason
    assert plan.unplaced[0].largest_free_gpu == "node gpu-a, GPU 0"
    assert kept in allocator.reservations()
    allocator.update_inventory(node_inventory("gpu-b", 80))  # back: open again
    assert allocator.reserve("k-2", "k", 30 * GIB).node == "gpu-b"


def test_dead_owner_is_reclaimed_within_the_interval(allocator) -> None:
    interval = 0.5
    allocator.configure(PlacementSettings.model_validate({"reclaim_interval_s": interval, "stale_after_s": 600}))
    allocator.update_inventory(node_inventory("gpu-a", 24))
    owner = Replica.options(resources={"node_a": 1}).remote()
    survivor = Replica.options(resources={"node_b": 1}).remote()
    ray.get(owner.reserve.remote("r-0", "m", 4 * GIB))
    ray.get(survivor.reserve.remote("s-0", "m", 4 * GIB))
    allocator.acquire_startup_lock("GPU-gpu-a-0", "r-0")
    waiter = allocator.handle.acquire_startup_lock.remote("GPU-gpu-a-0", "s-0", 30)
    killed_at = time.monotonic()
    ray.kill(owner)
    assert ray.get(waiter, timeout=30) is True  # the dead owner's lock went to the next in line
    wait_until(
        lambda: [r.replica_id for r in allocator.reservations()] == ["s-0"],
        10 * interval + 5,
        "the dead owner's r-0 reclaimed, s-0 alone left",
    )
    print(f"reclaimed {time.monotonic() - killed_at:.2f} s after the kill (interval {interval} s)")
    assert allocator.vram_state().startup_locks == {"GPU-gpu-a-0": "s-0"}
    ray.kill(survivor)


def test_owners_on_a_lost_node_are_reclaimed(cluster: Cluster, allocator) -> None:
    allocator.configure(PlacementSettings.model_validate({"reclaim_interval_s": 0.5, "stale_after_s": 600}))
    allocator.update_inventory(node_inventory("gpu-a", 80))
    spare = cluster.add_node(num_cpus=1, resources={"doomed": 10})
    doomed = [Replica.options(resources={"doomed": 1}).remote() for _ in range(2)]
    for i, replica in enumerate(doomed):
        ray.get(replica.reserve.remote(f"d-{i}", "m", 2 * GIB))
    allocator.reserve("keep-0", "m", 2 * GIB)  # no owner: never reclaimed
    assert len(allocator.reservations()) == 3
    cluster.remove_node(spare)
    wait_until(
        lambda: [r.replica_id for r in allocator.reservations()] == ["keep-0"],
        60,
        "the lost node's d-0 and d-1 reclaimed, keep-0 alone left",
        every_s=0.25,
    )


def test_startup_lock_serialises_two_starters_on_one_gpu(allocator) -> None:
    allocator.update_inventory(node_inventory("gpu-a", 24))
    starters = [Replica.options(resources={name: 1}).remote() for name in ("node_a", "node_b")]
    ray.get([s.actor_id.remote() for s in starters])  # both alive before the race starts
    windows = ray.get([s.start.remote("GPU-gpu-a-0", f"r-{i}", 1.0) for i, s in enumerate(starters)])
    assert all(granted for granted, _, _ in windows)
    (_, first_end), (second_start, _) = sorted((b, e) for _, b, e in windows)
    assert second_start >= first_end, f"initialisations overlapped: {windows}"
    assert allocator.vram_state().startup_locks == {}
    for starter in starters:
        ray.kill(starter)


def test_startup_lock_is_fifo_reentrant_and_times_out(allocator) -> None:
    gpu = "GPU-gpu-a-0"
    assert allocator.acquire_startup_lock(gpu, "a") is True
    assert allocator.acquire_startup_lock(gpu, "a") is True  # already the holder

    def waiters() -> list[str]:  # the queue behind the holder, in the allocator's ledger
        return ray.get(allocator.handle.__ray_call__.remote(lambda self: self._ledger.startup_waiters(gpu)))

    second = allocator.handle.acquire_startup_lock.remote(gpu, "b", 30)
    wait_until(lambda: waiters() == ["b"], 30, "b queued behind a")
    third = allocator.handle.acquire_startup_lock.remote(gpu, "c", 30)
    wait_until(lambda: waiters() == ["b", "c"], 30, lambda: f"c queued behind b (queue {waiters()})")
    assert allocator.acquire_startup_lock(gpu, "impatient", 0.2) is False
    assert allocator.acquire_startup_lock("GPU-other", "d") is True  # other GPUs are independent
    allocator.release_startup_lock(gpu, "c")  # a waiter giving up leaves the queue...
    allocator.release_startup_lock(gpu, "a")
    assert ray.get(second, timeout=10) is True
    assert ray.get(third, timeout=10) is False  # ...and its wait ends with False
    assert allocator.vram_state().startup_locks == {gpu: "b", "GPU-other": "d"}
    allocator.release_startup_lock(gpu, "nobody")  # not the holder: no-op
    allocator.release("b")  # releasing the replica frees its lock too
    assert allocator.vram_state().startup_locks == {"GPU-other": "d"}


def test_ledger_survives_the_actors_restart(allocator) -> None:
    allocator.configure(PlacementSettings.model_validate({"replica_overhead_gb": 0.25}))
    allocator.update_inventory(node_inventory("gpu-a", 24, 48))
    held = [allocator.reserve(f"m-{i}", "m", (i + 1) * GIB) for i in range(5)]
    allocator.attach_process("m-1", 77)
    allocator.acquire_startup_lock(held[0].gpu_uuid, "m-0")
    before = allocator.vram_state()
    pid_before = actor_pid(allocator.handle)
    ray.kill(allocator.handle, no_restart=False)
    wait_until(lambda: actor_pid(allocator.handle) != pid_before, 60, "Ray to restart the allocator in a new process")
    after = allocator.vram_state()
    assert allocator.reservations() == sorted(held, key=lambda r: r.replica_id)
    for key in ("gpus", "startup_locks", "settings", "stale_nodes"):
        assert getattr(after, key) == getattr(before, key), key


def test_a_restarted_allocator_evicts_no_replica_it_has_not_heard_is_idle(allocator) -> None:
    """The busy map is not persisted: after a restart, an awake replica that has not reported since
    counts as busy (a wake must not put a replica with requests in flight to sleep) until it reports
    idle, or until a busy one surely would have reported (`BUSY_UNKNOWN_AFTER_RESTART_S`)."""
    allocator.configure(PlacementSettings.model_validate({"replica_overhead_gb": 1}))
    allocator.update_inventory(node_inventory("gpu-a", 24))
    terms = SleepTerms(after_idle_s=60, level=1, sleep_bytes=GIB, host_bytes=8 * GIB)
    for replica_id in ("a-0", "b-0"):
        allocator.reserve(replica_id, replica_id[0], 10 * GIB, sleep=terms)
    allocator.sleep("b-0")
    allocator.settle("b-0")
    allocator.reserve("c-0", "c", 10 * GIB, sleep=terms)  # in b's room: b's wake must evict a or c
    pid_before = actor_pid(allocator.handle)
    ray.kill(allocator.handle, no_restart=False)
    wait_until(lambda: actor_pid(allocator.handle) != pid_before, 60, "Ray to restart the allocator in a new process")
    with pytest.raises(ReservationError, match=r"with requests in flight: a-0 11\.00 GiB, c-0 11\.00 GiB"):
        allocator.wake("b-0")
    allocator.report_use("c-0", 0)  # c says it is idle: it may go
    woke = allocator.wake("b-0")
    assert [e.replica_id for e in woke.evicted] == ["c-0"]


def test_restarted_allocator_reclaims_without_being_called(allocator) -> None:
    interval = 0.5
    allocator.configure(PlacementSettings.model_validate({"reclaim_interval_s": interval, "stale_after_s": 600}))
    allocator.update_inventory(node_inventory("gpu-a", 24))
    owner = Replica.options(resources={"node_a": 1}).remote()
    ray.get(owner.reserve.remote("r-0", "m", GIB))
    pid_before = actor_pid(allocator.handle)
    ray.kill(allocator.handle, no_restart=False)
    ray.kill(owner)
    from vram_scheduler.allocator.store import LedgerStore

    # Nobody calls the allocator meanwhile: what it persisted in the GCS shows the reclaim.
    wait_until(
        lambda: "r-0" not in LedgerStore(NAMESPACE).load().data.entries,
        60,
        "the restarted allocator to reclaim r-0 of its dead owner on its own",
        every_s=interval,
    )
    assert allocator.reservations() == []  # the first call after the wait sees it freed
    assert actor_pid(allocator.handle) != pid_before


def test_reservations_reach_the_gcs_at_once_inventory_polls_at_most_every_interval(allocator) -> None:
    """Monitors republish every poll, so the allocator writes inventory-only changes to the GCS at
    most every INVENTORY_PERSIST_INTERVAL_S (a restarted allocator relearns them within a poll);
    a reservation is written at once, with the inventory current at that moment."""
    from vram_scheduler.allocator.actor import INVENTORY_PERSIST_INTERVAL_S
    from vram_scheduler.allocator.store import LedgerStore

    def persisted_used_gb() -> float:
        ledger = LedgerStore(NAMESPACE).load()  # what a restarted allocator would load
        return ledger.data.nodes["gpu-a"].inventory.gpus[0].used_bytes / GIB

    allocator.update_inventory(node_inventory("gpu-a", 24, used_gb=1))
    allocator.reserve("p-0", "m", GIB)  # written at once
    written = time.monotonic()
    assert persisted_used_gb() == 1
    for used in (2, 3, 4):
        allocator.update_inventory(node_inventory("gpu-a", 24, used_gb=used))
    if time.monotonic() - written < INVENTORY_PERSIST_INTERVAL_S:
        assert persisted_used_gb() == 1, "inventory-only updates inside the interval stay in memory"
    allocator.release("p-0")  # a reservation change writes everything, now
    assert persisted_used_gb() == 4
