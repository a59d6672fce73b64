"""Load held: the 2-minute soak (`python -m bench.soak --minutes 2`) — `ray-vram up` with two steady
models under concurrency 8 while a model is added and removed by whole-values applies — must
lose no request of the steady models, serve and then fully remove the added one, and keep every
router's and the controller's memory from growing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vram_scheduler.core.config import ServingSettings
from vram_scheduler.serving.options import router_names

ROOT = Path(__file__).resolve().parents[2]
#: RSS growth allowed over the 2 minutes. This machine answers 1,000-3,600 requests in them (as
#: busy as it is), so a leak of 100-300 KiB or more per request crosses it; the one-off growth a
#: correct stack shows (the router's handle and connections for `extra`, caches warming up) was
#: about 10 MiB per process in the runs so far. Smaller leaks are for the 10-minute soak's trend.
LEAK_GUARD_MIB = 300

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("soak")
    results = work / "soak.json"
    command = [sys.executable, "-m", "bench.soak", "--minutes", "2", "--results", str(results), "--work", str(work)]
    done = subprocess.run(command, cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=840)
    print(done.stdout[-6000:])
    assert results.exists(), f"no results (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(results.read_text())
    assert done.returncode == 0, result["table"]
    return result


def test_steady_models_lose_no_request(soak: dict) -> None:
    for model in soak["steady_models"]:
        row = soak["models"][model]
        assert row["ok"] > 0, model
        assert row["failed"] == 0, (model, row["failures"], row["failure_examples"])
        # Every shape was exercised: completions and chat, streamed and not.
        assert set(row["by_shape"]) == {"completions", "completions stream", "chat", "chat stream"}


def test_extra_added_answered_and_removed(soak: dict) -> None:
    add, remove = soak["events"]
    steady = sorted(soak["steady_models"])
    assert add["result"]["deployed"] == ["extra"] and sorted(add["result"]["kept"]) == steady
    assert "extra" in add["listed"] and "extra" in add["reserved"]
    assert soak["models"]["extra"]["ok"] > 0
    assert remove["result"]["removed"] == ["extra"] and sorted(remove["result"]["kept"]) == steady
    assert "extra" not in remove["listed"]
    assert "extra" not in remove["reserved"]
    assert soak["extra_status_after_removal"] == 404


def test_router_and_controller_memory_flat(soak: dict) -> None:
    routers = [f"router {name}" for name in router_names(ServingSettings().router_replicas)]  # the soak's values
    assert [role for role in soak["memory"] if role.startswith("router")] == routers, soak["memory"]
    for role in (*routers, "controller"):
        memory = soak["memory"][role]
        assert memory["samples"] >= 6, (role, memory)  # every 10 s over at least 2 minutes
        assert len(memory["pids"]) == 1, (role, memory)  # found, and never replaced
        assert memory["rss_end_mib"] < memory["rss_start_mib"] + LEAK_GUARD_MIB, (role, memory)


def test_everything_stopped(soak: dict) -> None:
    assert soak["stack_exit_code"] == 0
    assert soak["leftover_processes"] == 0
