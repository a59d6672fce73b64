"""Shared test setup: the repository root, the cluster's internal key, skipping GPU tests where no GPU
exists, and the session's one local stack (tests/stack.py) that every suite able to share it uses."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import stack
from fake_engine import FakeOpenAIEngine

ROOT = Path(__file__).resolve().parent.parent

# Every Ray cluster a test starts (in this process or a child) inherits it, as a Ray node does from
# its container: replicas refuse to start without one, and routers send it (serving/internal_key.py).
os.environ.setdefault("RAY_VRAM_INTERNAL_KEY", secrets.token_hex(32))

# Under pytest-xdist (`-n 2`), each worker keeps its Ray sessions and temporary files apart: the
# clusters of two workers never share a `ray_current_cluster` file or a session folder.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("RAY_TMPDIR", "TMPDIR"):
        _base = os.environ.get(_name)
        if _base:
            _own = Path(_base) / os.environ["PYTEST_XDIST_WORKER"]
            _own.mkdir(parents=True, exist_ok=True)
            os.environ[_name] = str(_own)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def _has_nvidia_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return count > 0
    except Exception:
        return shutil.which("nvidia-smi") is not None and Path("/dev/nvidia0").exists()


#: Fixtures that start Ray, vLLM, an API server or containers: a test taking one is `slow` whatever its
#: module says, so `pytest -m "not slow"` is the quick loop (pure rules, renders, parsers; no services).
#: Tests that start such things in their own body carry the mark themselves.
SERVICE_FIXTURES = frozenset(
    {
        "allocator",
        "bare",
        "built_images",
        "cluster",
        "kv",
        "local_stack",
        "monitors",
        "prometheus",
        "queued_stack",
        "ray_address",
        "ray_head",
        "soak",
        "stack",
        "three_nodes",
        "user_stack",
    }
)


#: The pytest-xdist group of every test taking the session's `local_stack`: one worker starts it, once.
LOCAL_STACK_GROUP = "local_stack"


def xdist_group(item: pytest.Item) -> str:
    """Which pytest-xdist group (`--dist loadgroup`) `item` runs in: the session stack's users together
    (tests/conftest.py `local_stack`), any other test with the rest of its file, whose module-scoped
    stacks then start on one worker only."""
    if "local_stack" in getattr(item, "fixturenames", ()):
        return LOCAL_STACK_GROUP
    return item.nodeid.split("::", 1)[0]


#: The longest groups, longest first (measured one file at a time on the 2-core machine, 2026-12-07:
#: test_faults 667 s, test_up_interrupt 509, the session stack's tests, test_sleep 299, …; since then
#: test_faults 316–336 s and test_sleep 200–211 s alone, the order kept: it passed).
#: With `--no-loadscope-reorder` (ci/test.sh) pytest-xdist hands groups to its workers one at a time in
#: collection order, so these run first and the short ones fill in around them. (By default it orders
#: groups by their number of tests, and the longest files, which have few tests, started last.)
LONGEST_GROUPS_FIRST = (
    "tests/serving/test_faults.py",
    "tests/sdk/test_up_interrupt.py",
    LOCAL_STACK_GROUP,
    "tests/serving/test_sleep.py",
    "tests/serving/test_multimodal_e2e.py",
    "tests/serving/test_soak.py",
    "tests/chart/test_apiserver.py",
    "tests/serving/test_serving_e2e.py",
    "tests/serving/test_pending.py",
    "tests/sdk/test_failures.py",
    "tests/sdk/test_up_pending.py",
    "tests/images/test_images.py",
)


def longest_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """`items` with the `LONGEST_GROUPS_FIRST` groups first, in that order; the order within a group and
    of every other test unchanged (a file's tests stay in file order)."""
    rank = {group: i for i, group in enumerate(LONGEST_GROUPS_FIRST)}
    return sorted(items, key=lambda item: rank.get(xdist_group(item), len(rank)))


# tryfirst: pytest-xdist reads the groups in its own collection hook, which runs before this module's.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if not any(item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(xdist_group(item)))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects, and sorts, alike
        items[:] = longest_first(items)
    if _has_nvidia_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def local_stack() -> Iterator[stack.LocalStack]:
    """The session's local stack (Ray, allocator, monitor on a declared 8 GiB + 4 GiB inventory,
    controller, OpenAI router, a vLLM CPU replica of the demo model as `tiny`/`tiny-alias`), started
    once for every test that takes it; tests that deploy more models shut them down before they end.

    This test process is the same installation (XDG_CONFIG_HOME), so clients find the controller token
    in its file as a user of `ray-vram up` does. A 2 GiB overhead for every model
    (placement.replica_overhead_gb), so the tests' arithmetic is round; the overhead derived from the
    weights is exercised by tests/serving/test_queue.py."""
    placement = {"replica_overhead_gb": 2}
    with stack.LocalStack(
        [stack.demo_model_spec(stack.MODEL, router_name=stack.ALIAS)], values={"placement": placement}
    ) as running:
        before = os.environ.get("XDG_CONFIG_HOME")
        os.environ["XDG_CONFIG_HOME"] = str(running.config_home)
        try:
            yield running
        finally:
            if before is None:
                os.environ.pop("XDG_CONFIG_HOME", None)
            else:
                os.environ["XDG_CONFIG_HOME"] = before


@pytest.fixture
def endpoint(local_stack: stack.LocalStack) -> str:
    """The OpenAI base URL (…/v1) of the session's stack."""
    return local_stack.endpoint


@pytest.fixture
def controller_env(local_stack: stack.LocalStack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point discovery at the session stack's controller (and nowhere else) for this test; its token is
    found as a user of `ray-vram up` finds it, in the installation's token file (XDG_CONFIG_HOME)."""
    from vram_scheduler import forget_endpoints

    monkeypatch.setenv("RAY_VRAM_CONTROLLER", local_stack.controller)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(local_stack.config_home))
    monkeypatch.delenv("RAY_VRAM_CONTROLLER_TOKEN", raising=False)
    monkeypatch.delenv("RAY_VRAM_ENDPOINT", raising=False)
    forget_endpoints()
    return {"RAY_VRAM_CONTROLLER": local_stack.controller, "XDG_CONFIG_HOME": str(local_stack.config_home)}


@pytest.fixture
def fake_engine() -> Iterator[FakeOpenAIEngine]:
    """The OpenAI engine's test double (tests/fake_engine.py) serving the session stack's model name, for
    tests of the client side of HTTP (retries) where the engine is not under test."""
    with FakeOpenAIEngine(stack.MODEL) as engine:
        yield engine
