"""`serve.deployment` options of every ray-vram deployment, built in one place.

`ray-vram up/serve` (one application per model plus the router's) and the single-application
`build_app` (RayService) deploy the same router and replicas: written twice, their options drifted
(the single application's router lost its health-check period, logging config and head-node
placement).
"""

from __future__ import annotations

from typing import Any, Literal

Role = Literal["router", "replica", "group"]

#: The router runs on the head node: it outlives worker nodes, and its port is the one exposed.
HEAD_NODE_RESOURCE = {"node:__internal_head__": 0.001}
#: Concurrent requests the router accepts (each replica has its own, smaller limit).
ROUTER_MAX_ONGOING_REQUESTS = 10000


def deployment_options(
    role: Role,
    name: str,
    *,
    ray_actor_options: dict[str, Any] | None = None,
    max_ongoing_requests: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `serve.deployment` of one ray-vram deployment (always one Serve replica)."""
    options: dict[str, Any] = {
        "name": name,
        "num_replicas": 1,
        "ray_actor_options": ray_actor_options or {"num_cpus": 0},
        "logging_config": {"enable_access_log": False},
    }
    if role == "router":
        options |= {
            "max_ongoing_requests": ROUTER_MAX_ONGOING_REQUESTS,
            "ray_actor_options": {"num_cpus": 0, "resources": HEAD_NODE_RESOURCE},
            "health_check_period_s": 5,
        }
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
