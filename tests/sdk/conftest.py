"""One real local stack (Ray, allocator, monitor on a declared 8 GiB + 4 GiB inventory, controller,
OpenAI router, a vLLM CPU replica of the demo model as `tiny`/`tiny-alias`) for all SDK, CLI and
example tests. Tests that deploy more models shut them down before they end."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stack

MODEL = "tiny"
ALIAS = "tiny-alias"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def local_stack() -> Iterator[stack.LocalStack]:
    """The stack; this test process is the same installation (XDG_CONFIG_HOME), so clients find the
    controller token in its file as a user of `ray-vram up` does. A 2 GiB overhead for every model
    (placement.replica_overhead_gb), so the SDK tests' arithmetic is round; the overhead derived from
    the weights is exercised by tests/serving/test_queue.py."""
    placement = {"replica_overhead_gb": 2}
    with stack.LocalStack(
        [stack.demo_model_spec(MODEL, router_name=ALIAS)], values={"placement": placement}
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
    """The OpenAI base URL (…/v1) of the stack."""
    return local_stack.endpoint


@pytest.fixture
def controller_env(local_stack: stack.LocalStack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point discovery at the stack's controller (and nowhere else) for this test; its token is found
    as a user of `ray-vram up` finds it, in the installation's token file (XDG_CONFIG_HOME)."""
    from vram_scheduler import forget_endpoints

    monkeypatch.setenv("RAY_VRAM_CONTROLLER", local_stack.controller)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(local_stack.config_home))
    monkeypatch.delenv("RAY_VRAM_CONTROLLER_TOKEN", raising=False)
    monkeypatch.delenv("RAY_VRAM_ENDPOINT", raising=False)
    forget_endpoints()
    return {"RAY_VRAM_CONTROLLER": local_stack.controller, "XDG_CONFIG_HOME": str(local_stack.config_home)}


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None, timeout: float = 600):
    """`ray-vram ARGS` in a child process (as a user runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "vram_scheduler.cli", *args],
        env=os.environ | (env or {}),
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
