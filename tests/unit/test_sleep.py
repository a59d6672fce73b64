"""Sleeping replicas, without Ray: the values, what a sleeper holds (capacity), how deep it sleeps
and whom a wake evicts (core.eviction, the ledger), and a plan placing more models than fit awake."""

from __future__ import annotations

import pytest

from vram_scheduler.core import capacity, eviction
from vram_scheduler.core.config import (
    GIB,
    ConfigError,
    ModelSpec,
    PlacementSettings,
    SleepPolicy,
    SleepSettings,
    gib_to_bytes,
    parse_config,
    sleep_policy,
)
from vram_scheduler.core.contract import Eviction, Reservation
from vram_scheduler.core.inventory import Inventory, NodeInventory
from vram_scheduler.core.ledger import Ledger, ReservationError
from vram_scheduler.core.planner import plan

T0 = 1_000.0
NAP = SleepPolicy(after_idle_s=30)


def settings(**sleep: object) -> PlacementSettings:
    return PlacementSettings(replica_overhead_gb=2, stale_after_s=3600, sleep=SleepSettings(**sleep))


def terms(budget_gb: float, *, level: int = 1, host: bool = False, weights_gb: float | None = None):
    policy = SleepPolicy(after_idle_s=30, level=level)
    weights = gib_to_bytes(weights_gb) if weights_gb else None
    return capacity.sleep_terms(policy, gib_to_bytes(budget_gb), 2 * GIB, host_memory=host, weights_bytes=weights)


def ledger_with(total_gb: float = 80, source: str = "nvml", **sleep: object) -> Ledger:
    ledger = Ledger()
    ledger.configure(settings(**sleep))
    gpus = [{"index": 0, "uuid": "g0", "total_gb": total_gb}]
    ledger.update_inventory(NodeInventory.model_validate({"node": "n", "source": source, "gpus": gpus}), T0)
    return ledger


# -- values --------------------------------------------------------------------------------------


def test_sleep_values_and_their_defaults() -> None:
    config = parse_config(
        {
            "models": [
                {"model_id": "a", "model": "x", "vram_gb": 4, "sleep": {"after_idle_s": 60, "level": 2}},
                {"model_id": "b", "model": "x", "vram_gb": 4, "pinned": True},
                {"model_id": "c", "model": "x", "vram_gb": 4},
            ],
            "placement": {"sleep": {"after_idle_s": 300, "max_asleep_per_gpu": 2, "level1_host_gb_per_node": 32}},
        }
    )
    a, b, c = config.models
    assert sleep_policy(a, config.placement) == SleepPolicy(after_idle_s=60, level=2)
    assert sleep_policy(b, config.placement) is None  # pinned: never, whatever the cluster says
    assert sleep_policy(c, config.placement) == SleepPolicy(after_idle_s=300, level=1)
    assert sleep_policy(c, PlacementSettings()) is None  # no idle time anywhere: never sleeps
    assert PlacementSettings().sleep.max_asleep_per_gpu == 4
    assert config.serving.max_wake_wait_s == 60


def test_pinned_and_sleep_together_are_refused_by_name() -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(
            {"models": [{"model_id": "a", "model": "x", "vram_gb": 4, "pinned": True, "sleep": {"after_idle_s": 5}}]}
        )
    assert "models[0]" in str(refused.value) and "pinned: true never sleeps" in str(refused.value)


def test_sleep_level_and_idle_time_are_checked() -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(
            {"models": [{"model_id": "a", "model": "x", "vram_gb": 4, "sleep": {"after_idle_s": 0, "level": 3}}]}
        )
    text = str(refused.value)
    assert "models[0].sleep.after_idle_s = 0" in text and "models[0].sleep.level = 3" in text


# -- capacity ------------------------------------------------------------------------------------


def test_what_a_replica_holds_follows_its_state() -> None:
    t = terms(30)
    assert t.sleep_bytes == gib_to_bytes(capacity.DEFAULT_SLEEP_FOOTPRINT_GB)
    assert capacity.footprint_bytes("awake", 30 * GIB, 2 * GIB, t) == 32 * GIB
    assert capacity.footprint_bytes("asleep", 30 * GIB, 2 * GIB, t) == t.sleep_bytes
    assert capacity.footprint_bytes("stopped", 30 * GIB, 2 * GIB, t) == 0
    assert capacity.wake_need_bytes("asleep", 30 * GIB, 2 * GIB, t) == 32 * GIB - t.sleep_bytes


def test_sleeping_footprint_is_measured_or_default_never_above_the_reservation_and_zero_on_cpu() -> None:
    measured = SleepPolicy(after_idle_s=1, footprint_gb=1.74)
    assert capacity.sleeping_footprint_bytes(measured, 30 * GIB, 2 * GIB) == gib_to_bytes(1.74)
    assert capacity.sleeping_footprint_bytes(NAP, GIB // 4, 0) == GIB // 4  # a tiny model: its reservation
    assert capacity.sleeping_footprint_bytes(NAP, 30 * GIB, 2 * GIB, host_memory=True) == 0
    assert capacity.DEFAULT_SLEEP_FOOTPRINT_GB >= capacity.MEASURED_SLEEP_FOOTPRINT_GB + capacity.MARGIN_GB


def test_level1_weights_take_their_size_in_host_ram_or_the_budget_when_unknown() -> None:
    assert terms(30, weights_gb=11.4).host_bytes == gib_to_bytes(11.4)
    assert terms(30).host_bytes == 30 * GIB
    assert terms(30, host=True).host_bytes == 0
    assert capacity.sleep_terms(None, GIB, GIB) is None


# -- eviction rules ------------------------------------------------------------------------------


def candidate(name: str, used_at: float, state: str = "awake", held_gb: float = 10, level: int = 1):
    return eviction.Candidate(name, state, used_at, gib_to_bytes(held_gb), 2 * GIB, 5 * GIB, level)


def test_a_wake_evicts_least_recently_used_first_and_no_more_than_it_needs() -> None:
    chosen = eviction.choose_evictions(
        9 * GIB,
        [candidate("new", 30), candidate("old", 10), candidate("mid", 20)],
        sleeps=True,
        slots_left=4,
        host_room=100 * GIB,
    )
    assert [(e.replica_id, e.to, e.level) for e in chosen] == [("old", "asleep", 1), ("mid", "asleep", 1)]


def test_sleepers_beyond_the_gpus_limit_are_stopped_and_level1_beyond_host_ram_sleeps_at_level2() -> None:
    chosen = eviction.choose_evictions(
        26 * GIB,  # 8 + 8 asleep, 10 stopped
        [candidate("a", 1), candidate("b", 2), candidate("c", 3)],
        sleeps=True,
        slots_left=2,
        host_room=5 * GIB,
    )
    assert [(e.replica_id, e.to, e.level) for e in chosen] == [
        ("a", "asleep", 1),
        ("b", "asleep", 2),
        ("c", "stopped", None),
    ]


def test_when_sleeping_is_not_enough_sleepers_are_stopped_lru_first() -> None:
    chosen = eviction.choose_evictions(
        10 * GIB,
        [candidate("s", 5, state="asleep", held_gb=2), candidate("a", 9)],
        sleeps=True,
        slots_left=4,
        host_room=0,
    )
    assert [(e.replica_id, e.to) for e in chosen] == [("a", "asleep"), ("s", "stopped")]  # 8 + 2
    both = [candidate("s", 5, state="asleep", held_gb=2), candidate("a", 9)]
    chosen = eviction.choose_evictions(11 * GIB, both, sleeps=True, slots_left=4, host_room=0)
    assert [(e.replica_id, e.to) for e in chosen] == [("a", "stopped"), ("s", "stopped")]  # the new sleeper too
    assert eviction.choose_evictions(13 * GIB, both, sleeps=True, slots_left=4, host_room=0) is None


def test_no_sleep_mode_stops() -> None:
    target = eviction.sleep_target(1, 0, sleeps=False, slots_left=4, host_room=100 * GIB)
    assert target == eviction.SleepTarget("stopped", None)


# -- the ledger ----------------------------------------------------------------------------------


def fill(ledger: Ledger, *names: str, budget_gb: float = 30) -> None:
    for i, name in enumerate(names):
        ledger.reserve(name, name, gib_to_bytes(budget_gb), T0 + i, "g0", sleep=terms(budget_gb))


def put_to_sleep(ledger: Ledger, replica_id: str, now: float) -> Reservation:
    """`Ledger.sleep`, then `settle` once the engine's sleep returned (as a replica does)."""
    slept, _ = ledger.sleep(replica_id, now)
    return ledger.settle(replica_id, now)[0] if slept.state == "asleep" else ledger.stop(replica_id, now)[0]


def woken(ledger: Ledger, replica_id: str, now: float, busy: set[str] | None = None) -> list[Eviction]:
    """`Ledger.wake` as a replica drives it: the replicas it evicts sleep (and settle), then it asks again."""
    evicted: list[Eviction] = []
    while True:
        outcome, _ = ledger.wake(replica_id, now, busy or set())
        evicted += outcome.evicted
        if outcome.reservation.state == "awake":
            return evicted
        for gone in outcome.evicted:
            ledger.settle(gone.replica_id, now)


def test_a_wake_retakes_the_whole_reservation_evicting_lru_never_pinned_or_busy() -> None:
    ledger = ledger_with(80)
    ledger.reserve("pin", "pin", 10 * GIB, T0, "g0")  # no terms: pinned, 12 GiB
    fill(ledger, "a", "b")  # 2 × 32 GiB awake: 76 of 80 GiB
    put_to_sleep(ledger, "a", T0 + 5)
    ledger.reserve("c", "c", 30 * GIB, T0 + 6, "g0", sleep=terms(30))  # takes a's room
    ledger.touch(["b"], T0 + 7)
    ledger.touch(["c"], T0 + 8)
    # b is the least recently used, but busy: c goes to sleep instead.
    evicted = woken(ledger, "a", T0 + 9, busy={"b"})
    assert ledger.entry("a").reservation.state == "awake"
    assert [(e.replica_id, e.state, e.level) for e in evicted] == [("c", "asleep", 1)]
    assert ledger.entry("pin").reservation.state == "awake"
    # Both others busy: nothing changes, and the refusal says what held the room.
    before = ledger.dumps()
    put_to_sleep(ledger, "a", T0 + 10)
    ledger.reserve("d", "d", 28 * GIB, T0 + 11, "g0", sleep=terms(28))
    snapshot = ledger.dumps()
    with pytest.raises(ReservationError) as refused:
        ledger.wake("a", T0 + 12, busy={"b", "d"})
    assert ledger.dumps() == snapshot != before
    text = str(refused.value)
    assert "wake a of model a" in text and "short by" in text and "pinned: pin 12.00 GiB" in text
    assert "with requests in flight: b 32.00 GiB, d 30.00 GiB" in text


def test_a_replica_going_to_sleep_holds_its_whole_reservation_until_its_engine_let_go() -> None:
    """The ledger lowers a sleeper to its footprint only once its engine's sleep returned (`settle`),
    or frees it once its engine is gone (`stop`: a sleep that failed stops the engine): the room its
    engine still holds is never given to another replica meanwhile."""
    ledger = ledger_with(80)
    fill(ledger, "a", "b")  # 2 × 32 GiB: 16 GiB free
    going, changed = ledger.sleep("a", T0 + 1)
    assert changed and (going.state, going.asleep_level, going.settling) == ("asleep", 1, True)
    assert going.held_bytes == 32 * GIB and ledger.free_bytes()["g0"] == 16 * GIB
    assert ledger.asleep_count("g0") == 1 and ledger.level1_host_bytes() == {"n": 30 * GIB}  # taken at once
    with pytest.raises(ReservationError, match=r"model c needs 22.00 GiB .* which has 16.00 GiB free"):
        ledger.reserve("c", "c", 20 * GIB, T0 + 2, "g0", sleep=terms(20))
    (seen,) = [r for r in ledger.state(T0 + 2).gpus[0].replicas if r.replica_id == "a"]
    assert (seen.state, seen.settling, seen.held_bytes) == ("asleep", True, 32 * GIB)
    assert ledger.sleep("a", T0 + 3) == (going, False)  # asked again (an eviction's sleep): unchanged
    slept, changed = ledger.settle("a", T0 + 4)
    footprint = gib_to_bytes(capacity.DEFAULT_SLEEP_FOOTPRINT_GB)
    assert changed and not slept.settling and slept.held_bytes == footprint
    assert ledger.free_bytes()["g0"] == 48 * GIB - footprint and ledger.settle("a", T0 + 5) == (slept, False)
    ledger.reserve("c", "c", 20 * GIB, T0 + 6, "g0", sleep=terms(20))
    # b's sleep fails: its engine is shut down, then it is stopped and frees everything.
    ledger.sleep("b", T0 + 7)
    assert ledger.entry("b").reservation.held_bytes == 32 * GIB
    stopped, changed = ledger.stop("b", T0 + 8)
    assert changed and (stopped.state, stopped.settling, stopped.held_bytes) == ("stopped", False, 0)
    assert ledger.asleep_count("g0") == 1  # b's sleeper slot is given back
    assert Ledger.loads(ledger.dumps()).state(T0) == ledger.state(T0)


def test_a_wake_short_of_room_takes_it_only_after_its_evictions_settled() -> None:
    """A wake that must evict leaves every reservation whole: the evicted hold theirs (settling)
    until their engines slept, and the waker takes its room when it asks again after that."""
    ledger = ledger_with(80)
    ledger.reserve("pin", "pin", 10 * GIB, T0, "g0")
    fill(ledger, "a", "b")
    put_to_sleep(ledger, "a", T0 + 2)
    ledger.reserve("c", "c", 30 * GIB, T0 + 3, "g0", sleep=terms(30))
    ledger.touch(["c"], T0 + 4)  # b is the least recently used
    free = ledger.free_bytes()["g0"]
    outcome, changed = ledger.wake("a", T0 + 5)
    assert changed and [(e.replica_id, e.state) for e in outcome.evicted] == [("b", "asleep")]
    assert outcome.reservation.state == "asleep" and ledger.free_bytes()["g0"] == free  # nothing given yet
    assert ledger.entry("b").reservation.settling
    # Asked again before b's engine slept: b is on its way, c busy; refused, naming b.
    snapshot = ledger.dumps()
    with pytest.raises(ReservationError, match=r"going to sleep \(their engines not yet let go\): b 32.00 GiB"):
        ledger.wake("a", T0 + 6, busy={"c"})
    assert ledger.dumps() == snapshot
    ledger.settle("b", T0 + 7)
    outcome, changed = ledger.wake("a", T0 + 8)
    assert changed and outcome.reservation.state == "awake" and not outcome.evicted
    states = {r.replica_id: (r.state, r.settling) for r in ledger.reservations()}
    assert states == {"pin": ("awake", False), "a": ("awake", False), "b": ("asleep", False), "c": ("awake", False)}
    assert ledger.free_bytes()["g0"] >= 0


def test_a_sleeper_keeps_its_footprint_and_counts_against_the_gpu_and_the_nodes_host_ram() -> None:
    ledger = ledger_with(80, max_asleep_per_gpu=2, level1_host_gb_per_node=15)
    fill(ledger, "a", "b", budget_gb=10)
    ledger.reserve("c", "c", 10 * GIB, T0, "g0", sleep=terms(10))
    for name in ("a", "b", "c"):
        put_to_sleep(ledger, name, T0 + 1)
    states = {r.replica_id: (r.state, r.asleep_level) for r in ledger.reservations()}
    # 10 GiB of level-1 weights (their budget: size unknown) fit 15 GiB once, not twice; the third
    # sleeper is past the GPU's limit of two.
    assert states == {"a": ("asleep", 1), "b": ("asleep", 2), "c": ("stopped", None)}
    footprint = gib_to_bytes(capacity.DEFAULT_SLEEP_FOOTPRINT_GB)
    assert ledger.reserved_bytes()["g0"] == 2 * footprint
    assert ledger.level1_host_bytes() == {"n": 10 * GIB}
    state = ledger.state(T0)
    assert state.gpus[0].asleep == 2 and state.nodes[0].level1_host_bytes == 10 * GIB
    assert {r.replica_id: r.state for r in state.gpus[0].replicas} == {"a": "asleep", "b": "asleep", "c": "stopped"}
    assert Ledger.loads(ledger.dumps()).state(T0) == state


def test_on_cpu_sleep_stops_the_engine_and_holds_nothing() -> None:
    ledger = ledger_with(16, source="host-memory")
    ledger.reserve("a", "a", 4 * GIB, T0, "g0", sleep=terms(4, host=True))
    reservation, _ = ledger.sleep("a", T0)
    assert reservation.state == "stopped" and reservation.settling  # held until its engine is gone
    assert ledger.reserved_bytes()["g0"] == 6 * GIB
    reservation, _ = ledger.stop("a", T0)
    assert not reservation.settling and ledger.reserved_bytes().get("g0", 0) == 0


def test_pinned_replicas_neither_sleep_nor_stop() -> None:
    ledger = ledger_with(80)
    ledger.reserve("p", "p", 4 * GIB, T0, "g0")
    with pytest.raises(ReservationError, match="model p never sleeps"):
        ledger.sleep("p", T0)
    with pytest.raises(ReservationError, match="release it instead"):
        ledger.stop("p", T0)
    with pytest.raises(ReservationError, match="only a model that sleeps may be placed stopped"):
        ledger.reserve("q", "q", 4 * GIB, T0, "g0", state="stopped")


def test_a_stopped_replica_is_placed_only_where_it_could_wake() -> None:
    ledger = ledger_with(40)
    ledger.reserve("p", "p", 20 * GIB, T0, "g0")  # pinned: 22 of 40 GiB for good
    fill(ledger, "a", budget_gb=14)  # 16 GiB, sleeps: 38 of 40 held
    placed, _ = ledger.reserve("b", "b", 14 * GIB, T0, "g0", state="stopped", sleep=terms(14))
    assert placed.state == "stopped" and ledger.free_bytes()["g0"] == 2 * GIB
    with pytest.raises(ReservationError, match="model c needs"):
        ledger.reserve("c", "c", 17 * GIB, T0, "g0", state="stopped", sleep=terms(17))
    evicted = woken(ledger, "b", T0 + 1)
    # Asleep, a would keep 2.3 GiB and leave b 0.3 GiB short: it is stopped.
    assert [(e.replica_id, e.state) for e in evicted] == [("a", "stopped")]
    assert ledger.free_bytes()["g0"] == 2 * GIB


# -- the plan ------------------------------------------------------------------------------------


def test_a_plan_places_more_models_than_fit_awake_the_rest_start_stopped() -> None:
    inventory = Inventory.model_validate(
        {"nodes": [{"node": "n", "gpus": [{"index": 0, "uuid": "g0", "total_gb": 80}]}]}
    )
    models = [ModelSpec(model_id=f"m{i}", model="x", vram_gb=30, sleep=NAP) for i in range(4)]
    models.append(ModelSpec(model_id="pin", model="x", vram_gb=10, pinned=True))
    models.append(ModelSpec(model_id="huge", model="x", vram_gb=70, sleep=NAP))  # could never wake beside pin
    result = plan(inventory, models, settings=settings())
    states = {r.replica_id: r.state for r in result.reservations}
    assert states == {"pin-0": "awake", "m0-0": "awake", "m1-0": "awake", "m2-0": "stopped", "m3-0": "stopped"}
    assert all(r.sleep is not None for r in result.reservations if r.model_id != "pin")
    assert result.replicas_of("pin")[0].sleep is None
    assert [u.model_id for u in result.unplaced] == ["huge"]
    assert result.gpus[0].reserved_bytes == 12 * GIB + 2 * 32 * GIB  # stopped replicas hold nothing
    # Planned again against itself: everything kept, nothing new.
    again = plan(inventory, models, existing=result.reservations, settings=settings())
    assert not again.new and not again.release and len(again.kept) == 5


def test_models_that_do_not_sleep_stay_pending_as_before() -> None:
    inventory = Inventory.model_validate(
        {"nodes": [{"node": "n", "gpus": [{"index": 0, "uuid": "g0", "total_gb": 40}]}]}
    )
    models = [ModelSpec(model_id=f"m{i}", model="x", vram_gb=30) for i in range(2)]
    result = plan(inventory, models, settings=settings())
    assert [r.state for r in result.reservations] == ["awake"] and [u.model_id for u in result.unplaced] == ["m1"]


def test_status_shows_each_replica_awake_asleep_or_stopped() -> None:
    from rich.console import Console

    from vram_scheduler.sdk.display import render_vram

    ledger = ledger_with(80, max_asleep_per_gpu=1)
    fill(ledger, "a", "b", budget_gb=10)
    ledger.reserve("c", "c", 10 * GIB, T0, "g0", sleep=terms(10))
    put_to_sleep(ledger, "a", T0)
    put_to_sleep(ledger, "b", T0)  # past the GPU's one sleeper: stopped
    ledger.reserve("d", "d", 10 * GIB, T0, "g0", sleep=terms(10))
    ledger.sleep("d", T0)  # its engine not yet stopped
    console = Console(width=250, record=True)
    console.print(render_vram(ledger.state(T0)))
    text = console.export_text()
    assert "a 10.00+2.00 asleep L1, holds 2.30" in text and "b 10.00+2.00 stopped" in text
    assert "d 10.00+2.00 stopping, holds 12.00" in text
    assert "c 10.00+2.00" in text and "c 10.00+2.00 asleep" not in text and "c 10.00+2.00 stopped" not in text


# -- a replica's requests in flight ----------------------------------------------------------------


def test_a_replica_counts_its_http_requests_until_their_last_byte() -> None:
    """A stream still being written counts as in flight (its engine may be done with it): the idle
    timer and a sleep's drain wait for it. Only POSTs (the routed inference calls) count; one that
    fails is counted out too."""
    import asyncio

    from vram_scheduler.serving.replica.in_flight import RequestsInFlight

    async def scenario() -> list[int]:
        last_byte = asyncio.Event()

        async def app(scope: dict, receive: object, send: object) -> None:
            if scope["path"] == "/fails":
                raise RuntimeError("the app failed")
            await send({"type": "http.response.start", "status": 200, "headers": []})
            if scope["method"] == "POST":
                await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
                await last_byte.wait()
            await send({"type": "http.response.body", "body": b""})

        counted = RequestsInFlight(app)
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        seen = []
        stream = asyncio.create_task(counted({"type": "http", "method": "POST", "path": "/v1/completions"}, None, send))
        while len(sent) < 2:  # the first chunk is out
            await asyncio.sleep(0)
        seen.append(counted.count)
        await counted({"type": "http", "method": "GET", "path": "/v1/models"}, None, send)
        seen.append(counted.count)
        with pytest.raises(RuntimeError, match="the app failed"):
            await counted({"type": "http", "method": "POST", "path": "/fails"}, None, send)
        seen.append(counted.count)
        last_byte.set()
        await stream
        seen.append(counted.count)
        return seen

    assert asyncio.run(scenario()) == [1, 1, 1, 0]
