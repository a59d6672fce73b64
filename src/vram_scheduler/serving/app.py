"""Ray Serve application builders, importable by path (RayService `serveConfigV2`, the controller).

- `build_model_app(args)`: one model — a deployment per planned replica (each pinned to the node
  its reservation names, see `placement`), grouped under a small `ModelGroup` ingress that
  reports the replicas' state. One Serve application per model means a change to one model
  never touches another model's replicas.
- `build_router_app(args)`: the OpenAI-compatible endpoint (`router.OpenAIRouter`), one
  deployment per router (`serving.router_replicas`), each pinned to a node.
- `build_app(args)`: everything from one config (router + every model), for a RayService whose
  `serveConfigV2` has one application: ``import_path: vram_scheduler.serving.app:build_app`` with
  the values' `models`, `placement` and `serving` as `args`.

Replicas are planned by the allocator at build time unless `reservations` are given, around every
other model's reservations (the controller's, another application's: `plan_models`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ray import serve
from ray.serve import Application

from ..config import ModelSpec, PlacementSettings, RayVRAMConfig, ServingSettings, parse_config
from ..contract import ModelAvailability, Plan, Reservation
from .endpoint_board import endpoint_board, routed_models
from .internal_key import INTERNAL_KEY_ENV
from .options import deployment_options, keep_if_unchanged, router_names, router_options
from .placement import router_addresses
from .replica import VLLMReplica, replica_deployment
from .router import ROUTER_APP, ROUTER_APP_ENV, RouterDeployment

log = logging.getLogger("ray.serve")

#: Environment a replica inherits from whoever builds the app (caches, offline hub, vLLM knobs).
PASSED_ENV_PREFIXES = ("VLLM_", "HF_", "TRANSFORMERS_", "TORCH", "RAY_VRAM_", "OMP_", "CUDA_DEVICE_ORDER")
PASSED_ENV = {"TMPDIR", "XDG_CACHE_HOME", "DO_NOT_TRACK", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "HOME"}
#: Secrets never passed: a Ray runtime env is stored in the GCS in plain text and shown to anyone
#: who can list actors. Replicas inherit these from their Ray node instead (the chart sets them
#: on every Ray container from Secrets). Besides these names, any variable with one of
#: `SECRET_WORDS` between its underscores (VLLM_API_KEY, ...) and the variable `serving.api_key_env`
#: names stay behind.
SECRET_ENV = frozenset(
    {"RAY_VRAM_API_KEY", INTERNAL_KEY_ENV, "RAY_VRAM_CONTROLLER_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}
)
SECRET_WORDS = frozenset({"TOKEN", "KEY", "APIKEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIALS"})


def is_secret(name: str) -> bool:
    """Whether the variable `name` may hold a secret (and so never goes into a runtime env)."""
    if name in SECRET_ENV:
        return True
    return name not in PASSED_ENV and not SECRET_WORDS.isdisjoint(name.upper().split("_"))


def without_secrets(env: dict[str, str], serving: ServingSettings | None = None) -> dict[str, str]:
    """`env` less every secret (`is_secret`, and the API key's variable `serving.api_key_env`)."""
    api_key_env = serving.api_key_env if serving is not None else None
    return {k: v for k, v in env.items() if not is_secret(k) and k != api_key_env}


def replica_env() -> dict[str, str]:
    """What replicas get from this process's environment through their runtime env (no secret)."""
    return without_secrets(
        {k: v for k, v in os.environ.items() if k in PASSED_ENV or k.startswith(PASSED_ENV_PREFIXES)}
    )


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
    replica_class: type[VLLMReplica] = VLLMReplica,
) -> Application:
    env = without_secrets(replica_env() if env is None else env, serving)
    replicas = [replica_deployment(spec, r, serving, env, replica_class) for r in reservations]
    replica_ids = [r.replica_id for r in reservations]
    group = serve.deployment(ModelGroup, **deployment_options("group", f"{spec.model_id}-group"))
    return keep_if_unchanged(group, [spec.model_id, replica_ids]).bind(spec.model_id, replica_ids, *replicas)


def router_application(
    serving: ServingSettings, addresses: list[str | None] | None = None, children: Sequence[Application] = ()
) -> Application:
    """The OpenAI endpoint's application: one deployment per router, each pinned to its node in
    `addresses` (default: `placement.router_addresses`); the models it routes to come from the
    endpoint board. `children` (model applications) are bound below the first router."""
    addresses = router_addresses(serving) if addresses is None else addresses
    args = serving.model_dump(mode="json")
    routers = []
    for name, address in zip(router_names(len(addresses)), addresses, strict=True):
        options = router_options(name, address)
        routers.append(keep_if_unchanged(serve.deployment(RouterDeployment, **options), [options, args]))
    return routers[0].bind(args, *[router.bind(args) for router in routers[1:]], *children)


def plan_models(models: list[ModelSpec], config: RayVRAMConfig) -> Plan:
    """Ask the allocator where each replica goes (kept reservations stay where they are).

    `models` are this application's, not the cluster's: every other model's reservation (the
    controller's models, another application's) keeps its room. Planned as the whole desired
    state, a replica was placed in room another model holds, and its reservation then failed
    ("Failed to update the deployments" for a RayService beside other models).
    """
    from ..allocator import AllocatorClient

    plan = AllocatorClient().plan(models, config.placement, keep_others=True)
    for unplaced in plan.unplaced:
        log.warning("%s", unplaced.reason)
    return plan


def build_model_app(args: dict[str, Any]) -> Application:
    """args: {"model": ModelSpec, "serving": ServingSettings?, "placement": PlacementSettings?,
    "reservations": [Reservation]?} (without reservations it is planned around every other model's)."""
    spec = ModelSpec.model_validate(args["model"])
    serving = ServingSettings.model_validate(args.get("serving") or {})
    placement = PlacementSettings.model_validate(args.get("placement") or {})
    reasons: list[str] = []
    if args.get("reservations") is not None:
        reservations = [Reservation.model_validate(r) for r in args["reservations"]]
    else:
        plan = plan_models([spec], RayVRAMConfig(models=[spec], placement=placement))
        reservations, reasons = plan.replicas_of(spec.model_id), [u.reason for u in plan.unplaced]
    if not reservations:
        raise ValueError(f"model {spec.model_id}: no replica placed: {'; '.join(reasons) or 'see `ray-vram plan`'}")
    return model_application(spec, reservations, serving, args.get("env"))


def build_router_app(args: dict[str, Any]) -> Application:
    """args: {"serving": ServingSettings?, "models": [ModelSpec]?, "app_name": str?} (`models`, when
    given, are declared to the routers of `app_name`, default ROUTER_APP)."""
    serving = ServingSettings.model_validate(args.get("serving") or {})
    if "models" in args:
        declare([ModelSpec.model_validate(m) for m in args["models"] or []], args.get("app_name", ROUTER_APP))
    return router_application(serving)


def declare(
    models: list[ModelSpec], app: str = ROUTER_APP, availability: Mapping[str, ModelAvailability] | None = None
) -> None:
    """Tell every router of application `app` (through its endpoint board) which models there are,
    and (`availability`) why a model has no ready replica, for its 503."""
    import ray

    ray.get(endpoint_board(app).declare.remote(routed_models(models, availability)))


def build_app(args: dict[str, Any]) -> Application:
    """The whole configuration as one application: the router with every model below it.

    `args` is the config (models, placement, serving) plus optional `app_name`: the name the
    application is deployed under, whose endpoint board its replicas announce themselves on.
    """
    args = dict(args)
    app_name = args.pop("app_name", "ray-vram")
    env = replica_env() | {ROUTER_APP_ENV: app_name}
    config = parse_config(args, "build_app args")
    plan = plan_models(config.models, config)
    groups = [
        model_application(spec, plan.replicas_of(spec.model_id), config.serving, env)
        for spec in config.models
        if plan.replicas_of(spec.model_id)
    ]
    declare(config.models, app_name)
    return router_application(config.serving, children=groups)
