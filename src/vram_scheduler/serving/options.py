"""`serve.deployment` options of every ray-vram deployment, built in one place.

The controller deploys the router's application and one application per model; their options
(health-check period, logging config, head-node placement, versions) are set here, once.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from ..allocator.cluster_actors import HEAD_NODE_RESOURCE
from .replica.placement import NODE_RESOURCE_SHARE
from .router.router import ROUTER_DEPLOYMENT

Role = Literal["router", "replica", "group"]

#: Concurrent requests the router accepts (each replica has its own, smaller limit).
ROUTER_MAX_ONGOING_REQUESTS = 10000


def deployment_options(
    role: Role,
    name: str,
    *,
    ray_actor_options: dict[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `serve.deployment` of one ray-vram deployment (always one Serve replica:
    a deployment per model replica and per router, each placed where ray-vram decides)."""
    options: dict[str, Any] = {
        "name": name,
        "num_replicas": 1,
        "ray_actor_options": ray_actor_options or {"num_cpus": 0},
        "logging_config": {"enable_access_log": False},
    }
    if role == "router":
        options |= {"max_ongoing_requests": ROUTER_MAX_ONGOING_REQUESTS, "health_check_period_s": 5}
    elif role == "replica":
        options |= {
            "health_check_period_s": 5,
            "health_check_timeout_s": 30,
            "graceful_shutdown_timeout_s": 20,
            "max_constructor_retry_count": 1,
        }
        if max_ongoing_requests is not None:
            options["max_ongoing_requests"] = max_ongoing_requests
    return options


def router_names(count: int) -> list[str]:
    """The router application's deployments, one per router: `OpenAIRouter`, `OpenAIRouter-1`, ..."""
    return [ROUTER_DEPLOYMENT] + [f"{ROUTER_DEPLOYMENT}-{i}" for i in range(1, count)]


def router_options(name: str, address: str | None) -> dict[str, Any]:
    """One router's deployment (one Serve replica): pinned to the node at `address`, or to the head."""
    resources = {f"node:{address}": NODE_RESOURCE_SHARE} if address else dict(HEAD_NODE_RESOURCE)
    return deployment_options("router", name, ray_actor_options={"num_cpus": 0, "resources": resources})


def keep_if_unchanged(deployment: Any, identity: Any) -> Any:
    """`deployment` with a version derived from `identity` (JSON: what it is built from).

    Ray Serve gives each deployment of an application deployed from Python a random version, so
    deploying the application again restarts every deployment in it. With a version that changes
    only when `identity` does, a deployment built the same is left running: the controller can
    move one replica of a model without restarting the others. (`version` is Serve's internal
    option, hence `_internal`; the faults suite's node test asserts the model's other replica keeps
    its process.)
    """
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return deployment.options(version=digest, _internal=True)
