"""The ledger under random sequences of inventory updates, reserves, releases and attaches
(hypothesis state machine): no GPU ever booked beyond its room, refusals only when nothing fits,
idempotent repeats, a snapshot round trip that changes nothing, and a journal of deltas (what the
allocator persists after each change) that rebuilds exactly the ledger it followed."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vram_scheduler.core.config import PlacementSettings, gib_to_bytes
from vram_scheduler.core.inventory import NodeInventory
from vram_scheduler.core.ledger import Ledger, LedgerDelta, LedgerSnapshot, ReservationError

NODES = {"a": [24, 16], "b": [80], "c": [12, 12, 8]}
UUIDS = [f"{node}-{i}" for node, totals in NODES.items() for i in range(len(totals))]
NOW = 1_000.0
# With the default 2.0 GiB overhead, 6 and 10 fill the 8 and 12 GiB GPUs to the byte (9.5 nearly).
SIZES_GB = [0.5, 1, 2, 4, 6, 9.5, 10, 13.5, 30, 60, 90]


class Journal:
    """The ledger as its persisted deltas rebuild it: each delta through JSON, applied in order."""

    def __init__(self) -> None:
        self.rebuilt = LedgerSnapshot()

    def follow(self, ledger: Ledger) -> None:
        delta = ledger.take_delta()
        if delta is not None:
            LedgerDelta.model_validate_json(delta.model_dump_json()).apply_to(self.rebuilt)
        assert self.rebuilt == ledger.data
        assert Ledger(self.rebuilt).state(NOW) == ledger.state(NOW)


def inventory(node: str, used_gb: list[float], pids: list[int]) -> NodeInventory:
    gpus = []
    for i, total in enumerate(NODES[node]):
        used = gib_to_bytes(used_gb[i])
        processes = [{"pid": pids[i], "used_bytes": used}] if used else []
        gpus.append({"index": i, "uuid": f"{node}-{i}", "total_gb": total, "used_bytes": used, "processes": processes})
    return NodeInventory.model_validate({"node": node, "gpus": gpus})


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.ledger.configure(PlacementSettings(stale_after_s=3600))  # the default overhead
        for node, totals in NODES.items():
            self.ledger.update_inventory(inventory(node, [0.0] * len(totals), [0] * len(totals)), NOW)
        self.held: dict[str, tuple[str, int]] = {}  # replica id → (model, bytes)
        self.counter = 0
        self.journal = Journal()

    @rule(size_gb=st.sampled_from(SIZES_GB), gpu=st.none() | st.sampled_from(UUIDS))
    def reserve(self, size_gb: float, gpu: str | None) -> None:
        replica_id = f"r-{self.counter}"
        self.counter += 1
        n_bytes = gib_to_bytes(size_gb)
        free_before = self.ledger.free_bytes()
        need = n_bytes + self.ledger.overhead
        try:
            reservation, changed = self.ledger.reserve(replica_id, f"m{size_gb:g}", n_bytes, NOW, gpu)
        except ReservationError as refusal:
            candidates = [gpu] if gpu else UUIDS
            assert all(free_before[u] < need for u in candidates), str(refusal)
            return
        assert changed and free_before[reservation.gpu_uuid] >= need
        if gpu is None:  # best fit: no GPU with a tighter fit was passed over
            fitting = [free_before[u] for u in UUIDS if free_before[u] >= need]
            assert free_before[reservation.gpu_uuid] == min(fitting)
        self.held[replica_id] = (f"m{size_gb:g}", n_bytes)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def repeat(self, data: st.DataObject) -> None:
        replica_id = data.draw(st.sampled_from(sorted(self.held)))
        model_id, n_bytes = self.held[replica_id]
        before = self.ledger.entry(replica_id).reservation
        again, changed = self.ledger.reserve(replica_id, model_id, n_bytes, NOW)
        assert again == before and not changed

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        replica_id = data.draw(st.sampled_from(sorted(self.held)))
        assert self.ledger.release(replica_id) is True
        assert self.ledger.release(replica_id) is False
        del self.held[replica_id]

    @precondition(lambda self: self.held)
    @rule(data=st.data(), pid=st.integers(100, 110))
    def attach(self, data: st.DataObject, pid: int) -> None:
        self.ledger.attach_process(data.draw(st.sampled_from(sorted(self.held))), pid)

    @rule(node=st.sampled_from(sorted(NODES)), data=st.data())
    def other_workload(self, node: str, data: st.DataObject) -> None:
        """Memory used outside ray-vram changes; it may even eat into reserved room (free < 0)."""
        count = len(NODES[node])
        used = [data.draw(st.sampled_from([0.0, 1.0, 3.5])) for _ in range(count)]
        pids = [data.draw(st.integers(100, 110)) for _ in range(count)]
        self.ledger.update_inventory(inventory(node, used, pids), NOW)

    @invariant()
    def ledger_matches_what_is_held(self) -> None:
        assert {r.replica_id for r in self.ledger.reservations()} == set(self.held)
        reserved = self.ledger.reserved_bytes()
        for uuid in UUIDS:
            mine = [r for r in self.ledger.reservations() if r.gpu_uuid == uuid]
            assert reserved.get(uuid, 0) == sum(r.bytes + self.ledger.overhead for r in mine)
            # Without other workloads, reservations alone never exceed a GPU's total.
            gpu = self.ledger.find_gpu(uuid)
            assert reserved.get(uuid, 0) <= gpu.total_bytes

    @invariant()
    def snapshot_round_trip(self) -> None:
        restored = Ledger.loads(self.ledger.dumps())
        assert restored.state(NOW) == self.ledger.state(NOW)

    @invariant()
    def journal_rebuilds_the_ledger(self) -> None:
        self.journal.follow(self.ledger)


LedgerMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_ledger_state_machine = LedgerMachine.TestCase


LOCK_GPUS = ["a-0", "a-1", "host-h"]  # host-h: a host-memory pseudo-GPU
LOCK_REPLICAS = [f"s-{i}" for i in range(5)]
LOCK_OWNERS = ["0" * 32, "1" * 32]


class StartupLockMachine(RuleBasedStateMachine):
    """Startup locks under random acquires, releases, give-ups and dead owners, against a model:
    at most one holder per GPU, waiters served in FIFO order, a freed lock going to the next in
    line at once, and a host-memory pseudo-GPU that never holds or queues anyone."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        self.ledger.update_inventory(inventory("a", [0.0, 0.0], [0, 0]), NOW)
        host = {"node": "h", "source": "host-memory", "gpus": [{"index": 0, "uuid": "host-h", "total_gb": 16}]}
        self.ledger.update_inventory(NodeInventory.model_validate(host), NOW)
        self.holder: dict[str, tuple[str, str]] = {}  # GPU → (replica, owner)
        self.queue: dict[str, list[tuple[str, str]]] = {gpu: [] for gpu in LOCK_GPUS}
        self.journal = Journal()

    def _next(self, gpu: str) -> None:
        if gpu not in self.holder and self.queue[gpu]:
            self.holder[gpu] = self.queue[gpu].pop(0)

    @rule(gpu=st.sampled_from(LOCK_GPUS), replica=st.sampled_from(LOCK_REPLICAS), owner=st.sampled_from(LOCK_OWNERS))
    def acquire(self, gpu: str, replica: str, owner: str) -> None:
        granted, changed = self.ledger.acquire_startup_lock(gpu, replica, NOW, owner)
        if gpu == "host-h" or self.holder.get(gpu, ("", ""))[0] == replica:
            assert (granted, changed) == (True, False)
        elif gpu not in self.holder:
            assert (granted, changed) == (True, True)
            self.holder[gpu] = (replica, owner)
        else:
            assert (granted, changed) == (False, False)
            queued = [r for r, _ in self.queue[gpu]]
            if replica in queued:
                self.queue[gpu][queued.index(replica)] = (replica, owner)
            else:
                self.queue[gpu].append((replica, owner))

    @rule(gpu=st.sampled_from(LOCK_GPUS), replica=st.sampled_from(LOCK_REPLICAS))
    def release_lock(self, gpu: str, replica: str) -> None:
        held = self.holder.get(gpu, ("", ""))[0] == replica
        assert self.ledger.release_startup_lock(gpu, replica, NOW) is held
        if held:
            del self.holder[gpu]
        self.queue[gpu] = [w for w in self.queue[gpu] if w[0] != replica]
        self._next(gpu)

    @rule(gpu=st.sampled_from(LOCK_GPUS), replica=st.sampled_from(LOCK_REPLICAS))
    def give_up(self, gpu: str, replica: str) -> None:
        queued = any(r == replica for r, _ in self.queue[gpu])
        assert self.ledger.drop_startup_waiter(gpu, replica) is queued
        self.queue[gpu] = [w for w in self.queue[gpu] if w[0] != replica]

    def _release(self, replica: str) -> None:
        for gpu in LOCK_GPUS:
            if self.holder.get(gpu, ("", ""))[0] == replica:
                del self.holder[gpu]
            self.queue[gpu] = [w for w in self.queue[gpu] if w[0] != replica]
        for gpu in LOCK_GPUS:
            self._next(gpu)

    @rule(replica=st.sampled_from(LOCK_REPLICAS))
    def release(self, replica: str) -> None:
        held = any(r == replica for r, _ in self.holder.values())
        assert self.ledger.release(replica, NOW) is held
        self._release(replica)

    @rule(dead=st.sampled_from(LOCK_OWNERS))
    def owner_dies(self, dead: str) -> None:
        expected = sorted({r for r, owner in self.holder.values() if owner == dead})
        assert self.ledger.reclaim({dead}, NOW) == expected
        for replica in expected:
            self._release(replica)

    @invariant()
    def ledger_matches_the_model(self) -> None:
        for gpu in LOCK_GPUS:
            holder = self.ledger.startup_lock_holder(gpu)
            assert ((holder.replica_id, holder.owner) if holder else None) == self.holder.get(gpu)
            waiters = self.ledger.startup_waiters(gpu)
            assert waiters == [r for r, _ in self.queue[gpu]]  # FIFO
            assert len(set(waiters)) == len(waiters)
            assert not waiters or holder is not None  # a free lock never keeps anyone waiting
            assert holder is None or holder.replica_id not in waiters
        assert "host-h" not in self.holder and not self.queue["host-h"]
        assert self.ledger.state(NOW).startup_locks == {gpu: r for gpu, (r, _) in sorted(self.holder.items())}
        self.journal.follow(self.ledger)  # persisted holders (queues are not persisted: callers retry)


StartupLockMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_startup_lock_state_machine = StartupLockMachine.TestCase
