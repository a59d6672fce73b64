"""The groups `bash ci/test.sh` runs the suite in under pytest-xdist (`-n 2 --dist loadgroup`):
every test of the session's stack in one group, so one worker starts it once; every other test
with its file, so a module's own stack starts on one worker only (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: A pytest plugin printing each collected test's xdist group, as pytest-xdist reads it.
PRINT_GROUPS = """
def pytest_collection_finish(session):
    for item in session.items:
        marks = [m.args[0] for m in item.iter_markers("xdist_group")]
        print("GROUP", item.nodeid, "|".join(marks))
"""


def groups(tmp_path: Path, *paths: str, worker: str | None = None) -> dict[str, str]:
    """Each collected test's group, in collection order (as pytest-xdist `worker` would collect them)."""
    (tmp_path / "print_groups.py").write_text(PRINT_GROUPS)
    env = os.environ | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("PYTEST_XDIST_WORKER", None)
    if worker:
        env["PYTEST_XDIST_WORKER"] = worker
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "print_groups", "--collect-only", "-q"]
    done = subprocess.run(
        [*command, *paths],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line.split(" ", 2)[1:] for line in done.stdout.splitlines() if line.startswith("GROUP ")]
    return {nodeid: group for nodeid, group in lines}


def test_the_session_stacks_tests_share_one_group_and_every_other_test_runs_with_its_file(tmp_path: Path) -> None:
    found = groups(tmp_path, "tests/sdk/test_examples.py", "tests/sdk/test_inference.py", "tests/unit/test_waiting.py")
    examples = [g for n, g in found.items() if n.startswith("tests/sdk/test_examples.py::")]
    assert examples and set(examples) == {"local_stack"}, found
    # test_inference: the session stack's tests, and a few that take no stack (they run with their file).
    inference = {n.split("::")[1]: g for n, g in found.items() if n.startswith("tests/sdk/test_inference.py::")}
    assert inference["test_stream_yields_text_pieces"] == "local_stack"
    assert inference["test_retry_after_header_forms"] == "tests/sdk/test_inference.py"
    waiting = {g for n, g in found.items() if n.startswith("tests/unit/test_waiting.py::")}
    assert waiting == {"tests/unit/test_waiting.py"}, found


def test_under_xdist_the_longest_groups_are_handed_out_first_each_file_in_its_order(tmp_path: Path) -> None:
    paths = ("tests/sdk/test_inference.py", "tests/serving/test_units.py", "tests/serving/test_faults.py")
    plain = groups(tmp_path, *paths)
    sorted_ = groups(tmp_path, *paths, worker="gw0")
    assert sorted(plain) == sorted(sorted_)  # the same tests
    order = list(sorted_.values())
    # test_faults first, then the session stack's tests, then the rest as collected
    assert order.index("local_stack") > order.index("tests/serving/test_faults.py")
    assert order[: order.count("tests/serving/test_faults.py")] == ["tests/serving/test_faults.py"] * order.count(
        "tests/serving/test_faults.py"
    )
    faults = [n for n in sorted_ if n.startswith("tests/serving/test_faults.py::")]
    assert faults == [n for n in plain if n.startswith("tests/serving/test_faults.py::")]  # file order kept
    assert next(iter(plain.values())) != "tests/serving/test_faults.py"  # without xdist: collection order
