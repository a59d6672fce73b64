"""The SDK on a Ray address finds the cluster's controller by name (`ray.get_actor`) and nothing
else: a cluster where none runs is refused, naming what is missing and how to start one."""

from __future__ import annotations

import pytest
from ray.cluster_utils import Cluster

from vram_scheduler import ControllerUnavailableError, VRAMScheduler
from vram_scheduler.core.ray_names import CONTROLLER_ACTOR, NAMESPACE


def test_a_ray_address_without_a_controller_is_refused_not_given_one(cluster: Cluster) -> None:
    import ray

    with pytest.raises(ControllerUnavailableError) as refused:
        VRAMScheduler(cluster.address)
    message = str(refused.value)
    assert cluster.address in message and repr(CONTROLLER_ACTOR) in message and repr(NAMESPACE) in message
    assert "ray-vram serve" in message and "ray-vram up" in message
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert CONTROLLER_ACTOR not in names  # the client started none
