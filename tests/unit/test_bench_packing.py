"""`python -m bench.packing` runs end to end on two instances and writes its JSON (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_packing_bench_on_two_instances(tmp_path: Path) -> None:
    out = tmp_path / "packing.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.packing", "--instances", "2", "--timing-runs", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Replicas placed without overcommit" in result.stdout
    report = json.loads(out.read_text())
    assert [row["instance"] for row in report["instances"]] == ["c00", "c01"]
    for row in report["instances"]:
        methods = row["methods"]
        assert set(methods) == {"planner", "ray_fractional", "node_sum", "optimum"}
        assert methods["optimum"]["overcommitted_gpus"] == 0
        assert methods["planner"]["overcommitted_gpus"] == 0
        if row["optimum_status"] == "Optimal Solution Found":
            assert methods["planner"]["placed"] <= methods["optimum"]["placed"]
        for outcome in methods.values():
            assert outcome["placed"] <= outcome["scheduled"] <= row["requested"]
    timing = report["timing_1000_replicas_100_gpus"]
    assert (timing["gpus"], timing["requested"]) == (100, 1000)
    assert set(report["summary"]["methods"]) == {"planner", "ray_fractional", "node_sum", "optimum"}
