"""The allocator under a burst, on a real Ray cluster: batch calls (what a bad item does to its
batch), a monitor that keeps publishing while thousands of reservations queue up (its node must
never go stale), heartbeats that keep a node fresh only while they change, and a restart that
rebuilds the ledger from a compacted snapshot plus journal."""

from __future__ import annotations

import threading
import time

import pytest
import ray
from test_allocator import actor_pid, node_inventory
from waiting import wait_until

from vram_scheduler.allocator.actor import ReservationError
from vram_scheduler.allocator.heartbeats import write_heartbeat
from vram_scheduler.core.config import GIB, ConfigError, PlacementSettings
from vram_scheduler.core.contract import ReserveRequest
from vram_scheduler.core.ray_names import NAMESPACE
from vram_scheduler.monitor.publisher import AllocatorLink

pytestmark = pytest.mark.slow

MIB = 1 << 20


def request(replica_id: str, n_bytes: int = MIB, **extra: object) -> dict:
    return {"replica_id": replica_id, "model_id": "m", "bytes": n_bytes, **extra}


def typed(replica_id: str, n_bytes: int = MIB) -> ReserveRequest:
    return ReserveRequest.model_validate(request(replica_id, n_bytes))


def test_a_batch_with_an_invalid_item_reserves_nothing_and_names_it(allocator) -> None:
    allocator.update_inventory(node_inventory("gpu-a", 24))
    bad = [request("ok-0"), request("ok-1"), request("bad-2", 0), request("bad-3", owner="someone")]
    with pytest.raises(ConfigError) as caught:  # fields as dicts: a caller outside the type checks
        ray.get(allocator.handle.reserve_many.remote(bad))
    message = str(caught.value)
    assert "reserve_many(requests): invalid configuration" in message
    assert "requests[2].bytes = 0: Input should be greater than 0" in message
    assert "requests[3].owner = 'someone': String should match pattern" in message
    assert allocator.reservations() == []  # the valid items were not reserved either
    with pytest.raises(ConfigError, match=r"release_many\(replica_ids\): invalid configuration\n  - replica_ids\[1\]"):
        ray.get(allocator.handle.release_many.remote(["ok-0", 7]))


def test_a_batch_item_that_does_not_fit_is_refused_alone(allocator) -> None:
    allocator.configure(PlacementSettings.model_validate({"replica_overhead_gb": 1}))
    allocator.update_inventory(node_inventory("gpu-a", 24))
    outcomes = allocator.reserve_many([typed("a-0", 8 * GIB), typed("big-0", 30 * GIB), typed("a-1", 8 * GIB)])
    assert [(o.replica_id, o.error is None) for o in outcomes] == [("a-0", True), ("big-0", False), ("a-1", True)]
    assert outcomes[1].reservation is None
    # What a single call would have said at that point of the batch: a-0 placed, a-1 not yet.
    assert outcomes[1].error == (
        "model m needs 31.00 GiB per replica (30.00 GiB budget + 1.00 GiB overhead); the largest free slot is "
        "15.00 GiB on node gpu-a, GPU 0 (short by 16.00 GiB)"
    )
    held = {r.replica_id: r for r in allocator.reservations()}
    assert sorted(held) == ["a-0", "a-1"]
    assert held["a-0"] == outcomes[0].reservation
    again = allocator.reserve_many([typed("a-0", 8 * GIB)])  # a retried batch: same answer
    assert again[0].reservation == outcomes[0].reservation
    assert allocator.release_many(["a-0", "nobody", "a-1"]) == [True, False, True]
    assert allocator.reservations() == []


@ray.remote(num_cpus=0)
class BurstClient:
    """Puts all of its reservations in flight at once: the allocator's queue fills up."""

    def burst(self, name: str, count: int) -> dict[str, int | list[str]]:
        from vram_scheduler.allocator.actor import get_vram_allocator

        allocator = get_vram_allocator()
        refs = [allocator.reserve.remote(f"{name}-{i}", "m", MIB) for i in range(count)]
        refused: list[str] = []
        placed = 0
        for ref in refs:
            try:
                ray.get(ref)
                placed += 1
            except ReservationError as error:
                refused.append(str(error).splitlines()[-1])
        return {"placed": placed, "refused": refused}


def test_a_publishing_monitors_node_never_goes_stale_under_a_burst(allocator) -> None:
    """4 client processes put 3,000 reservations in flight at once while the real monitor link
    (`AllocatorLink`: update_inventory then get_vram_state, and a heartbeat in the GCS) publishes
    node n0 every 0.2 s. The node must stay fresh (stale after 3 s), no reservation may be refused.
    (Before heartbeats, the link's calls waited seconds in the queue and n0 went stale.)"""
    stale_after_s, interval_s, clients, per_client = 3.0, 0.2, 4, 750
    allocator.configure(PlacementSettings.model_validate({"stale_after_s": stale_after_s, "replica_overhead_gb": 0}))
    inventory = node_inventory("n0", 80, 80)
    errors: list[str] = []
    link = AllocatorLink(None, "n0", interval_s, lambda kind, message: errors.append(f"{kind}: {message}"))
    link.start()
    stop = threading.Event()
    ages: list[float] = []
    stale_seen: list[list[str]] = []

    def monitor() -> None:
        while not stop.is_set():
            link.offer(inventory.model_copy(update={"timestamp": time.time()}))
            stop.wait(interval_s)

    def sample() -> None:
        while not stop.is_set():
            state = allocator.vram_state()
            ages.extend(node.age_s for node in state.nodes)
            if state.stale_nodes:
                stale_seen.append(state.stale_nodes)
            stop.wait(0.1)

    threads = [threading.Thread(target=monitor, daemon=True), threading.Thread(target=sample, daemon=True)]
    threads[0].start()
    wait_until(lambda: link.published >= 2, 30, "two inventories published")
    threads[1].start()
    try:
        workers = [BurstClient.options(resources={("node_a", "node_b")[i % 2]: 1}).remote() for i in range(clients)]
        ray.get([w.__ray_ready__.remote() for w in workers])
        began = time.monotonic()
        results = ray.get([w.burst.remote(f"c{i}", per_client) for i, w in enumerate(workers)], timeout=600)
        took = time.monotonic() - began
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        link.stop()
    refused = [reason for result in results for reason in result["refused"]]
    assert refused == [], refused[:3]
    assert sum(result["placed"] for result in results) == clients * per_client
    assert stale_seen == [], stale_seen[:3]
    assert ages and max(ages) < stale_after_s, max(ages)
    assert not errors, errors[:3]
    assert link.heartbeats > 0
    print(
        f"{clients * per_client} reservations in {took:.1f} s; n0 at most {max(ages):.2f} s without a sign of "
        f"life; {link.published} publishes, {link.heartbeats} heartbeats"
    )


def test_a_node_is_fresh_while_its_heartbeat_changes_and_stale_once_it_stops(allocator) -> None:
    allocator.configure(PlacementSettings.model_validate({"stale_after_s": 1.0}))
    allocator.update_inventory(node_inventory("n0", 24))  # the only update_inventory
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        write_heartbeat("n0", time.time(), NAMESPACE)
        time.sleep(0.2)
    assert allocator.vram_state().stale_nodes == []  # 3 s after its inventory
    allocator.reserve("h-0", "m", GIB)
    # The monitor dies: its last heartbeat stays in the GCS, unchanged, and keeps nobody fresh.
    wait_until(lambda: allocator.vram_state().stale_nodes == ["n0"], 10, "n0 stale")
    with pytest.raises(ReservationError, match="stale: n0"):
        allocator.reserve("h-1", "m", GIB)


def test_a_restarted_allocator_gives_every_node_a_full_timeout_again(allocator) -> None:
    """It was not listening while it was down: a node is judged from the restart on, not from
    an inventory that arrived before it."""
    allocator.configure(PlacementSettings.model_validate({"stale_after_s": 2.0}))
    allocator.update_inventory(node_inventory("n0", 24))
    wait_until(lambda: allocator.vram_state().stale_nodes == ["n0"], 10, "n0 stale")
    pid_before = actor_pid(allocator.handle)
    ray.kill(allocator.handle, no_restart=False)
    wait_until(lambda: actor_pid(allocator.handle) != pid_before, 60, "the allocator restarted")
    assert allocator.vram_state().stale_nodes == []
    allocator.reserve("r-0", "m", GIB)
    nobody_spoke_up = "n0 stale again: nobody spoke up for it since the restart"
    wait_until(lambda: allocator.vram_state().stale_nodes == ["n0"], 10, nobody_spoke_up)


def test_a_restart_rebuilds_the_ledger_from_snapshot_and_journal(allocator) -> None:
    """Enough changes for the writer to compact (the journal outgrows 1 MiB), more after it, then a kill."""
    allocator.configure(PlacementSettings.model_validate({"replica_overhead_gb": 0, "stale_after_s": 600}))
    allocator.update_inventory(node_inventory("gpu-a", 80, 80))
    for start in range(0, 8000, 1000):
        outcomes = allocator.reserve_many([typed(f"r-{i}") for i in range(start, start + 1000)])
        assert all(o.error is None for o in outcomes)
    wait_until(lambda: allocator.persistence().store.snapshots_written >= 1, 30, "a snapshot written")
    allocator.release_many([f"r-{i}" for i in range(0, 8000, 7)])
    allocator.attach_process("r-1", 31337)
    allocator.acquire_startup_lock("GPU-gpu-a-0", "r-2")
    allocator.reserve("late-0", "m", 3 * GIB, "GPU-gpu-a-1")
    before_written = allocator.persistence().store
    assert before_written.generation >= 1 and before_written.journal_writes >= 1  # both parts in play
    before = allocator.vram_state()
    held = allocator.reservations()
    pid_before = actor_pid(allocator.handle)
    ray.kill(allocator.handle, no_restart=False)
    wait_until(lambda: actor_pid(allocator.handle) != pid_before, 60, "the allocator restarted")
    assert allocator.reservations() == held
    after = allocator.vram_state()
    for key in ("gpus", "startup_locks", "settings", "nodes"):
        if key == "nodes":
            assert [n.node for n in after.nodes] == [n.node for n in before.nodes]
        else:
            assert getattr(after, key) == getattr(before, key), key
    loaded = allocator.persistence().store.loaded
    assert loaded.source == "snapshot" and loaded.journal_writes == before_written.journal_writes
    assert loaded.reservations == len(held) == 8000 - len(range(0, 8000, 7)) + 1
    print(f"reloaded {loaded.reservations} reservations ({loaded.bytes_read} bytes) in {loaded.seconds} s")
