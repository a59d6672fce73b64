"""The monitor against a real local Ray and the real `vram_allocator`: the inventory arrives,
reservations come back as metrics, the watchdog flags and restarts only the replica over budget,
and a monitor killed mid-run leaves its node stale after the timeout."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from waiting import wait_until

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # imported after the environment above is set
from ray.cluster_utils import Cluster

from vram_scheduler.allocator.actor import AllocatorClient
from vram_scheduler.core.config import PlacementSettings
from vram_scheduler.core.contract import VRAMState
from vram_scheduler.core.ray_names import NAMESPACE

from .conftest import GIB, Monitor, free_port, inventory_yaml, value

pytestmark = pytest.mark.slow

HONEST_PID, GREEDY_PID = 4000001, 4000002  # declared GPU processes (no such local processes)
GPU1 = "GPU-ci-node-1"


@ray.remote(num_cpus=0)
class Owner:
    """Stands in the place of a Serve replica actor: what the watchdog restarts."""

    def actor_id(self) -> str:
        return ray.get_runtime_context().get_actor_id()


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A local head with a Ray Client server: the monitor connects as the chart's DaemonSet does."""
    client_port = free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": False,
            "object_store_memory": 80 * 1024**2,
            "ray_client_server_port": client_port,
        },
    )
    ray.init(address=cluster.address, namespace=NAMESPACE)
    try:
        yield f"ray://127.0.0.1:{client_port}"
    finally:
        ray.shutdown()
        cluster.shutdown()


def state_of(allocator: AllocatorClient) -> VRAMState:
    return allocator.vram_state()


def actor_state(actor_id: str) -> str:
    return ray._private.state.actors(actor_id).get("State")


def test_publish_readback_watchdog_restart_and_stale(ray_address: str, write_inventory, monitors) -> None:
    allocator = AllocatorClient(timeout_s=30)
    allocator.configure(PlacementSettings(stale_after_s=3, reclaim_interval_s=1, replica_overhead_gb=2))
    processes = [{"pid": HONEST_PID, "used_bytes": 3 * GIB}, {"pid": GREEDY_PID, "used_bytes": 5 * GIB}]
    path = write_inventory(inventory_yaml(processes=processes, used_gb=10))
    monitor = Monitor(
        f"--inventory-file={path}", f"--ray-address={ray_address}", "--restart-over-budget", "--watchdog-polls=3"
    )
    monitors.append(monitor)
    monitor.wait_ready()

    # The inventory arrives, fresh, as the monitor's node.
    # Generous: a Ray Client session takes seconds to open, minutes on a 2-core machine under load.
    node = wait_until(
        lambda: next((n for n in state_of(allocator).nodes if n.node == "ci-node"), None),
        180,
        "the inventory",
        every_s=0.2,
    )
    assert node.source == "file" and node.gpus == 2 and not node.stale

    # Two replicas reserve on GPU 1 and attach their processes.
    honest, greedy = Owner.options(name="honest-owner").remote(), Owner.options(name="greedy-owner").remote()
    honest_id, greedy_id = ray.get([honest.actor_id.remote(), greedy.actor_id.remote()])
    allocator.reserve("honest-0", "honest", 4 * GIB, GPU1, honest_id)
    allocator.reserve("greedy-0", "greedy", 2 * GIB, GPU1, greedy_id)
    allocator.attach_process("honest-0", HONEST_PID)
    allocator.attach_process("greedy-0", GREEDY_PID)

    samples = monitor.wait_for(
        lambda s: value(s, "ray_vram_watchdog_violations_total", replica="greedy-0") == 1,
        what="the greedy replica flagged",
        timeout_s=60,
    )
    labels = {"node": "ci-node", "gpu": "1"}
    assert value(samples, "ray_vram_replica_budget_bytes", replica="honest-0", model_id="honest", **labels) == 4 * GIB
    # the reservation (budget + overhead) is what the watchdog judges: greedy uses 5 of its 2 + 2
    assert value(samples, "ray_vram_replica_reservation_bytes", replica="greedy-0", **labels) == 4 * GIB
    assert value(samples, "ray_vram_replica_used_bytes", replica="honest-0", **labels) == 3 * GIB
    assert value(samples, "ray_vram_replica_used_bytes", replica="greedy-0", **labels) == 5 * GIB
    assert value(samples, "ray_vram_gpu_unmanaged_bytes", **labels) == 2 * GIB, "10 GiB used, 8 GiB by replicas"
    assert value(samples, "ray_vram_gpu_reserved_bytes", **labels) == 10 * GIB, "budgets 4 + 2, overhead 2 x 2"
    assert value(samples, "ray_vram_watchdog_violations_total", replica="honest-0") in (None, 0)

    # The replica over budget is restarted through Ray (its owner actor killed); its neighbour is untouched.
    wait_until(lambda: actor_state(greedy_id) == "DEAD", 60, "the greedy owner killed", every_s=0.2)
    assert actor_state(honest_id) == "ALIVE"
    log = monitor.log()
    assert "event=watchdog_violation model_id=greedy replica=greedy-0 node=ci-node gpu=1" in log
    assert "action=restart" in log and "honest-0" not in log.split("event=watchdog_violation", 1)[1].split("\n")[0]

    # A monitor killed mid-run: after stale_after_s its node is stale and takes no new reservations.
    assert monitor.stop(signal.SIGKILL) != 0
    wait_until(lambda: "ci-node" in state_of(allocator).stale_nodes, 60, "the node marked stale", every_s=0.2)
    with pytest.raises(ray.exceptions.RayTaskError, match="stale"):
        allocator.reserve("late-0", "late", GIB, GPU1)
    ray.kill(honest)
