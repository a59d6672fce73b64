"""The capacity arithmetic (`capacity`): reservation, cap, overheads and verdicts, on any input."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vram_scheduler.core import capacity
from vram_scheduler.core.config import GIB, ModelSpec, PlacementSettings, gib_to_bytes

sizes = st.integers(min_value=0, max_value=200 * GIB)
budgets = st.integers(min_value=1, max_value=200 * GIB)
overheads = st.integers(min_value=0, max_value=16 * GIB)
gbs = st.floats(min_value=0, max_value=16, allow_nan=False).map(lambda x: round(x, 3))

#: Peak under load minus budget as measured (H100, vLLM 0.26, under MPS; docs/benchmarks.md "Budgets on a GPU"):
#: (GiB of weights, largest peak over budget seen).
MEASURED = [(2.7, 1.31), (10.6, 1.86), (20.5, 1.81)]


def spec(overhead_gb: float | None = None) -> ModelSpec:
    return ModelSpec(model_id="m", model="/models/m", vram_gb=4, overhead_gb=overhead_gb)


@given(budgets, overheads, sizes)
def test_the_cap_is_the_reservation_never_above_the_device(budget: int, overhead: int, total: int) -> None:
    cap = capacity.cap_bytes(budget, overhead, total)
    assert cap == min(capacity.reservation_bytes(budget, overhead), total)
    assert capacity.reservation_bytes(budget, overhead) == budget + overhead


@given(sizes, budgets, overheads)
def test_within_reservation_exactly_when_use_is_at_or_under_budget_plus_overhead(
    used: int, budget: int, overhead: int
) -> None:
    verdict = capacity.verdict(used, budget, overhead)
    headroom = capacity.headroom_bytes(used, budget, overhead)
    assert (verdict == "within reservation") == (used <= budget + overhead) == (headroom >= 0)
    # use over the budget alone is within reservation as long as the overhead covers it
    assert capacity.verdict(budget + overhead, budget, overhead) == "within reservation"
    assert capacity.verdict(budget + overhead + 1, budget, overhead) == "over reservation"


@given(st.integers(min_value=1, max_value=400 * GIB), st.integers(min_value=1, max_value=400 * GIB))
def test_the_derived_overhead_grows_with_the_weights_then_levels_off(a: int, b: int) -> None:
    small, large = sorted((a, b))
    assert capacity.derived_overhead_bytes(small) <= capacity.derived_overhead_bytes(large)
    assert capacity.derived_overhead_bytes(large) <= gib_to_bytes(capacity.DEFAULT_OVERHEAD_GB)
    derived = capacity.derived_overhead_bytes(small)
    assert derived >= capacity.uncounted_bytes(small) + gib_to_bytes(capacity.MARGIN_GB)
    steps = derived / GIB / capacity.OVERHEAD_STEP_GB
    assert abs(steps - round(steps)) < 1e-6  # a multiple of the step


def test_every_measured_size_keeps_the_margin_under_its_derived_overhead() -> None:
    for weights_gb, peak_over in MEASURED:
        derived = capacity.derived_overhead_bytes(gib_to_bytes(weights_gb))
        assert derived - gib_to_bytes(peak_over) >= gib_to_bytes(capacity.MARGIN_GB), weights_gb
    # an unknown size gets the plateau plus the margin: enough for every size measured
    assert capacity.derived_overhead_bytes(None) == gib_to_bytes(capacity.DEFAULT_OVERHEAD_GB)
    assert all(gib_to_bytes(capacity.DEFAULT_OVERHEAD_GB - peak) >= gib_to_bytes(0.5) for _, peak in MEASURED)


@given(st.one_of(st.none(), gbs), st.one_of(st.none(), gbs), st.one_of(st.none(), sizes))
def test_the_overhead_comes_from_the_model_then_the_cluster_then_the_weights_then_the_default(
    own: float | None, cluster: float | None, weights: int | None
) -> None:
    found = capacity.resolve_overhead(spec(own), PlacementSettings(replica_overhead_gb=cluster), weights)
    if own is not None:
        assert (found.source, found.bytes) == ("model", gib_to_bytes(own))
    elif cluster is not None:
        assert (found.source, found.bytes) == ("placement", gib_to_bytes(cluster))
    elif weights:
        assert (found.source, found.bytes) == ("weights", capacity.derived_overhead_bytes(weights))
        size = f"{weights / GIB:.2f} GiB" if weights >= GIB else f"{weights / 2**20:.1f} MiB"
        assert found.describe() == f"derived from {size} of weights"
    else:
        assert (found.source, found.bytes) == ("default", gib_to_bytes(capacity.DEFAULT_OVERHEAD_GB))
    assert found.describe()


@given(st.one_of(st.none(), overheads), st.one_of(st.none(), gbs))
def test_a_reservation_without_its_own_overhead_gets_the_clusters(held: int | None, cluster: float | None) -> None:
    settings = PlacementSettings(replica_overhead_gb=cluster)
    got = capacity.held_overhead(held, settings)
    if held is not None:
        assert got == held
    else:
        assert got == gib_to_bytes(capacity.DEFAULT_OVERHEAD_GB if cluster is None else cluster)
        assert got == capacity.placement_overhead_bytes(settings)


@given(st.integers(min_value=-4 * GIB, max_value=16 * GIB))
def test_the_recommended_overhead_covers_the_peak_with_the_margin(peak_over: int) -> None:
    gb = capacity.recommend_overhead_gb(peak_over)
    assert gib_to_bytes(gb) >= max(0, peak_over) + gib_to_bytes(capacity.MARGIN_GB) - 1024  # to the KiB
    assert gib_to_bytes(gb) < max(0, peak_over) + gib_to_bytes(capacity.MARGIN_GB + capacity.OVERHEAD_STEP_GB) + 1
    assert spec(gb).overhead_gb == gb  # a value a models entry takes


@given(sizes, overheads)
def test_the_room_for_a_budget_leaves_the_overhead(free: int, overhead: int) -> None:
    room = capacity.budget_room(free, overhead)
    assert capacity.reservation_bytes(room, overhead) == free
