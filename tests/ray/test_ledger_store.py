"""The ledger's snapshot + journal in Ray's real GCS key-value store: replay, compaction, a
compaction cut short by a kill, a corrupt key, and the earlier whole-ledger format.

The store is driven from the test process (the KV is the cluster's, in a namespace of its own),
so each failure point is reached exactly; the allocator actor's own restarts are in
test_allocator*.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.experimental import internal_kv

from vram_scheduler.allocator.store import (
    JOURNAL_PREFIX,
    LEGACY_KEY,
    SNAPSHOT_KEY,
    LedgerStore,
    LedgerStoreError,
    forget_ledger,
    journal_key,
)
from vram_scheduler.core.config import GIB, PlacementSettings
from vram_scheduler.core.inventory import NodeInventory
from vram_scheduler.core.ledger import Ledger

pytestmark = pytest.mark.slow

NAMESPACE = "ray-vram-store-test"
T0 = 1_000.0


@pytest.fixture
def kv(cluster: Cluster) -> Iterator[str]:
    forget_ledger(NAMESPACE)
    yield NAMESPACE
    forget_ledger(NAMESPACE)


def keys() -> list[str]:
    return sorted(k.decode() for k in internal_kv._internal_kv_list("allocator/", namespace=NAMESPACE))


def busy_ledger() -> Ledger:
    ledger = Ledger()
    ledger.configure(PlacementSettings(replica_overhead_gb=0.5, stale_after_s=60))
    gpus = [{"index": i, "uuid": f"GPU-{i}", "total_gb": 80} for i in range(4)]
    ledger.update_inventory(NodeInventory.model_validate({"node": "n0", "gpus": gpus}), T0)
    return ledger


def churn(ledger: Ledger, store: LedgerStore, start: int, count: int) -> None:
    """Reserve `count` replicas (a multiple of 3) and release every third: one journal write per three."""
    for i in range(start, start + count):
        ledger.reserve(f"r-{i}", "m", GIB // 8, T0, owner=f"{i:032x}")
        if i % 3 == 2:
            ledger.release(f"r-{i - 1}")
            store.append(ledger.take_delta().model_dump_json())


def test_journal_and_compactions_rebuild_exactly_the_ledger(kv: str) -> None:
    store = LedgerStore(kv, compact_min_bytes=20_000)
    ledger = busy_ledger()
    store.append(ledger.take_delta().model_dump_json())
    churn(ledger, store, 0, 300)
    assert store.should_compact()  # the journal outgrew compact_min_bytes
    store.compact(ledger.take_snapshot())
    assert keys() == [SNAPSHOT_KEY]  # generation 0's journal is gone
    ledger.attach_process("r-0", 4242)
    churn(ledger, store, 300, 60)
    assert store.stats().generation == 1 and store.stats().journal_writes == 20
    reloaded_store = LedgerStore(kv)
    reloaded = reloaded_store.load()
    assert reloaded.data == ledger.data
    assert reloaded.state(T0) == ledger.state(T0)
    assert reloaded.reserved_bytes() == ledger.reserved_bytes() and reloaded.managed_pids() == {4242}
    loaded = reloaded_store.stats().loaded
    assert (loaded.source, loaded.journal_writes, loaded.reservations) == ("snapshot", 20, len(ledger.data.entries))
    assert reloaded.take_delta() is None  # nothing loaded is left to write
    reloaded_store.append("{}")  # the next write continues the journal
    assert [k for k in keys() if k.startswith(JOURNAL_PREFIX)][-1] == journal_key(1, 20)


def test_a_compaction_cut_short_leaves_a_journal_the_next_load_drops(kv: str) -> None:
    """Killed after the new snapshot was written but before the old journal was deleted."""
    store = LedgerStore(kv)
    ledger = busy_ledger()
    store.append(ledger.take_delta().model_dump_json())
    churn(ledger, store, 0, 30)
    old_journal = [k for k in keys() if k.startswith(JOURNAL_PREFIX)]
    snapshot = ledger.take_snapshot()
    internal_kv._internal_kv_put(SNAPSHOT_KEY, f'{{"generation":1,"ledger":{snapshot}}}', namespace=kv)
    assert len(old_journal) == 11 and keys() == sorted([*old_journal, SNAPSHOT_KEY])
    reloaded_store = LedgerStore(kv)
    assert reloaded_store.load().data == ledger.data
    assert reloaded_store.stats().loaded.stale_keys_deleted == 11
    assert keys() == [SNAPSHOT_KEY]


def test_a_journal_overlapping_its_snapshot_replays_to_the_same_ledger(kv: str) -> None:
    """The snapshot may already hold changes its journal repeats (deltas hold values, not operations)."""
    store = LedgerStore(kv)
    ledger = busy_ledger()
    store.append(ledger.take_delta().model_dump_json())
    churn(ledger, store, 0, 30)
    internal_kv._internal_kv_put(SNAPSHOT_KEY, f'{{"generation":0,"ledger":{ledger.dumps()}}}', namespace=kv)
    assert LedgerStore(kv).load().data == ledger.data


def test_a_corrupt_journal_key_is_named(kv: str) -> None:
    store = LedgerStore(kv)
    ledger = busy_ledger()
    store.append(ledger.take_delta().model_dump_json())
    internal_kv._internal_kv_put(journal_key(0, 1), '{"entries": {"x": {"owner": 3}}}', namespace=kv)
    named = r"'allocator/journal/00000000/0000000001' \(namespace ray-vram-store-test, \d+ bytes\) is not a valid"
    with pytest.raises(LedgerStoreError, match=named):
        LedgerStore(kv).load()


def test_the_earlier_whole_ledger_key_loads_and_goes_at_the_first_compaction(kv: str) -> None:
    ledger = busy_ledger()
    ledger.reserve("old-0", "m", GIB, T0)
    internal_kv._internal_kv_put(LEGACY_KEY, ledger.dumps(), namespace=kv)
    store = LedgerStore(kv)
    loaded = store.load()
    assert loaded.data == ledger.data and store.stats().loaded.source == "legacy"
    loaded.reserve("new-0", "m", GIB, T0)
    store.append(loaded.take_delta().model_dump_json())  # a journal on top of the legacy key
    assert LedgerStore(kv).load().data == loaded.data
    assert store.should_compact()  # converting the legacy key is due at once
    store.compact(loaded.take_snapshot())
    assert keys() == [SNAPSHOT_KEY]
    assert LedgerStore(kv).load().data == loaded.data


def test_nothing_persisted_loads_an_empty_ledger(kv: str) -> None:
    store = LedgerStore(kv)
    assert store.load().data == Ledger().data
    assert store.stats().loaded.source == "empty"
    assert ray.is_initialized()
