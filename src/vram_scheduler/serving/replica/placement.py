"""Where a replica's Ray actor runs: on the node its reservation names, pinned there by Ray; and
on which nodes the routers run.

The planner decides node and GPU; this module turns the node into a Ray scheduling constraint.
An inventory node is matched to a Ray node by the node label ``ray-vram.io/node-name`` (`ray-vram
node-start` sets it from the Kubernetes node name), then by host name, IP or node id. A declared inventory file
(CI, laptops without a GPU) names nodes Ray does not have: then the replica may run anywhere,
and the reservation stays an accounting entry.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import ray

from ...core.config import ServingSettings
from ...core.contract import Reservation
from ...core.ray_names import NODE_NAME_LABEL, ROUTER_HOST_LABEL
from .pinning import PINNING_ENV, is_cuda_uuid

log = logging.getLogger(__name__)

#: A sliver of the node's `node:<ip>` resource: enough to pin the actor to that node.
NODE_RESOURCE_SHARE = 0.001


def _names(info: dict[str, Any]) -> set[str | None]:
    """Every name an inventory may give the Ray node `info` (an entry of `ray.nodes()`)."""
    return {
        (info.get("Labels") or {}).get(NODE_NAME_LABEL),
        info.get("NodeManagerHostname"),
        info.get("NodeName"),
        info.get("NodeManagerAddress"),
        info.get("NodeID"),
    }


def ray_node_address(node: str) -> str | None:
    """The IP of the alive Ray node that is inventory node `node`, or None."""
    for info in ray.nodes():
        if info.get("Alive") and node in _names(info):
            return info.get("NodeManagerAddress") or info.get("NodeName")
    return None


def lost_nodes(nodes: Iterable[str]) -> set[str]:
    """Those of the inventory nodes `nodes` that were Ray nodes and have none alive now: their Ray
    node left the cluster (a declared node Ray never had is not lost: its replicas run anywhere)."""
    infos = ray.nodes()
    lost = set()
    for node in nodes:
        matching = [info for info in infos if node in _names(info)]
        if matching and not any(info.get("Alive") for info in matching):
            lost.add(node)
    return lost


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


def router_hosts(nodes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The alive nodes labelled `ray-vram.io/router-host=true`."""
    return [n for n in nodes if n.get("Alive") and (n.get("Labels") or {}).get(ROUTER_HOST_LABEL) == "true"]


def router_addresses(serving: ServingSettings, previous: Sequence[str | None] = ()) -> list[str | None]:
    """The node (address) of each router; None: on the head (`router_placement: head`).

    spread: one router per alive Ray node, the head's first, while there are nodes enough, then
    again from the head. Where nodes are labelled router hosts (`ray-vram.io/router-host=true`:
    the pods an endpoint Service reaches), only those take routers, and each takes at least one,
    so there are max(`router_replicas`, hosts) routers: a Service never sends a request to a pod
    without one. A router whose node (in `previous`) is alive stays there unless another node has
    two routers fewer; a router whose node left goes to the node with fewest. Ray Serve's own
    spreading of a deployment's replicas is no promise: it places each new replica on the next
    node in turn, whatever runs there, so a restarted router can join the other on one node.
    """
    count = serving.router_replicas
    if serving.router_placement == "head":
        return [None] * count
    alive = [n for n in ray.nodes() if n.get("Alive")]
    hosts = router_hosts(alive)
    if hosts:
        alive, count = hosts, max(count, len(hosts))
    alive.sort(key=lambda n: ("node:__internal_head__" not in n.get("Resources", {}), n["NodeManagerAddress"]))
    order = [n["NodeManagerAddress"] for n in alive]
    chosen: list[str | None] = [a if a in order else None for a in list(previous)[:count]]
    chosen += [None] * (count - len(chosen))
    load = Counter(a for a in chosen if a is not None)

    def emptiest() -> str:
        return min(order, key=lambda a: (load[a], order.index(a)))

    for i, address in enumerate(chosen):
        if address is None:
            chosen[i] = emptiest()
            load[chosen[i]] += 1
    while True:  # even out: move the last router of the fullest node to the emptiest
        fullest = max(order, key=lambda a: (load[a], -order.index(a)))
        target = emptiest()
        if load[fullest] - load[target] < 2:
            return chosen
        i = max(i for i, a in enumerate(chosen) if a == fullest)
        chosen[i] = target
        load[fullest] -= 1
        load[target] += 1
