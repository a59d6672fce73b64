"""The planner: per-GPU packing rules, reasons, and properties over random clusters (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vram_scheduler.core.capacity import DEFAULT_OVERHEAD_GB
from vram_scheduler.core.config import GIB, ModelSpec, PlacementSettings, gib_to_bytes
from vram_scheduler.core.inventory import GPUInfo, Inventory, NodeInventory
from vram_scheduler.core.planner import Plan, Reservation, plan

NO_OVERHEAD = PlacementSettings(replica_overhead_gb=0)
TWO_GIB = PlacementSettings(replica_overhead_gb=2)
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gpu(index: int, total_gb: float, used_gb: float = 0, name: str = "GPU", **extra: object) -> dict[str, object]:
    return {"index": index, "uuid": f"U{index}", "name": name, "total_gb": total_gb, "used_gb": used_gb} | extra


def inventory(*nodes: tuple[str, list[dict[str, object]]]) -> Inventory:
    fixed = []
    for name, gpus in nodes:
        fixed.append({"node": name, "gpus": [g | {"uuid": f"{name}-{g['uuid']}"} for g in gpus]})
    return Inventory.model_validate({"nodes": fixed})


def spec(model_id: str, vram_gb: float, **fields: object) -> ModelSpec:
    return ModelSpec(model_id=model_id, model="org/x", vram_gb=vram_gb, **fields)


def placed_on(result: Plan) -> dict[str, str]:
    return {r.replica_id: r.gpu_uuid for r in result.reservations}


# -- rules ---------------------------------------------------------------------------------------


def test_capacity_is_per_gpu_never_per_node() -> None:
    inv = inventory(("n", [gpu(0, 16), gpu(1, 16)]))
    result = plan(inv, [spec("big", 20)], settings=NO_OVERHEAD)
    assert result.new == []
    (unplaced,) = result.unplaced
    assert unplaced.largest_free_bytes == 16 * GIB
    assert "more than any GPU holds: the largest is 16.00 GiB" in unplaced.reason


def test_best_fit_keeps_the_big_hole_for_the_big_replica() -> None:
    inv = inventory(("n", [gpu(0, 80), gpu(1, 12)]))
    first = plan(inv, [spec("small", 10)], settings=NO_OVERHEAD)
    assert placed_on(first) == {"small-0": "n-U1"}
    models = [spec("small", 10), spec("large", 75)]
    assert placed_on(plan(inv, models, existing=first.reservations, settings=NO_OVERHEAD))["large-0"] == "n-U0"


def test_several_replicas_share_a_gpu_with_overhead_counted() -> None:
    inv = inventory(("n", [gpu(0, 24, used_gb=1)]))
    # With a 2 GiB overhead: 4 × (3.75 + 2) = 23 fills the 23 GiB left to the byte; a 5th does not fit.
    result = plan(inv, [spec("m", 3.75, replicas=5)], settings=TWO_GIB)
    assert len(result.new) == 4
    (g,) = result.gpus
    assert g.unmanaged_bytes == gib_to_bytes(1)
    assert g.reserved_bytes == 4 * gib_to_bytes(5.75)
    assert g.free_bytes == 0
    (unplaced,) = result.unplaced
    assert unplaced.count == 1 and "short by 5.75 GiB" in unplaced.reason


def test_shortfall_reason_names_model_need_largest_slot_and_where() -> None:
    inv = inventory(("a", [gpu(0, 24)]), ("b", [gpu(0, 12, used_gb=2)]))
    result = plan(inv, [spec("m", 8.75, replicas=4)], settings=TWO_GIB)  # 8.75 + 2 GiB overhead: 2 fit on a, none on b
    (unplaced,) = result.unplaced
    assert unplaced.count == 2
    assert unplaced.reason == (
        "2 replicas of model m need 10.75 GiB per replica (8.75 GiB budget + 2.00 GiB overhead); "
        "the largest free slot is 10.00 GiB on node b, GPU 0 (short by 0.75 GiB)"
    )
    assert (unplaced.largest_free_gpu, unplaced.largest_free_bytes) == ("node b, GPU 0", 10 * GIB)


def test_too_big_for_any_gpu_is_told_apart_from_no_room_now() -> None:
    """A replica larger than every GPU needs a bigger GPU (naming the largest); one that fits an empty
    GPU but finds no room now waits for room. An unhealthy GPU large enough still counts as one."""
    inv = inventory(("a", [gpu(0, 24, name="RTX 4090"), gpu(1, 16)]), ("b", [gpu(0, 24, used_gb=20, name="RTX 4090")]))
    result = plan(inv, [spec("huge", 30), spec("fill", 20), spec("wait", 20)], settings=NO_OVERHEAD)
    by_model = {u.model_id: u for u in result.unplaced}
    assert sorted(by_model) == ["huge", "wait"]
    huge, wait = by_model["huge"], by_model["wait"]
    assert huge.too_big and huge.largest_gpu == "RTX 4090, 24.00 GiB on node a, GPU 0"
    assert huge.reason.endswith(
        "more than any GPU holds: the largest is 24.00 GiB (RTX 4090) on node a, GPU 0; "
        "it needs a bigger GPU, not a free one"
    )
    assert not wait.too_big and "the largest free slot is 16.00 GiB on node a, GPU 1 (short by 4.00 GiB)" in wait.reason
    sick = inventory(("a", [gpu(0, 40, healthy=False), gpu(1, 16)]))
    (unplaced,) = plan(sick, [spec("m", 30)], settings=NO_OVERHEAD).unplaced
    assert not unplaced.too_big and unplaced.largest_gpu == "GPU, 40.00 GiB on node a, GPU 0"


def test_gpu_type_restricts_and_explains() -> None:
    inv = inventory(("n", [gpu(0, 80, name="NVIDIA H100"), gpu(1, 24, name="RTX 4090")]))
    result = plan(inv, [spec("m", 10, gpu_type="h100"), spec("x", 1, gpu_type="A100")], settings=NO_OVERHEAD)
    assert placed_on(result) == {"m-0": "n-U0"}
    (unplaced,) = result.unplaced
    assert "no GPU matches gpu_type 'A100' (GPUs: NVIDIA H100, RTX 4090)" in unplaced.reason


def test_unhealthy_gpus_and_excluded_nodes_take_nothing_new() -> None:
    inv = inventory(("a", [gpu(0, 80, healthy=False)]), ("b", [gpu(0, 80)]))
    result = plan(inv, [spec("m", 10)], excluded_nodes=frozenset({"b"}))
    (unplaced,) = result.unplaced
    assert "every matching GPU is unhealthy or on a stale node (b)" in unplaced.reason


def test_managed_pids_are_not_unmanaged_usage() -> None:
    inv = Inventory(
        nodes=[
            NodeInventory(
                node="n",
                gpus=[
                    GPUInfo(
                        index=0,
                        uuid="G",
                        total_bytes=20 * GIB,
                        used_bytes=12 * GIB,
                        processes=[{"pid": 7, "used_bytes": 10 * GIB}, {"pid": 8, "used_bytes": 2 * GIB}],
                    )
                ],
            )
        ]
    )
    held = Reservation(replica_id="m-0", model_id="m", node="n", gpu_uuid="G", gpu_index=0, bytes=10 * GIB)
    models = [spec("m", 10, replicas=2)]
    unmanaged_view = plan(inv, models, existing=[held], settings=NO_OVERHEAD)
    assert unmanaged_view.gpus[0].unmanaged_bytes == 12 * GIB and len(unmanaged_view.new) == 0
    managed_view = plan(inv, models, existing=[held], settings=NO_OVERHEAD, managed_pids=frozenset({7}))
    assert managed_view.gpus[0].unmanaged_bytes == 2 * GIB
    assert [r.replica_id for r in managed_view.new] == []  # 20 - 2 - 10 = 8 < 10
    assert managed_view.gpus[0].free_bytes == 8 * GIB


def test_release_list_for_removed_changed_and_reduced_models() -> None:
    inv = inventory(("n", [gpu(0, 80)]))
    first = plan(inv, [spec("a", 5, replicas=3), spec("b", 5), spec("c", 5)], settings=NO_OVERHEAD)
    second = plan(inv, [spec("a", 5, replicas=1), spec("b", 6)], existing=first.reservations, settings=NO_OVERHEAD)
    assert [r.replica_id for r in second.release] == ["b-0", "c-0", "a-2", "a-1"]
    assert [r.replica_id for r in second.kept] == ["a-0"]
    assert [r.replica_id for r in second.new] == ["b-0"]


def test_a_plan_for_some_models_keeps_the_room_other_models_hold() -> None:
    """keep_others (one Serve application's models, beside the controller's or another
    application's): other models' reservations are used room, neither kept nor released."""
    inv = inventory(("n", [gpu(0, 12), gpu(1, 4)]))
    cluster = plan(inv, [spec("alpha", 1.5, replicas=2), spec("beta", 1.5, replicas=2)], settings=TWO_GIB)
    assert placed_on(cluster) == {"alpha-0": "n-U1", "alpha-1": "n-U0", "beta-0": "n-U0", "beta-1": "n-U0"}
    solo = [spec("solo", 1.5)]
    whole = plan(inv, solo, existing=cluster.reservations, settings=TWO_GIB)  # as if solo were all there is
    assert placed_on(whole) == {"solo-0": "n-U1"} and len(whole.release) == 4  # alpha-0's room
    beside = plan(inv, solo, existing=cluster.reservations, keep_others=True, settings=TWO_GIB)
    assert beside.new == [] and beside.kept == [] and beside.release == []
    assert [u.model_id for u in beside.unplaced] == ["solo"]
    assert "largest free slot is 1.50 GiB" in beside.unplaced[0].reason
    assert [g.replicas for g in beside.gpus] == [["alpha-1", "beta-0", "beta-1"], ["alpha-0"]]
    # Its own reservations are kept as ever; a gone GPU's reservation of another model is ignored.
    held = plan(inv, [spec("alpha", 1.5, replicas=2)], existing=cluster.reservations, keep_others=True)
    assert held.kept == cluster.replicas_of("alpha") and held.new == [] and held.release == []
    gone = Reservation(replica_id="x-0", model_id="x", node="m", gpu_uuid="m-U0", gpu_index=0, bytes=GIB)
    assert plan(inv, solo, existing=[gone], keep_others=True).release == []


def test_max_replicas_fills_and_fixed_models_go_first() -> None:
    inv = inventory(("n", [gpu(0, 24), gpu(1, 16)]))
    result = plan(inv, [spec("fill", 4, max_replicas=True), spec("fixed", 14)], settings=NO_OVERHEAD)
    assert placed_on(result)["fixed-0"] == "n-U1"
    assert len(result.replicas_of("fill")) == 6  # 24 // 4 on GPU 0; 2 GiB left on GPU 1
    assert result.complete


def test_max_replicas_with_no_room_at_all_is_reported_once() -> None:
    inv = inventory(("n", [gpu(0, 8)]))
    result = plan(inv, [spec("fixed", 7), spec("fill", 2, max_replicas=True)], settings=NO_OVERHEAD)
    (unplaced,) = result.unplaced
    assert (unplaced.model_id, unplaced.count) == ("fill", 1)


def test_replica_numbers_fill_gaps_left_by_released_replicas() -> None:
    inv = inventory(("n", [gpu(0, 80)]))
    held = [
        Reservation(replica_id=f"m-{i}", model_id="m", node="n", gpu_uuid="n-U0", gpu_index=0, bytes=GIB)
        for i in (0, 2)
    ]
    result = plan(inv, [spec("m", 1, replicas=4)], existing=held, settings=NO_OVERHEAD)
    assert sorted(r.replica_id for r in result.new) == ["m-1", "m-3"]


def test_kept_replicas_count_even_without_a_number_suffix() -> None:
    inv = inventory(("n", [gpu(0, 80)]))
    held = [
        Reservation(replica_id=name, model_id="m", node="n", gpu_uuid="n-U0", gpu_index=0, bytes=GIB)
        for name in ("first", "second")
    ]
    result = plan(inv, [spec("m", 1, replicas=3)], existing=held, settings=NO_OVERHEAD)
    assert [r.replica_id for r in result.kept] == ["first", "second"]
    assert [r.replica_id for r in result.new] == ["m-0"]


def test_shortage_never_starves_a_model_for_more_small_replicas() -> None:
    inv = inventory(("n", [gpu(0, 24)]))
    result = plan(inv, [spec("big", 20), spec("small", 2, replicas=12)], settings=NO_OVERHEAD)
    # Twelve small replicas would be more replicas, but every model gets its first one first.
    assert sorted(r.replica_id for r in result.new) == ["big-0", "small-0", "small-1"]
    assert [(u.model_id, u.count) for u in result.unplaced] == [("small", 10)]


def test_the_order_that_places_more_wins() -> None:
    # Round-robin, largest first, fits 6 of these 7 (it mixes sizes on both GPUs and strands
    # 4 + 6.5 GiB); filling GPU by GPU puts 3 × 7.5 on one and 7.5 + 3 × 5 on the other.
    inv = inventory(("n", [gpu(0, 24), gpu(1, 24)]))
    result = plan(inv, [spec("a", 7.5, replicas=4), spec("b", 5, replicas=3)], settings=NO_OVERHEAD)
    assert result.complete, [u.reason for u in result.unplaced]
    assert sorted(g.free_bytes for g in result.gpus) == [int(1.5 * GIB), int(1.5 * GIB)]


def test_empty_inventory_says_so() -> None:
    result = plan(Inventory(), [spec("m", 1)])
    assert result.unplaced[0].reason == "1 replica of model m cannot be placed: the inventory has no GPUs"


# -- properties over random clusters ---------------------------------------------------------------

GPU_NAMES = ["NVIDIA H100", "NVIDIA A10", "RTX 4090", "L4"]


@st.composite
def clusters(draw: st.DrawFn) -> Inventory:
    nodes = []
    for n in range(draw(st.integers(1, 4))):
        gpus = []
        for index in range(draw(st.integers(1, 4))):
            total = draw(st.integers(8, 80)) * GIB
            used = draw(st.integers(0, total // (4 * 1024**2))) * 1024**2 if draw(st.booleans()) else 0
            processes = [{"pid": 1000 + 10 * n + index, "used_bytes": used}] if used else []
            gpus.append(
                {
                    "index": index,
                    "uuid": f"GPU-{n}-{index}",
                    "name": draw(st.sampled_from(GPU_NAMES)),
                    "total_bytes": total,
                    "used_bytes": used,
                    "processes": processes,
                    "healthy": draw(st.booleans()) or draw(st.booleans()) or draw(st.booleans()),
                }
            )
        nodes.append({"node": f"node-{n}", "gpus": gpus})
    return Inventory.model_validate({"nodes": nodes})


@st.composite
def model_mixes(draw: st.DrawFn) -> list[ModelSpec]:
    models = []
    for i in range(draw(st.integers(1, 4))):
        vram = draw(st.integers(1, 60)) / 2  # 0.5 .. 30 GiB
        gpu_type = draw(st.sampled_from([None, None, None, "h100", "4090"]))
        if draw(st.integers(0, 4)) == 0:
            models.append(spec(f"m{i}", vram, max_replicas=True, gpu_type=gpu_type))
        else:
            models.append(spec(f"m{i}", vram, replicas=draw(st.integers(1, 8)), gpu_type=gpu_type))
    return models


overheads = st.sampled_from([0.0, 0.5, DEFAULT_OVERHEAD_GB, 1.25])


def fits(model: ModelSpec, gpu_plan_free: int, overhead_gb: float) -> bool:
    return model.vram_bytes + gib_to_bytes(overhead_gb) <= gpu_plan_free


def eligible(model: ModelSpec, name: str) -> bool:
    return model.gpu_type is None or model.gpu_type.lower() in name.lower()


def check_no_overcommit(inv: Inventory, result: Plan, overhead_gb: float) -> None:
    overhead = gib_to_bytes(overhead_gb)
    load: dict[str, int] = {}
    for r in result.reservations:
        load[r.gpu_uuid] = load.get(r.gpu_uuid, 0) + r.bytes + overhead
    for g in inv.gpus:
        assert g.unmanaged_bytes() + load.get(g.uuid, 0) <= g.total_bytes, g.label
    for gp in result.gpus:
        assert gp.free_bytes == gp.total_bytes - gp.unmanaged_bytes - gp.reserved_bytes >= 0


@PROPERTY
@given(clusters(), model_mixes(), overheads)
def test_no_gpu_over_total_and_deterministic(inv: Inventory, models: list[ModelSpec], overhead_gb: float) -> None:
    cfg = PlacementSettings(replica_overhead_gb=overhead_gb)
    result = plan(inv, models, settings=cfg)
    check_no_overcommit(inv, result, overhead_gb)
    assert plan(inv, models, settings=cfg).model_dump() == result.model_dump()
    # The order models are listed in does not change the plan either.
    assert plan(inv, list(reversed(models)), settings=cfg).model_dump() == result.model_dump()
    # Only healthy GPUs receive replicas, and only GPUs of the requested type.
    by_uuid = {g.uuid: g for g in inv.gpus}
    specs = {m.model_id: m for m in models}
    for r in result.new:
        assert by_uuid[r.gpu_uuid].healthy
        assert eligible(specs[r.model_id], by_uuid[r.gpu_uuid].name)


@PROPERTY
@given(clusters(), model_mixes(), overheads)
def test_unplaced_replicas_really_fit_nowhere(inv: Inventory, models: list[ModelSpec], overhead_gb: float) -> None:
    result = plan(inv, models, settings=PlacementSettings(replica_overhead_gb=overhead_gb))
    healthy = {g.uuid for g in inv.gpus if g.healthy}
    specs = {m.model_id: m for m in models}
    for unplaced in result.unplaced:
        model = specs[unplaced.model_id]
        for gp in result.gpus:
            if gp.uuid in healthy and eligible(model, gp.name):
                assert not fits(model, gp.free_bytes, overhead_gb), (unplaced.reason, gp)
        wanted = 1 if model.max_replicas else model.replicas
        assert len(result.replicas_of(model.model_id)) + unplaced.count == wanted
    for model in models:
        if not model.max_replicas and not any(u.model_id == model.model_id for u in result.unplaced):
            assert len(result.replicas_of(model.model_id)) == model.replicas


@PROPERTY
@given(clusters(), model_mixes(), overheads)
def test_max_replicas_leaves_no_room_for_another(inv: Inventory, models: list[ModelSpec], overhead_gb: float) -> None:
    result = plan(inv, models, settings=PlacementSettings(replica_overhead_gb=overhead_gb))
    healthy = {g.uuid for g in inv.gpus if g.healthy}
    for model in models:
        if model.max_replicas:
            for gp in result.gpus:
                if gp.uuid in healthy and eligible(model, gp.name):
                    assert not fits(model, gp.free_bytes, overhead_gb), (model.model_id, gp)


@PROPERTY
@given(clusters(), model_mixes(), model_mixes(), overheads)
def test_replanning_never_moves_a_placed_replica(
    inv: Inventory, models: list[ModelSpec], changes: list[ModelSpec], overhead_gb: float
) -> None:
    cfg = PlacementSettings(replica_overhead_gb=overhead_gb)
    first = plan(inv, models, settings=cfg)
    # Second round: some models unchanged, some with new replica counts or budgets, some added.
    changed = {m.model_id: m for m in models} | {m.model_id: m for m in changes[:1]}
    second = plan(inv, list(changed.values()), existing=first.reservations, settings=cfg)
    check_no_overcommit(inv, second, overhead_gb)
    before = {r.replica_id: r for r in first.reservations}
    for r in second.kept:
        assert before[r.replica_id] == r, "a placed replica moved"
    released = {r.replica_id for r in second.release}
    kept = {r.replica_id for r in second.kept}
    assert kept | released == set(before) and not kept & released
    # An unchanged model keeps every replica it had.
    for model in models:
        if changed[model.model_id] == model:
            assert {r.replica_id for r in first.replicas_of(model.model_id)} <= kept
    # Re-planning the same input changes nothing.
    again = plan(inv, list(changed.values()), existing=second.reservations, settings=cfg)
    if second.complete:
        assert again.new == [] and again.release == []
