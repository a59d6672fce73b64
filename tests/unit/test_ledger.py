"""The ledger's rules without Ray: capacity, idempotence, stale nodes, managed processes, persistence."""

from __future__ import annotations

import pytest

from vram_scheduler.core.config import GIB, PlacementSettings
from vram_scheduler.core.contract import VRAMState
from vram_scheduler.core.inventory import NodeInventory
from vram_scheduler.core.ledger import (
    Ledger,
    LedgerDelta,
    LedgerSnapshot,
    ReservationError,
    ReserveRequest,
    StartupLockHolder,
    models_from_dicts,
)

T0 = 1_000.0


def node(name: str, *gpus: tuple[int, float, float], processes: dict[int, list[dict[str, int]]] | None = None):
    """A node inventory from (index, total GiB, used GiB) triples."""
    return NodeInventory.model_validate(
        {
            "node": name,
            "gpus": [
                {
                    "index": i,
                    "uuid": f"{name}-{i}",
                    "name": "NVIDIA L4",
                    "total_gb": total,
                    "used_gb": used,
                    "processes": (processes or {}).get(i, []),
                }
                for i, total, used in gpus
            ],
        }
    )


@pytest.fixture
def ledger() -> Ledger:
    led = Ledger()
    led.configure(PlacementSettings(stale_after_s=10, replica_overhead_gb=2))  # 2 GiB per replica
    led.update_inventory(node("a", (0, 24, 0), (1, 16, 0)), T0)
    led.update_inventory(node("b", (0, 12, 2)), T0)
    return led


def test_reserve_picks_the_fullest_gpu_that_holds_it(ledger: Ledger) -> None:
    small, changed = ledger.reserve("s-0", "s", 8 * GIB, T0)
    assert changed and (small.node, small.gpu_index) == ("b", 0)  # 10 GiB free: the tightest fit
    medium, _ = ledger.reserve("m-0", "m", 12 * GIB, T0)
    assert medium.gpu_uuid == "a-1"
    big, _ = ledger.reserve("b-0", "b", 20 * GIB, T0)
    assert big.gpu_uuid == "a-0"


def test_reserve_is_idempotent_and_updates_the_owner(ledger: Ledger) -> None:
    first, _ = ledger.reserve("r-0", "m", 4 * GIB, T0)
    again, changed = ledger.reserve("r-0", "m", 4 * GIB, T0 + 1)
    assert again == first and not changed
    owner = "ab" * 16
    _, changed = ledger.reserve("r-0", "m", 4 * GIB, T0 + 1, owner=owner)
    assert changed and ledger.entry("r-0").owner == owner
    assert len(ledger.reservations()) == 1


def test_same_replica_with_other_model_or_size_is_refused(ledger: Ledger) -> None:
    ledger.reserve("r-0", "m", 4 * GIB, T0)
    with pytest.raises(ReservationError, match=r"replica r-0 already holds a reservation for model m \(4.00 GiB"):
        ledger.reserve("r-0", "m", 5 * GIB, T0)
    with pytest.raises(ReservationError, match=r"already reserved on node b, GPU 0 \(b-0\), not on a-0"):
        ledger.reserve("r-0", "m", 4 * GIB, T0, gpu_uuid="a-0")


def test_refusal_names_model_need_largest_slot_and_where(ledger: Ledger) -> None:
    with pytest.raises(ReservationError) as caught:
        ledger.reserve("x-0", "x", 30 * GIB, T0)
    assert str(caught.value) == (
        "model x needs 32.00 GiB per replica (30.00 GiB budget + 2.00 GiB overhead); "
        "the largest free slot is 24.00 GiB on node a, GPU 0 (short by 8.00 GiB)"
    )


def test_explicit_gpu_checks_room_health_and_existence(ledger: Ledger) -> None:
    placed, _ = ledger.reserve("p-0", "p", 10 * GIB, T0, gpu_uuid="a-0")
    assert placed.gpu_uuid == "a-0"
    with pytest.raises(ReservationError) as caught:
        ledger.reserve("p-1", "p", 14 * GIB, T0, gpu_uuid="a-0")
    assert str(caught.value) == (
        "model p needs 16.00 GiB per replica (14.00 GiB budget + 2.00 GiB overhead) on node a, GPU 0, "
        "which has 12.00 GiB free (short by 4.00 GiB); the largest free slot is 16.00 GiB on node a, GPU 1"
    )
    with pytest.raises(ReservationError, match=r"no GPU with uuid 'nope' in the inventory \(known: a-0, a-1, b-0\)"):
        ledger.reserve("p-1", "p", GIB, T0, gpu_uuid="nope")
    sick = node("c", (0, 80, 0))
    sick.gpus[0].healthy = False
    ledger.update_inventory(sick, T0)
    with pytest.raises(ReservationError, match=r"node c, GPU 0 \(c-0\) is unhealthy"):
        ledger.reserve("p-1", "p", GIB, T0, gpu_uuid="c-0")


def test_never_over_a_gpu_total(ledger: Ledger) -> None:
    placed = 0
    for i in range(100):
        try:
            ledger.reserve(f"r-{i}", "r", 2 * GIB, T0)
            placed += 1
        except ReservationError:
            break
    # 2 + 2 = 4 GiB each: 24 → 6 and 16 → 4 filled to the byte, 10 free on b → 2 (2 GiB left)
    assert placed == 12
    assert sorted(ledger.free_bytes().values()) == [0, 0, 2 * GIB]


def test_stale_node_gets_nothing_new_but_keeps_what_it_has(ledger: Ledger) -> None:
    held, _ = ledger.reserve("k-0", "k", 2 * GIB, T0, gpu_uuid="b-0")
    later = T0 + 11
    ledger.update_inventory(node("a", (0, 24, 0), (1, 16, 0)), later)  # only a keeps reporting
    assert ledger.stale_nodes(later) == {"b"}
    with pytest.raises(ReservationError, match=r"node b is stale \(last inventory 11.0 s ago, limit 10 s\)"):
        ledger.reserve("k-1", "k", GIB, later, gpu_uuid="b-0")
    chosen, _ = ledger.reserve("k-1", "k", GIB, later)
    assert chosen.node == "a"
    assert held in ledger.reservations()
    state = ledger.state(later)
    assert state.stale_nodes == ["b"]
    assert [g.stale for g in state.gpus] == [False, False, True]
    assert ledger.plan(models_from_dicts([{"model_id": "k", "model": "x", "vram_gb": 2}]), later).kept[0] == held


def test_no_open_gpu_is_explained(ledger: Ledger) -> None:
    with pytest.raises(ReservationError, match=r"no GPU takes new reservations .* stale: a, b"):
        ledger.reserve("z-0", "z", GIB, T0 + 60)
    with pytest.raises(ReservationError, match="the inventory has no GPUs yet"):
        Ledger().reserve("z-0", "z", GIB, T0)


def test_release_is_idempotent_and_frees_the_startup_lock(ledger: Ledger) -> None:
    ledger.reserve("r-0", "m", GIB, T0)
    ledger.data.startup_locks["b-0"] = StartupLockHolder(replica_id="r-0", since=T0)
    assert ledger.release("r-0") is True
    assert ledger.release("r-0") is False
    assert ledger.reservations() == [] and ledger.data.startup_locks == {}


def test_attached_processes_are_managed_not_unmanaged() -> None:
    led = Ledger()
    led.configure(PlacementSettings(replica_overhead_gb=2))
    led.update_inventory(node("n", (0, 20, 0)), T0)
    led.reserve("r-0", "m", 8 * GIB, T0)
    used = [{"pid": 41, "used_bytes": 7 * GIB}, {"pid": 99, "used_bytes": 3 * GIB}]
    led.update_inventory(node("n", (0, 20, 10), processes={0: used}), T0 + 1)
    before = led.state(T0 + 1).gpus[0]
    assert before.unmanaged_bytes == 10 * GIB and before.replicas[0].used_bytes is None
    led.attach_process("r-0", 41)
    assert led.attach_process("r-0", 41) is False
    gpu = led.state(T0 + 1).gpus[0]
    assert gpu.unmanaged_bytes == 3 * GIB
    assert gpu.free_bytes == 20 * GIB - 3 * GIB - 10 * GIB  # budget 8 + the overhead 2
    (replica,) = gpu.replicas
    assert (replica.pid, replica.used_bytes) == (41, 7 * GIB)
    with pytest.raises(ReservationError, match=r"attach pid 5: replica 'ghost' holds no reservation \(held: r-0\)"):
        led.attach_process("ghost", 5)


def test_a_nodes_state_holds_its_gpus_only(ledger: Ledger) -> None:
    """What a monitor reads each poll: its node's GPUs and replicas, the same as in the whole state."""
    ledger.reserve("a-0", "m", GIB, T0, gpu_uuid="a-1")
    ledger.reserve("b-0", "m", GIB, T0, gpu_uuid="b-0")
    whole = ledger.state(T0)
    mine = ledger.state(T0, node="a")
    assert [g.uuid for g in mine.gpus] == ["a-0", "a-1"]
    assert mine.gpus == [g for g in whole.gpus if g.node == "a"]
    assert [n.node for n in mine.nodes] == ["a"] and mine.orphaned == []
    assert [r.replica_id for r in mine.gpus[1].replicas] == ["a-0"]
    # What the actor returns is the model itself, and it crosses JSON (GET /v1/vram) unchanged.
    ledger.attach_process("a-0", 7)
    for state in (ledger.state(T0), ledger.state(T0, node="b")):
        assert VRAMState.model_validate_json(state.model_dump_json()) == state


def test_an_update_says_whether_the_gpus_changed_or_only_their_usage(ledger: Ledger) -> None:
    """The allocator writes a change of GPUs at once and a change of usage lazily."""
    assert ledger.update_inventory(node("a", (0, 24, 5), (1, 16, 0)), T0 + 1) is False  # usage only
    assert ledger.update_inventory(node("a", (0, 24, 0)), T0 + 2) is True  # a GPU gone
    assert ledger.update_inventory(node("a", (0, 24, 0), (1, 16, 0)), T0 + 3) is True  # back
    assert ledger.update_inventory(node("a", (0, 24, 0), (1, 20, 0)), T0 + 4) is True  # resized
    assert ledger.update_inventory(node("c", (0, 8, 0)), T0 + 5) is True  # a new node


def test_gpu_uuid_reported_by_two_nodes_is_refused(ledger: Ledger) -> None:
    clash = NodeInventory.model_validate({"node": "c", "gpus": [{"index": 0, "uuid": "a-1", "total_gb": 8}]})
    with pytest.raises(ValueError, match="node 'c' reports GPU a-1 that node 'a' already reports"):
        ledger.update_inventory(clash, T0)


def test_gpu_of_a_stale_node_moves_to_the_node_now_reporting_it(ledger: Ledger) -> None:
    held, _ = ledger.reserve("h-0", "h", GIB, T0, gpu_uuid="b-0")
    later = T0 + 11  # b is stale now
    renamed = NodeInventory.model_validate({"node": "b2", "gpus": [{"index": 0, "uuid": "b-0", "total_gb": 12}]})
    ledger.update_inventory(renamed, later)
    assert sorted(ledger.data.nodes) == ["a", "b2"]
    (gpu,) = [g for g in ledger.state(later).gpus if g.uuid == "b-0"]
    assert gpu.node == "b2" and [r.replica_id for r in gpu.replicas] == [held.replica_id]
    assert ledger.entry("h-0").reservation.node == "b2"  # the reservation follows its GPU
    with pytest.raises(ValueError, match="node 'a2' reports GPU a-0 that node 'a' already reports"):
        ledger.update_inventory(
            NodeInventory.model_validate({"node": "a2", "gpus": [{"index": 0, "uuid": "a-0", "total_gb": 24}]}), T0 + 1
        )


def test_a_moved_gpus_reservations_are_in_the_next_delta(ledger: Ledger) -> None:
    """Moving a GPU rewrites where its reservations are: the journal must carry those entries too."""
    ledger.reserve("h-0", "h", GIB, T0, gpu_uuid="b-0")
    ledger.reserve("h-1", "h", GIB, T0, gpu_uuid="b-0")
    ledger.reserve("s-0", "s", GIB, T0, gpu_uuid="a-0")
    rebuilt = LedgerSnapshot()
    ledger.take_delta().apply_to(rebuilt)
    renamed = NodeInventory.model_validate({"node": "b2", "gpus": [{"index": 3, "uuid": "b-0", "total_gb": 12}]})
    ledger.update_inventory(renamed, T0 + 11)  # b went stale: its GPU moves to b2
    delta = ledger.take_delta()
    assert sorted(delta.entries) == ["h-0", "h-1"] and sorted(delta.nodes) == ["b", "b2"]
    assert delta.nodes["b"] is None  # b reported nothing else: gone
    LedgerDelta.model_validate_json(delta.model_dump_json()).apply_to(rebuilt)
    assert rebuilt == ledger.data
    assert {(r.node, r.gpu_index) for r in ledger.reservations() if r.model_id == "h"} == {("b2", 3)}
    assert ledger.take_delta() is None  # nothing changed since


def test_reserved_totals_follow_every_change(ledger: Ledger) -> None:
    """The per-GPU totals are kept as changes happen, never summed again: check them against a sum."""
    for i in range(6):
        ledger.reserve(f"t-{i}", "t", (i + 1) * GIB // 2, T0)
    ledger.attach_process("t-1", 7)
    ledger.release("t-2")
    ledger.configure(PlacementSettings(stale_after_s=10, replica_overhead_gb=1))
    ledger.reserve("t-9", "t", GIB, T0)  # after the change: 1 GiB overhead; the others keep the 2 they hold
    summed: dict[str, int] = {}
    for r in ledger.reservations():
        assert r.overhead_bytes == (GIB if r.replica_id == "t-9" else 2 * GIB)
        summed[r.gpu_uuid] = summed.get(r.gpu_uuid, 0) + r.bytes + r.overhead_bytes
    assert ledger.reserved_bytes() == summed
    assert ledger.managed_pids() == {7}
    restored = Ledger.loads(ledger.dumps())
    assert restored.reserved_bytes() == summed and restored.managed_pids() == {7}
    ledger.release("t-1")
    assert ledger.managed_pids() == frozenset()


def test_a_batch_places_what_fits_and_names_what_does_not(ledger: Ledger) -> None:
    requests = [
        ReserveRequest(replica_id="b-0", model_id="m", bytes=4 * GIB),
        ReserveRequest(replica_id="b-1", model_id="m", bytes=40 * GIB),  # fits nowhere
        ReserveRequest(replica_id="b-2", model_id="m", bytes=GIB, gpu_uuid="b-0"),
        ReserveRequest(replica_id="b-0", model_id="m", bytes=4 * GIB),  # a repeat: the same answer
    ]
    outcomes, changed = ledger.reserve_many(requests, T0)
    assert changed
    assert [o.replica_id for o in outcomes] == ["b-0", "b-1", "b-2", "b-0"]
    assert outcomes[0].reservation == outcomes[3].reservation and outcomes[0].error is None
    assert outcomes[1].reservation is None
    assert outcomes[1].error.startswith("model m needs 42.00 GiB per replica (40.00 GiB budget + 2.00 GiB overhead)")
    assert outcomes[2].reservation.gpu_uuid == "b-0"
    assert sorted(r.replica_id for r in ledger.reservations()) == ["b-0", "b-2"]
    assert ledger.release_many(["b-0", "ghost", "b-0"], T0) == [True, False, False]
    assert ledger.reserve_many(requests[3:], T0 + 1)[1] is True  # released, so placed anew


def test_gpu_gone_from_inventory_leaves_an_orphaned_reservation(ledger: Ledger) -> None:
    ledger.reserve("o-0", "o", GIB, T0, gpu_uuid="a-1")
    ledger.update_inventory(node("a", (0, 24, 0)), T0 + 1)
    state = ledger.state(T0 + 1)
    assert [r.replica_id for r in state.orphaned] == ["o-0"]


def test_snapshot_round_trip_restores_everything(ledger: Ledger) -> None:
    ledger.reserve("r-0", "m", GIB, T0, owner="cd" * 16)
    ledger.reserve("r-1", "m", 2 * GIB, T0)
    ledger.attach_process("r-0", 12)
    ledger.data.startup_locks["a-0"] = StartupLockHolder(replica_id="r-1", since=T0)
    restored = Ledger.loads(ledger.dumps())
    assert restored.data == ledger.data
    assert restored.state(T0 + 1) == ledger.state(T0 + 1)
    assert LedgerSnapshot.model_validate_json(ledger.dumps()).version == 1


def test_plan_through_the_ledger_keeps_reservations_and_names_errors(ledger: Ledger) -> None:
    ledger.reserve("m-0", "m", 4 * GIB, T0)
    result = ledger.plan(models_from_dicts([{"model_id": "m", "model": "x", "vram_gb": 4, "replicas": 2}]), T0)
    assert [r.replica_id for r in result.kept] == ["m-0"] and [r.replica_id for r in result.new] == ["m-1"]
    with pytest.raises(ValueError, match=r"models\[0\].vram_gb = 0: Input should be greater than 0"):
        models_from_dicts([{"model_id": "m", "model": "x", "vram_gb": 0}])


def test_only_real_gpus_serialise_replica_starts(ledger: Ledger) -> None:
    host = NodeInventory.model_validate(
        {"node": "laptop", "source": "host-memory", "gpus": [{"index": 0, "uuid": "host-laptop", "total_gb": 16}]}
    )
    ledger.update_inventory(host, T0)
    assert ledger.serialises_startup("a-0")  # CUDA: engines profiling one GPU together mis-size each other
    assert not ledger.serialises_startup("host-laptop")  # CPU engines are sized in bytes: start in parallel
    assert ledger.serialises_startup("GPU-unknown")


# -- startup locks: one replica initialising per GPU, the others in FIFO order ------------------


def test_startup_lock_is_fifo_and_reentrant(ledger: Ledger) -> None:
    assert ledger.acquire_startup_lock("a-0", "r-0", T0) == (True, True)
    assert ledger.acquire_startup_lock("a-0", "r-0", T0 + 1) == (True, False)  # the holder asking again
    assert ledger.acquire_startup_lock("a-0", "r-1", T0) == (False, False)
    assert ledger.acquire_startup_lock("a-0", "r-2", T0) == (False, False)
    assert ledger.acquire_startup_lock("a-0", "r-1", T0) == (False, False)  # keeps its place
    assert ledger.acquire_startup_lock("a-1", "r-3", T0) == (True, True)  # other GPUs are independent
    assert ledger.startup_waiters("a-0") == ["r-1", "r-2"]
    assert ledger.release_startup_lock("a-0", "r-0", T0 + 2) is True
    holder = ledger.startup_lock_holder("a-0")
    assert holder is not None and (holder.replica_id, holder.since) == ("r-1", T0 + 2)
    assert ledger.startup_waiters("a-0") == ["r-2"]
    assert ledger.state(T0 + 2).startup_locks == {"a-0": "r-1", "a-1": "r-3"}


def test_a_waiter_leaving_keeps_the_rest_in_order(ledger: Ledger) -> None:
    for replica_id in ("r-0", "r-1", "r-2", "r-3"):
        ledger.acquire_startup_lock("a-0", replica_id, T0)
    assert ledger.release_startup_lock("a-0", "r-2", T0) is False  # not the holder: leaves the queue
    assert ledger.drop_startup_waiter("a-0", "r-1") is True  # timed out
    assert ledger.drop_startup_waiter("a-0", "r-1") is False
    assert ledger.release_startup_lock("a-0", "nobody", T0) is False
    assert ledger.startup_waiters("a-0") == ["r-3"]
    ledger.release_startup_lock("a-0", "r-0", T0)
    assert ledger.holds_startup_lock("a-0", "r-3") and ledger.startup_waiters("a-0") == []


def test_releasing_a_replica_hands_its_lock_on_and_leaves_every_queue(ledger: Ledger) -> None:
    ledger.acquire_startup_lock("a-0", "r-0", T0)
    ledger.acquire_startup_lock("a-1", "r-1", T0)
    ledger.acquire_startup_lock("a-0", "r-1", T0)
    ledger.acquire_startup_lock("a-1", "r-0", T0)
    ledger.acquire_startup_lock("a-0", "r-2", T0)
    assert ledger.release("r-0", T0 + 1) is True
    # r-1 was first in line for a-0; r-0 left a-1's queue
    assert ledger.state(T0 + 1).startup_locks == {"a-0": "r-1", "a-1": "r-1"}
    assert ledger.startup_waiters("a-0") == ["r-2"] and ledger.startup_waiters("a-1") == []
    ledger.acquire_startup_lock("a-0", "r-3", T0)
    assert ledger.release("r-3") is False  # only queued: nothing persisted changes
    assert ledger.startup_waiters("a-0") == ["r-2"]


def test_a_dead_owners_lock_goes_to_the_next_waiter(ledger: Ledger) -> None:
    dead, alive = "de" * 16, "a1" * 16
    ledger.reserve("r-0", "m", GIB, T0, owner=dead)
    ledger.acquire_startup_lock("a-0", "r-0", T0)  # the owner comes from the reservation
    ledger.acquire_startup_lock("a-0", "r-1", T0, owner=alive)
    ledger.reserve("r-2", "m", GIB, T0)
    ledger.acquire_startup_lock("a-0", "r-2", T0)  # no owner yet: it reserves with one while it waits
    ledger.reserve("r-2", "m", GIB, T0, owner=dead)
    holder = ledger.startup_lock_holder("a-0")
    assert holder is not None and holder.owner == dead
    assert ledger.reclaim({dead}, T0 + 1) == ["r-0", "r-2"]  # r-2's reservation, though it only waited
    holder = ledger.startup_lock_holder("a-0")
    assert holder is not None and (holder.replica_id, holder.owner) == ("r-1", alive)
    assert ledger.reservations() == [] and ledger.startup_waiters("a-0") == []
    assert ledger.reclaim({dead}, T0 + 2) == []
    assert ledger.reclaim({"0" * 32}, T0 + 2) == []  # a live owner's lock stays
    assert ledger.holds_startup_lock("a-0", "r-1")


def test_a_host_memory_pseudo_gpu_grants_every_start_at_once(ledger: Ledger) -> None:
    host = NodeInventory.model_validate(
        {"node": "laptop", "source": "host-memory", "gpus": [{"index": 0, "uuid": "host-laptop", "total_gb": 16}]}
    )
    ledger.update_inventory(host, T0)
    assert [ledger.acquire_startup_lock("host-laptop", f"r-{i}", T0) for i in range(3)] == [(True, False)] * 3
    assert ledger.startup_lock_holder("host-laptop") is None and ledger.startup_waiters("host-laptop") == []
    assert ledger.acquire_startup_lock("GPU-unknown", "r-0", T0) == (True, True)  # unknown GPUs keep the lock
    assert ledger.acquire_startup_lock("GPU-unknown", "r-1", T0) == (False, False)


def test_only_lock_holders_survive_a_snapshot(ledger: Ledger) -> None:
    """The queues are callers blocked in the allocator, not state: a restarted allocator gets their calls again."""
    ledger.acquire_startup_lock("a-0", "r-0", T0)
    ledger.acquire_startup_lock("a-0", "r-1", T0)
    restored = Ledger.loads(ledger.dumps())
    assert restored.holds_startup_lock("a-0", "r-0") and restored.startup_waiters("a-0") == []
