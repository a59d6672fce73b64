"""The Serve applications the controller deploys: the one path by which models reach Ray Serve.

- `model_application`: one model — a deployment per reservation the controller planned (each
  pinned to the node its reservation names, see `placement`), grouped under a small `ModelGroup`
  ingress that reports the replicas' state. One Serve application per model means a change to
  one model never touches another model's replicas.
- `router_application`: the OpenAI-compatible endpoint (`router.OpenAIRouter`), one deployment
  per router (`serving.router_replicas`), each pinned to a node.
- `declare`: tells the routers (through their endpoint board) which models there are.

Nothing here is an application builder to import by path (a RayService `serveConfigV2`): Serve
would own those applications and replace them on each update, beside the controller's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ray import serve
from ray.serve import Application

from ..core.config import ModelSpec, ServingSettings
from ..core.contract import ModelAvailability, Reservation
from ..core.replica_env import replica_env, without_secrets
from .endpoint_board import endpoint_board, routed_models
from .options import deployment_options, keep_if_unchanged, router_names, router_options
from .replica.placement import router_addresses
from .replica.replica import replica_deployment
from .router.router import ROUTER_APP, RouterDeployment

log = logging.getLogger("ray.serve")


def model_app_name(model_id: str) -> str:
    return f"model-{model_id}"


class ModelGroup:
    """Ingress of one model's application: knows its replica deployments, reports their state."""

    def __init__(self, model_id: str, replica_ids: list[str], *replicas: Any):
        self.model_id = model_id
        self.replicas = dict(zip(replica_ids, replicas, strict=True))

    async def replica_info(self) -> list[dict[str, Any]]:
        infos = []
        for replica_id, handle in self.replicas.items():
            try:
                infos.append(await handle.info.remote())
            except Exception as error:
                infos.append({"replica_id": replica_id, "error": str(error).strip().splitlines()[-1]})
        return infos


def model_application(
    spec: ModelSpec,
    reservations: list[Reservation],
    serving: ServingSettings,
    env: dict[str, str] | None = None,
) -> Application:
    env = without_secrets(replica_env() if env is None else env, serving)
    replicas = [replica_deployment(spec, r, serving, env) for r in reservations]
    replica_ids = [r.replica_id for r in reservations]
    group = serve.deployment(ModelGroup, **deployment_options("group", f"{spec.model_id}-group"))
    return keep_if_unchanged(group, [spec.model_id, replica_ids]).bind(spec.model_id, replica_ids, *replicas)


def router_settings(serving: ServingSettings) -> dict[str, Any]:
    """What the routers are built from: the serving settings but `model_sources` (where replicas
    load a model from), so that a config naming other sources leaves the routers running."""
    return serving.model_dump(mode="json", exclude={"model_sources"})


def router_application(
    serving: ServingSettings, addresses: list[str | None] | None = None, children: Sequence[Application] = ()
) -> Application:
    """The OpenAI endpoint's application: one deployment per router, each pinned to its node in
    `addresses` (default: `placement.router_addresses`); the models it routes to come from the
    endpoint board. `children` (model applications) are bound below the first router."""
    addresses = router_addresses(serving) if addresses is None else addresses
    args = router_settings(serving)
    routers = []
    for name, address in zip(router_names(len(addresses)), addresses, strict=True):
        options = router_options(name, address)
        routers.append(keep_if_unchanged(serve.deployment(RouterDeployment, **options), [options, args]))
    return routers[0].bind(args, *[router.bind(args) for router in routers[1:]], *children)


def declare(
    models: list[ModelSpec], app: str = ROUTER_APP, availability: Mapping[str, ModelAvailability] | None = None
) -> None:
    """Tell every router of application `app` (through its endpoint board) which models there are,
    and (`availability`) why a model has no ready replica, for its 503."""
    import ray

    ray.get(endpoint_board(app).declare.remote(routed_models(models, availability)))
