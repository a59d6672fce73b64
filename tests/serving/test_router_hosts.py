"""Routers on a real three-node Ray cluster (one machine; nodes on 127.0.0.1–3) whose head and one
worker carry the router-host label, as the chart's head and CPU pods do: the routers go there,
one each, and a router's options put its actor on the node chosen for it, never on the unlabelled
(GPU) node."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import ray

from vram_scheduler.core.config import ServingSettings
from vram_scheduler.core.loopback import keep_ray_on_loopback
from vram_scheduler.core.ray_names import ROUTER_HOST_LABEL
from vram_scheduler.serving.options import router_options
from vram_scheduler.serving.replica.placement import router_addresses

HOST = {ROUTER_HOST_LABEL: "true"}


@pytest.fixture(scope="module")
def three_nodes() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    keep_ray_on_loopback()
    head = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "labels": HOST, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.2", labels=HOST)
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.3")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@ray.remote(num_cpus=0)
class Where:
    def address(self) -> str:
        return ray.util.get_node_ip_address()


def test_routers_run_on_the_router_hosts_only(three_nodes: Any) -> None:
    addresses = router_addresses(ServingSettings(router_replicas=2))
    assert addresses == ["127.0.0.1", "127.0.0.2"]
    assert sorted(router_addresses(ServingSettings(router_replicas=1))) == ["127.0.0.1", "127.0.0.2"], "each host one"
    for address in addresses:
        options = router_options("OpenAIRouter", address)["ray_actor_options"]
        actor = Where.options(resources=options["resources"]).remote()
        assert ray.get(actor.address.remote(), timeout=60) == address
        ray.kill(actor)
