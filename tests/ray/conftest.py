"""A real multi-node Ray cluster (head + two workers, `ray.cluster_utils.Cluster`) per test
module,
and a fresh `vram_allocator` (empty ledger) per test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # imported after the environment above is set
from ray.cluster_utils import Cluster
from waiting import wait_until

from vram_scheduler.allocator.actor import AllocatorClient, get_vram_allocator
from vram_scheduler.allocator.heartbeats import forget_heartbeats
from vram_scheduler.allocator.store import forget_ledger
from vram_scheduler.core.ray_names import ALLOCATOR_ACTOR, NAMESPACE

# Cluster's default node address: forcing 127.0.0.1 leaves the GCS address unreachable on this machine.
NODE_ARGS = {"object_store_memory": 80 * 1024**2}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """Head plus two worker nodes with resources node_a / node_b (tests place actors by them)."""
    ray_cluster = Cluster(
        initialize_head=True,
        head_node_args=NODE_ARGS | {"num_cpus": 1, "include_dashboard": False, "resources": {"head": 1}},
    )
    try:
        for name in ("node_a", "node_b"):
            add_node(ray_cluster, num_cpus=1, resources={name: 100})
        ray_cluster.wait_for_nodes()
        ray.init(address=ray_cluster.address, namespace=NAMESPACE)
        yield ray_cluster
    finally:
        ray.shutdown()
        ray_cluster.shutdown()


def add_node(ray_cluster: Cluster, **args: object) -> object:
    """Add a worker node; a second try when a busy machine makes Ray's fixed 30 s start wait run out."""
    try:
        return ray_cluster.add_node(**NODE_ARGS, **args)
    except Exception as error:
        if "timed out during startup" not in str(error):
            raise
        return ray_cluster.add_node(**NODE_ARGS, **args)


def drop_allocator() -> None:
    """Kill the allocator for good and forget its persisted ledger and the monitors' heartbeats."""

    def name_free() -> bool:
        try:
            ray.kill(ray.get_actor(ALLOCATOR_ACTOR, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            return True  # the name is free again
        return False

    wait_until(name_free, 30, f"the actor name {ALLOCATOR_ACTOR!r} free again", every_s=0.05)
    forget_ledger(NAMESPACE)
    forget_heartbeats(NAMESPACE)


@pytest.fixture
def forget_allocator() -> Callable[[], None]:
    """What the `allocator` fixture does between tests, for tests that need it mid-test."""
    return drop_allocator


@pytest.fixture
def allocator(cluster: Cluster) -> Iterator[AllocatorClient]:
    """A fresh `vram_allocator`, through its typed client (`.handle`: the actor itself)."""
    drop_allocator()
    yield AllocatorClient(get_vram_allocator())
    drop_allocator()
