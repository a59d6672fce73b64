"""One real serving stack per test module (tests/stack.py's `running_stack`): isolated local Ray
(loopback), Serve, the allocator, the monitor publishing a declared two-GPU inventory, the controller,
the OpenAI router, and vLLM (CPU backend) replicas of the generated demo model.

The harness itself lives in tests/stack.py (shared with the SDK tests' local stack); this module names
it as the serving tests use it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stack import (
    ENGINE_KWARGS,
    SERVING_INVENTORY,
    Stack,
    deployed,
    running_stack,
    start_monitor,
    stream_outcome,
    with_demo_models,
)
from stack import serving_model as model

from vram_scheduler.core.loopback import free_port

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_VRAM_REPLICA_HOST", "127.0.0.1")

HERE = Path(__file__).resolve().parent
INVENTORY = SERVING_INVENTORY

__all__ = [
    "ENGINE_KWARGS",
    "HERE",
    "INVENTORY",
    "Stack",
    "deployed",
    "free_port",
    "model",
    "running_stack",
    "start_monitor",
    "stream_outcome",
    "two_models",
    "with_demo_models",
]


def two_models(port: int) -> Any:
    """The stack's configuration: alpha and beta (alias beta-alias), 2 replicas each."""
    from vram_scheduler.core.config import parse_config

    return parse_config(
        {
            "models": [model("alpha"), model("beta", router_name="beta-alias", max_tokens=10)],
            "serving": {"host": "127.0.0.1", "port": port},
        },
        "serving tests",
    )


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # A 2 GiB overhead for every model (placement.replica_overhead_gb): the tests' room arithmetic is round.
    models = [model("alpha"), model("beta", router_name="beta-alias", max_tokens=10)]
    with running_stack(models, placement={"replica_overhead_gb": 2}) as started:
        yield started
