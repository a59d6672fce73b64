"""The ledger under random sequences of inventory updates, reserves, releases, attaches, sleeps,
wakes and stops (hypothesis state machine): no GPU ever booked beyond its room, each replica holding
what its state says (awake its reservation, asleep its sleeping footprint, stopped nothing; settling,
on its way there while its engine still holds the memory, its reservation), no GPU
over its sleepers and no node over its level-1 host RAM, wakes that evict only idle unpinned
replicas in LRU order (or refuse and change nothing), refusals only when nothing fits, idempotent
repeats, a snapshot round trip that changes nothing, and a journal of deltas (what the allocator
persists after each change) that rebuilds exactly the ledger it followed."""

from __future__ import annotations

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vram_scheduler.core import capacity
from vram_scheduler.core.config import PlacementSettings, SleepPolicy, SleepSettings, gib_to_bytes
from vram_scheduler.core.inventory import NodeInventory
from vram_scheduler.core.ledger import Ledger, LedgerDelta, LedgerSnapshot, ReservationError

NODES = {"a": [24, 16], "b": [80], "c": [12, 12, 8]}
UUIDS = [f"{node}-{i}" for node, totals in NODES.items() for i in range(len(totals))]
NOW = 1_000.0
# With the default 2.0 GiB overhead, 6 and 10 fill the 8 and 12 GiB GPUs to the byte (9.5 nearly).
SIZES_GB = [0.5, 1, 2, 4, 6, 9.5, 10, 13.5, 30, 60, 90]
HOST = {"node": "h", "source": "host-memory", "gpus": [{"index": 0, "uuid": "h-0", "total_gb": 32}]}
ALL_UUIDS = [*UUIDS, "h-0"]
MAX_ASLEEP = 2
HOST_GB = 12  # level-1 weights per node: a few small sleepers, then level 2
SLEEPY = [None, SleepPolicy(after_idle_s=5), SleepPolicy(after_idle_s=5, level=2, footprint_gb=1.5)]


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


def footprint(reservation) -> int:
    """What a replica holds in its state, computed here apart from the ledger's indexes."""
    if reservation.state == "awake" or reservation.settling:
        return reservation.bytes + reservation.overhead_bytes
    if reservation.state == "asleep":
        return reservation.sleep.sleep_bytes
    return 0


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger()
        sleep = SleepSettings(max_asleep_per_gpu=MAX_ASLEEP, level1_host_gb_per_node=HOST_GB)
        self.ledger.configure(PlacementSettings(stale_after_s=3600, sleep=sleep))  # the default overhead
        for node, totals in NODES.items():
            self.ledger.update_inventory(inventory(node, [0.0] * len(totals), [0] * len(totals)), NOW)
        self.ledger.update_inventory(NodeInventory.model_validate(HOST), NOW)
        self.held: dict[str, tuple[str, int]] = {}  # replica id → (model, bytes)
        self.counter = 0
        self.clock = NOW
        self.journal = Journal()

    def _tick(self) -> float:
        self.clock += 1
        return self.clock

    @rule(
        size_gb=st.sampled_from(SIZES_GB),
        gpu=st.none() | st.sampled_from(ALL_UUIDS) | st.just("c-0"),  # c-0 often: crowded, so wakes evict
        policy=st.sampled_from(SLEEPY),
        stopped=st.booleans(),
    )
    def reserve(self, size_gb: float, gpu: str | None, policy: SleepPolicy | None, stopped: bool) -> None:
        replica_id = f"r-{self.counter}"
        self.counter += 1
        n_bytes = gib_to_bytes(size_gb)
        overhead = self.ledger.overhead
        target = self.ledger.find_gpu(gpu) if gpu else None
        on_host = gpu == "h-0"
        terms = capacity.sleep_terms(policy, n_bytes, overhead, host_memory=on_host, weights_bytes=n_bytes // 2)
        state = "stopped" if stopped and terms is not None else "awake"
        free_before = self.ledger.free_bytes()
        need = n_bytes + overhead
        try:
            reservation, changed = self.ledger.reserve(
                replica_id, f"m{size_gb:g}", n_bytes, NOW, gpu, overhead_bytes=None, state=state, sleep=terms
            )
        except ReservationError as refusal:
            if state == "awake":
                candidates = [gpu] if gpu else ALL_UUIDS
                assert all(free_before[u] < need for u in candidates), str(refusal)
            else:
                assert target is None or need > self._wake_room(target.uuid), str(refusal)
            return
        assert changed and reservation.state == state and reservation.sleep == terms
        if state == "awake":
            assert free_before[reservation.gpu_uuid] >= need
            if gpu is None:  # best fit: no GPU with a tighter fit was passed over
                fitting = [free_before[u] for u in ALL_UUIDS if free_before[u] >= need]
                assert free_before[reservation.gpu_uuid] == min(fitting)
        else:
            assert need <= self._wake_room(reservation.gpu_uuid)
        self.held[replica_id] = (f"m{size_gb:g}", n_bytes)

    def _wake_room(self, uuid: str) -> int:
        gpu = self.ledger.find_gpu(uuid)
        pinned = [r for r in self.ledger.reservations() if r.gpu_uuid == uuid and r.sleep is None]
        unmanaged = gpu.unmanaged_bytes(self.ledger.managed_pids())
        return gpu.total_bytes - unmanaged - sum(footprint(r) for r in pinned)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def sleep(self, data: st.DataObject) -> None:
        replica_id = data.draw(st.sampled_from(sorted(self.held)))
        before = self.ledger.entry(replica_id).reservation
        try:
            after, changed = self.ledger.sleep(replica_id, self._tick())
        except ReservationError as refusal:
            assert before.sleep is None and "never sleeps" in str(refusal)
            return
        assert changed == (before.state == "awake")
        if before.state != "awake":
            assert after == before
            return
        assert after.settling and footprint(after) == footprint(before)  # held until the engine let go
        if before.gpu_uuid == "h-0":
            assert after.state == "stopped"  # no sleep mode on a host-memory pseudo-GPU
        else:
            assert after.state in ("asleep", "stopped")
            if after.state == "asleep" and before.sleep.level == 2:
                assert after.asleep_level == 2
            event(f"slept: {after.state} level {after.asleep_level}")

    @precondition(lambda self: any(r.settling for r in self.ledger.reservations()))
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        """A settling replica's engine let go: it holds its state's footprint, the rest is free."""
        settling = sorted(r.replica_id for r in self.ledger.reservations() if r.settling)
        replica_id = data.draw(st.sampled_from(settling))
        before = self.ledger.entry(replica_id).reservation
        free = self.ledger.free_bytes()[before.gpu_uuid]
        after, changed = self.ledger.settle(replica_id, self._tick())
        assert changed and not after.settling and after.state == before.state != "awake"
        assert self.ledger.free_bytes()[before.gpu_uuid] == free + footprint(before) - footprint(after)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def stop(self, data: st.DataObject) -> None:
        replica_id = data.draw(st.sampled_from(sorted(self.held)))
        before = self.ledger.entry(replica_id).reservation
        try:
            after, changed = self.ledger.stop(replica_id, self._tick())
        except ReservationError as refusal:
            assert before.sleep is None and "release it instead" in str(refusal)
            return
        assert after.state == "stopped" and not after.settling
        assert changed == (before.state != "stopped" or before.settling)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def touch(self, data: st.DataObject) -> None:
        replica_ids = data.draw(st.lists(st.sampled_from(sorted(self.held)), max_size=3))
        self.ledger.touch(replica_ids, self._tick())

    @precondition(lambda self: any(r.state != "awake" for r in self.ledger.reservations()))
    @rule(data=st.data(), policy=st.sampled_from(SLEEPY))
    def crowd(self, data: st.DataObject, policy: SleepPolicy | None) -> None:
        """Another replica takes the room a sleeper left (all of it), so waking the sleeper must evict."""
        sleepers = sorted(r.replica_id for r in self.ledger.reservations() if r.state != "awake")
        sleeper = self.ledger.entry(data.draw(st.sampled_from(sleepers))).reservation
        room = self.ledger.free_bytes()[sleeper.gpu_uuid] - self.ledger.overhead
        if room <= 0:
            return
        replica_id = f"r-{self.counter}"
        self.counter += 1
        terms = capacity.sleep_terms(
            policy, room, self.ledger.overhead, host_memory=sleeper.gpu_uuid == "h-0", weights_bytes=room // 2
        )
        self.ledger.reserve(replica_id, "crowd", room, self._tick(), sleeper.gpu_uuid, sleep=terms)
        self.held[replica_id] = ("crowd", room)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def wake(self, data: st.DataObject) -> None:
        replica_id = data.draw(st.sampled_from(sorted(self.held)))
        busy = set(data.draw(st.lists(st.sampled_from(sorted(self.held)), max_size=3)))
        held = self.ledger.entry(replica_id).reservation
        mates = [
            self.ledger.entry(r.replica_id)
            for r in self.ledger.reservations()
            if r.gpu_uuid == held.gpu_uuid and r.replica_id != replica_id
        ]
        idle = [
            e
            for e in mates
            if e.reservation.sleep is not None and e.reservation.replica_id not in busy and not e.reservation.settling
        ]
        evictable = sum(footprint(e.reservation) for e in idle)
        need = held.bytes + held.overhead_bytes - footprint(held)
        free = self.ledger.free_bytes()[held.gpu_uuid]
        before = self.ledger.dumps()
        try:
            outcome, changed = self.ledger.wake(replica_id, self._tick(), busy)
        except ReservationError as refusal:
            assert self.ledger.dumps() == before, "a refused wake changed the ledger"
            assert free + evictable < need, str(refusal)
            assert f"wake {replica_id}" in str(refusal) and "short by" in str(refusal)
            event("wake refused")
            return
        event("wake evicted" if outcome.evicted else "wake without eviction")
        assert changed == (held.state != "awake")
        if outcome.evicted:  # short of room: nothing freed yet, the waker left as it was
            assert outcome.reservation == held and self.ledger.free_bytes()[held.gpu_uuid] == free
            assert all(self.ledger.entry(e.replica_id).reservation.settling for e in outcome.evicted)
        else:
            assert outcome.reservation.state == "awake" and not outcome.reservation.settling
            assert held.state == "awake" or held.settling or free >= need
        assert self.ledger.free_bytes()[held.gpu_uuid] >= 0 or free < 0
        evicted = {e.replica_id for e in outcome.evicted}
        assert evicted <= {e.reservation.replica_id for e in idle}, "evicted a pinned or busy replica"
        awake_idle = [e for e in idle if e.reservation.state == "awake"]
        slept = [e.used_at for e in awake_idle if e.reservation.replica_id in evicted]
        kept = [e.used_at for e in awake_idle if e.reservation.replica_id not in evicted]
        assert not slept or not kept or max(slept) <= min(kept), "a wake evicted out of LRU order"
        for gone in outcome.evicted:
            assert self.ledger.entry(gone.replica_id).reservation.state == gone.state != "awake"

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
        host: dict[str, int] = {}
        for uuid in ALL_UUIDS:
            mine = [r for r in self.ledger.reservations() if r.gpu_uuid == uuid]
            assert reserved.get(uuid, 0) == sum(footprint(r) for r in mine)
            # Reservations alone never exceed a GPU's total (a wake takes only free room).
            gpu = self.ledger.find_gpu(uuid)
            assert reserved.get(uuid, 0) <= gpu.total_bytes
            asleep = [r for r in mine if r.state == "asleep"]
            assert len(asleep) == self.ledger.asleep_count(uuid) <= MAX_ASLEEP
            assert uuid != "h-0" or not asleep  # a host-memory pseudo-GPU stops, never sleeps
            for r in asleep:
                assert r.asleep_level in (1, 2) and r.sleep is not None
                if r.asleep_level == 1:
                    host[r.node] = host.get(r.node, 0) + r.sleep.host_bytes
            assert all(r.state == "awake" for r in mine if r.sleep is None), "a pinned replica left awake"
        assert self.ledger.level1_host_bytes() == host
        assert all(n <= gib_to_bytes(HOST_GB) for n in host.values())

    @invariant()
    def snapshot_round_trip(self) -> None:
        restored = Ledger.loads(self.ledger.dumps())
        assert restored.state(NOW) == self.ledger.state(NOW)

    @invariant()
    def journal_rebuilds_the_ledger(self) -> None:
        self.journal.follow(self.ledger)


LedgerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
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
