"""The cluster's long-lived actors: how each is found or created, written once.

The allocator, the serving controller and each router's endpoint board are named, detached actors
in namespace `ray-vram`, on the head node, that Ray restarts forever. Written three times, their
options could drift apart; `cluster_actor` is the one place they are set (their names are
`core.ray_names`').
"""

from __future__ import annotations

import contextlib
from typing import Any

import ray

from ..core.ray_names import NAMESPACE

#: A sliver of the resource only the head node has (a restarted head too): pins an actor there.
HEAD_NODE_RESOURCE = {"node:__internal_head__": 0.001}


def on_head_node() -> dict[str, Any]:
    """Actor options that place it on the head node, which lives as long as the cluster (a worker
    node may leave). A resource, not a soft node affinity: Ray 2.60 spreads actors asking for no
    CPU over the nodes whatever node a soft affinity names (seen with a 2-node cluster)."""
    return {"resources": dict(HEAD_NODE_RESOURCE)}


def connect() -> None:
    """Join the Ray cluster (namespace `ray-vram`) unless this process already has."""
    if not ray.is_initialized():
        ray.init(namespace=NAMESPACE)


def cluster_actor(
    cls: type,
    name: str,
    *args: Any,
    max_concurrency: int,
    retry_calls: bool,
    wait_ready: bool = True,
) -> Any:
    """A handle to the actor `name` (namespace `ray-vram`), created from `cls(*args)` if missing.

    Race-safe: concurrent callers all end up with the same detached actor (`get_if_exists`). Ray
    restarts it forever; `retry_calls` also reruns the calls in flight then (only for an actor whose
    every method is idempotent). `wait_ready`: once created, wait for its `ping()` to answer.
    """
    connect()
    with contextlib.suppress(ValueError):
        return ray.get_actor(name, namespace=NAMESPACE)
    retries = {"max_task_retries": -1} if retry_calls else {}
    handle = (
        ray.remote(cls)
        .options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            **retries,
            num_cpus=0,
            max_concurrency=max_concurrency,
            **on_head_node(),
        )
        .remote(*args)
    )
    if wait_ready:
        ray.get(handle.ping.remote())
    return handle
