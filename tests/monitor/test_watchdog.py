"""Watchdog and process attribution on plain data (and this machine's real /proc)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vram_scheduler.core.config import gib_to_bytes
from vram_scheduler.core.inventory import NodeInventory
from vram_scheduler.monitor.command import add_arguments
from vram_scheduler.monitor.pids import ProcessMatcher
from vram_scheduler.monitor.service import MonitorSettings
from vram_scheduler.monitor.watchdog import ReplicaBudget, ReplicaUsage, Watchdog, measure

GIB = 1024**3


def usage(replica_id: str, used: int, budget: int = 4 * GIB, overhead: int = 0) -> ReplicaUsage:
    return ReplicaUsage(ReplicaBudget(replica_id, "m", "GPU-a", budget, (1,), None, overhead), "n", 0, used)


def test_flags_after_n_polls_over_margin_once_per_episode() -> None:
    watchdog = Watchdog(margin_bytes=GIB // 2, polls=3)
    at_margin = 4 * GIB + GIB // 2
    over = at_margin + 1
    assert watchdog.observe([usage("r", at_margin)]) == [], "exactly budget + margin is allowed"
    assert watchdog.observe([usage("r", over)]) == []
    assert watchdog.observe([usage("r", over)]) == []
    (violation,) = watchdog.observe([usage("r", over), usage("ok", GIB)])
    assert violation.usage.replica.replica_id == "r" and violation.excess_bytes == GIB // 2 + 1
    assert (
        "replica r of model m on node n, GPU 0 uses 4.50 GiB against a reservation of 4.00 GiB "
        "(4.00 GiB budget + 0.00 GiB overhead)" in violation.describe()
    )
    assert watchdog.observe([usage("r", over)]) == [], "still the same episode"
    assert watchdog.observe([usage("r", GIB)]) == [] and watchdog.streak("r") == 0
    for _ in range(2):
        assert watchdog.observe([usage("r", over)]) == []
    assert len(watchdog.observe([usage("r", over)])) == 1, "a new episode is flagged again"


def test_a_replica_within_its_own_reservation_passes_whatever_its_overhead() -> None:
    """The watchdog judges use against each replica's reservation (budget + the overhead the
    allocator records for it), with no margin by default: an operator's larger overhead is honoured."""
    assert MonitorSettings(node="n").watchdog_margin_bytes == 0
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).watchdog_margin_gb == 0
    watchdog = Watchdog(MonitorSettings(node="n").watchdog_margin_bytes, polls=1)
    for overhead in (gib_to_bytes(2.1), gib_to_bytes(2.4), gib_to_bytes(5)):
        # Real vLLM replicas peak 1.1 to 1.9 GiB over their budget under load: inside budget + overhead.
        assert watchdog.observe([usage("r", 4 * GIB + gib_to_bytes(1.86), overhead=overhead)]) == []
        assert watchdog.observe([usage("r", 4 * GIB + overhead, overhead=overhead)]) == [], "the whole reservation"
        (flagged,) = watchdog.observe([usage("r", 4 * GIB + overhead + 1, overhead=overhead)])
        assert flagged.excess_bytes == 1, "beyond the reservation is flagged"
        watchdog.observe([])


def test_a_replica_that_leaves_forgets_its_streak() -> None:
    watchdog = Watchdog(margin_bytes=0, polls=2)
    watchdog.observe([usage("r", 5 * GIB)])
    watchdog.observe([])
    assert watchdog.streak("r") == 0
    assert watchdog.observe([usage("r", 5 * GIB)]) == []


@pytest.mark.parametrize(("margin", "polls"), [(-1, 3), (0, 0)])
def test_invalid_settings_are_refused(margin: int, polls: int) -> None:
    with pytest.raises(ValueError, match="watchdog"):
        Watchdog(margin, polls)


@given(st.lists(st.booleans(), max_size=60), st.integers(min_value=1, max_value=5))
def test_violations_equal_episodes_at_least_n_long(overs: list[bool], polls: int) -> None:
    watchdog = Watchdog(margin_bytes=0, polls=polls)
    flagged = sum(len(watchdog.observe([usage("r", 5 * GIB if over else GIB)])) for over in overs)
    runs, current = [], 0
    for over in [*overs, False]:
        if over:
            current += 1
        else:
            runs.append(current)
            current = 0
    assert flagged == sum(1 for run in runs if run >= polls)


def node(processes: list[dict], used: int = 20 * GIB) -> NodeInventory:
    return NodeInventory.model_validate(
        {
            "node": "n",
            "gpus": [
                {"index": 0, "uuid": "GPU-a", "total_bytes": 80 * GIB, "used_bytes": used, "processes": processes},
                {"index": 1, "uuid": "GPU-b", "total_bytes": 80 * GIB},
            ],
        }
    )


def test_measure_attributes_child_processes_to_the_registered_parent() -> None:
    """vLLM's engine core is a child of the replica: its memory is the replica's (real /proc)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        inventory = node([{"pid": child.pid, "used_bytes": 6 * GIB}, {"pid": 4000009, "used_bytes": GIB}])
        replicas = [
            ReplicaBudget("r-0", "m", "GPU-a", 8 * GIB, (os.getpid(),)),
            ReplicaBudget("idle-0", "m", "GPU-b", 2 * GIB),
        ]
        usages, managed = measure(inventory, replicas, ProcessMatcher())
    finally:
        child.kill()
        child.wait()
    by_id = {u.replica.replica_id: u for u in usages}
    assert by_id["r-0"].used_bytes == 6 * GIB and by_id["r-0"].pids == (child.pid,)
    assert by_id["idle-0"].used_bytes == 0 and by_id["idle-0"].gpu_index == 1
    assert managed == {"GPU-a": 6 * GIB, "GPU-b": 0}


def test_pid_namespaces_map_container_pids_to_host_pids(tmp_path: Path) -> None:
    """NVML reports host pids; a replica in a pod registers its pid inside the pod (NSpid's last)."""
    for pid, ppid, nspid in ((91000, 90000, "91000\t7"), (90000, 1, "90000\t1"), (92000, 1, "92000")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "status").write_text(f"Name:\tx\nPPid:\t{ppid}\nNSpid:\t{nspid}\n")
    matcher = ProcessMatcher(tmp_path)
    assert matcher.identities(91000) == (91000, 90000, 7)
    assert matcher.owner(91000, {7: "pod-replica"}) == "pod-replica"
    assert matcher.owner(91000, {90000: "parent", 7: "pod-replica"}) == "parent", "host ancestry first"
    assert matcher.owner(92000, {7: "pod-replica"}) is None
    assert matcher.owner(4000010, {4000010: "exact"}) == "exact", "an unreadable pid still matches itself"
    matcher.forget_except([92000])
    assert set(matcher._cache) == {92000}
