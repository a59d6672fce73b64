"""Requests beyond a replica's capacity, through a real router to a real vLLM (CPU) replica: up to
`serving.max_queued_requests` wait in the router's queue and are answered; the rest get exactly 429
with Retry-After, never another failure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from vram_scheduler.core import capacity
from vram_scheduler.core.config import GIB
from vram_scheduler.core.model_limits import weights_bytes
from vram_scheduler.tools.demo.model import default_demo_dir

from .conftest import Stack, model, running_stack

#: One router (its queue is per router), one replica taking 2 requests at once, 2 more queued.
SERVING = {"router_replicas": 1, "max_ongoing_requests": 2, "max_queued_requests": 2, "max_queue_wait_s": 600}
SENT = 8


@pytest.fixture(scope="module")
def queued_stack() -> Iterator[Stack]:
    with running_stack([model("q", replicas=1, max_tokens=12)], SERVING) as started:
        yield started


async def _burst(base: str, count: int) -> list[httpx.Response]:
    """`count` long completions at once (ignore_eos: each runs its whole length)."""
    body = {"model": "q", "prompt": "Count slowly:", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(count)))


def test_the_excess_beyond_capacity_and_queue_gets_429_with_retry_after(queued_stack: Stack) -> None:
    answers = asyncio.run(_burst(queued_stack.base, SENT))
    codes = sorted(r.status_code for r in answers)
    capacity, queued = SERVING["max_ongoing_requests"], SERVING["max_queued_requests"]
    assert codes == [200] * (capacity + queued) + [429] * (SENT - capacity - queued), [r.text[:200] for r in answers]
    for refused in (r for r in answers if r.status_code == 429):
        assert refused.headers["retry-after"] == "1"
        assert "the queue is full (2 of 2 waiting, serving.max_queued_requests)" in refused.json()["error"]["message"]
    for answered in (r for r in answers if r.status_code == 200):
        assert answered.json()["usage"]["completion_tokens"] == 200


def test_the_controller_records_what_the_model_resolved_to(queued_stack: Stack) -> None:
    """Resolved once at deploy: the effective max_model_len, the overhead (the demo model's files are
    on this node: derived from its weights) and the reservation, in status and on each reservation."""
    (status,) = queued_stack.controller.status().models
    resolved = status.resolved
    assert resolved is not None
    weights = weights_bytes(str(default_demo_dir("text")))  # what `demo` stands for in serving.model_sources
    assert weights and resolved.weights_bytes == weights
    assert resolved.max_model_len == 512
    assert resolved.budget_bytes == round(1.5 * GIB)
    assert resolved.overhead_bytes == capacity.derived_overhead_bytes(weights)
    assert resolved.overhead_from.startswith("derived from ")
    assert resolved.reservation_bytes == resolved.budget_bytes + resolved.overhead_bytes
    state = queued_stack.controller.allocator.vram_state()
    (held,) = [r for gpu in state.gpus for r in gpu.replicas]
    assert held.overhead_bytes == resolved.overhead_bytes  # the replica reserved what was resolved
