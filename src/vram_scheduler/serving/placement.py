"""Where a replica's Ray actor runs: on the node its reservation names, pinned there by Ray.

The planner decides node and GPU; this module turns the node into a Ray scheduling constraint.
An inventory node is matched to a Ray node by the node label ``ray-vram.io/node-name`` (`ray-vram
node-start` sets it from the Kubernetes node name), then by host name, IP or node id. A declared inventory file
(CI, laptops without a GPU) names nodes Ray does not have: then the replica may run anywhere,
and the reservation stays an accounting entry.
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from ..node import NODE_NAME_LABEL
from ..planner import Reservation
from .pinning import PINNING_ENV, is_cuda_uuid

log = logging.getLogger(__name__)

#: A sliver of the node's `node:<ip>` resource: enough to pin the actor to that node.
NODE_RESOURCE_SHARE = 0.001


def ray_node_address(node: str) -> str | None:
    """The IP of the alive Ray node that is inventory node `node`, or None."""
    for info in ray.nodes():
        if not info.get("Alive"):
            continue
        names = {
            (info.get("Labels") or {}).get(NODE_NAME_LABEL),
            info.get("NodeManagerHostname"),
            info.get("NodeName"),
            info.get("NodeManagerAddress"),
            info.get("NodeID"),
        }
        if node in names:
            return info.get("NodeManagerAddress") or info.get("NodeName")
    return None


def actor_options(reservation: Reservation, env: dict[str, str]) -> dict[str, Any]:
    """`ray_actor_options` for the replica holding `reservation`."""
    env_vars = dict(env)
    options: dict[str, Any] = {"num_cpus": 0}
    if is_cuda_uuid(reservation.gpu_uuid):
        env_vars.update(PINNING_ENV)
    address = ray_node_address(reservation.node)
    if address is not None:
        options["resources"] = {f"node:{address}": NODE_RESOURCE_SHARE}
    else:
        log.info("node %s of replica %s is not a Ray node: placed by Ray", reservation.node, reservation.replica_id)
    options["runtime_env"] = {"env_vars": env_vars}
    return options
