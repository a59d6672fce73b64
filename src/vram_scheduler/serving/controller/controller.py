"""The serving controller: converges the cluster to a config, one model at a time.

Each model is its own Serve application (`model-<id>`), and the spec it was deployed with is
kept in Ray's GCS key-value store, so a controller started later with a changed config sees
what runs: unchanged models are left alone (same replicas, no restart), removed models are
deleted and their reservations freed, changed models are replaced, new models are planned and
deployed. The OpenAI router is its own application and learns replicas as they come up (through
the endpoint board). When a node leaves the Ray cluster, `repair` moves its replicas elsewhere.

Declared is what runs: every model of the values keeps its record, and a replica the planner found
no room for is `pending`, with the planner's reason and the time since when. `converge` places
pending replicas once room appears (a model removed or scaled down, a replica released, a GPU or
node joining), with the plan a fresh start would make, never moving or stopping a running replica;
each placement is an event in the model's record. `availability` tells the routers why a model
without a ready replica cannot answer (pending, loading or failed), for their 503.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import ray
from pydantic import BaseModel, Field
from ray import serve
from ray.experimental import internal_kv

from ...allocator.actor import AllocatorClient
from ...core.config import (
    ConfigError,
    ModelSpec,
    PlacementSettings,
    RayVRAMConfig,
    ServingSettings,
    check_remote_code,
    with_source,
)
from ...core.contract import (
    ApplyResult,
    DeploymentList,
    EndpointTable,
    ModelAvailability,
    ModelEvent,
    ModelStatus,
    Plan,
    ReplicaPhase,
    ReplicaStatus,
    Reservation,
    ResolvedSizes,
    SleepReport,
    Unplaced,
    WakeReport,
)
from ...core.errors import Unplaceable
from ...core.model_limits import effective_max_model_len, resolve_model, resolve_overheads
from ...core.planner import replica_id_for, replica_number
from ...core.ray_names import NAMESPACE
from ...core.replica_env import replica_env, without_secrets
from ..app import declare, model_app_name, model_application, router_application, router_settings
from ..endpoint_board import endpoint_board
from ..replica.placement import lost_nodes, router_addresses
from ..router.router import ROUTER_APP

_T = TypeVar("_T")
log = logging.getLogger(__name__)

SPEC_KEY_PREFIX = "serving/model/"
SERVING_KEY = "serving/settings"
#: Events kept per model (the newest).
EVENTS_KEPT = 20


#: Longest an operator's sleep or wake of one replica may take (a cold start loads the model).
WAKE_CALL_TIMEOUT_S = 900.0


class Pending(BaseModel):
    """Replicas of a model that hold no reservation: how many, the planner's reason, since when."""

    count: int = Field(ge=1)
    reason: str
    too_big: bool = Field(default=False, description="Larger than every GPU: needs a bigger one, not a free one.")
    since: float = Field(description="Unix time they were first found without room.")
    largest_free_bytes: int = Field(default=0, description="The largest free slot when the reason was written.")
    largest_free_gpu: str | None = Field(default=None, description="Where that slot was.")


class Deployed(BaseModel):
    """What the controller stores per model: the spec, the replicas it was deployed with (each a
    reservation), those still pending, and the latest events. One record per declared model."""

    spec: ModelSpec
    reservations: list[Reservation]
    pending: Pending | None = None
    events: list[ModelEvent] = Field(default_factory=list)
    deploying: bool = Field(
        default=False,
        description="A new attempt is being set up: the previous attempt's replica states are not shown.",
    )
    serving: ServingSettings | None = Field(default=None, description="The serving settings its replicas got.")
    env: dict[str, str] | None = Field(
        default=None,
        description="The environment its replicas got (the caller's: a restarted controller actor no longer "
        "has it). A moved replica gets the same, and its siblings, built the same, keep running.",
    )
    resolved: ResolvedSizes | None = Field(
        default=None, description="What the model resolved to when deployed (max_model_len, overhead, reservation)."
    )

    def replica_spec(self) -> ModelSpec:
        """The spec its replicas were built with: `spec` with the resolved max_model_len."""
        length = self.resolved.max_model_len if self.resolved else None
        return self.spec.model_copy(update={"max_model_len": length}) if length else self.spec


class Controller:
    """Python-level API of the serving controller (`ray-vram serve` and `ray-vram up` use it)."""

    def __init__(self, serving: ServingSettings | None = None, endpoint_host: str | None = None):
        if not ray.is_initialized():
            ray.init(namespace=NAMESPACE)
        self.serving = serving or ServingSettings()
        self.endpoint_host = endpoint_host
        self.allocator = AllocatorClient()
        self.reconciles = {"ok": 0, "error": 0}
        self._lock = threading.RLock()
        self._caller_env: dict[str, str] = {}

    # -- stored state -----------------------------------------------------------------------

    @staticmethod
    def deployed() -> dict[str, Deployed]:
        keys = internal_kv._internal_kv_list(SPEC_KEY_PREFIX, namespace=NAMESPACE) or []
        out = {}
        for key in keys:
            raw = internal_kv._internal_kv_get(key, namespace=NAMESPACE)
            if raw:
                record = Deployed.model_validate_json(raw)
                out[record.spec.model_id] = record
        return out

    @staticmethod
    def _store(record: Deployed) -> None:
        internal_kv._internal_kv_put(
            SPEC_KEY_PREFIX + record.spec.model_id, record.model_dump_json(), overwrite=True, namespace=NAMESPACE
        )

    @staticmethod
    def _forget(model_id: str) -> None:
        internal_kv._internal_kv_del(SPEC_KEY_PREFIX + model_id, namespace=NAMESPACE)

    @property
    def endpoint(self) -> str:
        host = self.endpoint_host or ("127.0.0.1" if self.serving.host in ("0.0.0.0", "::") else self.serving.host)
        return f"http://{host}:{self.serving.port}/v1"

    # -- converge ---------------------------------------------------------------------------

    def apply(self, config: RayVRAMConfig, env: dict[str, str] | None = None) -> ApplyResult:
        """Converge to `config`: which models were kept, deployed, removed, and the pending ones' reasons.
        `env`: the caller's variables for replicas (see `core.replica_env`), over this process's."""
        with self._lock:
            if env is not None:
                self._caller_env = dict(env)
            try:
                result = self._apply(config)
            except Exception:
                self.reconciles["error"] += 1
                raise
            self.reconciles["ok"] += 1
            return result

    def _apply(self, config: RayVRAMConfig) -> ApplyResult:
        config = config.model_copy(update={"models": [with_source(s, config.serving) for s in config.models]})
        check_model_limits(config.models)
        self.allocator.configure(config.placement)
        self.serving = config.serving
        current = self.deployed()
        wanted = {spec.model_id: spec for spec in config.models}
        removed = sorted(set(current) - set(wanted))
        for model_id in removed:
            self.remove(model_id)
        self._ensure_router()
        kept, deployed, unplaced = [], [], {}
        for spec in config.models:
            record = current.get(spec.model_id)
            unchanged = record is not None and record.spec == spec and not record.deploying
            if unchanged and (self._app_alive(spec.model_id) or not record.reservations):
                kept.append(spec.model_id)  # one with every replica pending: `_converge` places it
                continue
            others = [m for m in config.models if m.model_id != spec.model_id]
            self._deploy(spec, others, config.placement, keep_pending=True)
            deployed.append(spec.model_id)
        self._converge()  # room the removed and changed models freed
        for model_id, record in sorted(self.deployed().items()):
            if record.pending is not None:
                unplaced[model_id] = [record.pending.reason]
        self._declare(config.models)
        log.info("applied: kept %s, deployed %s, removed %s, unplaced %s", kept, deployed, removed, unplaced)
        return ApplyResult(kept=kept, deployed=deployed, removed=removed, unplaced=unplaced)

    def deploy(
        self, spec: ModelSpec, placement: PlacementSettings | None = None, env: dict[str, str] | None = None
    ) -> Plan:
        """Plan and deploy (or replace) one model; other models are untouched. Raises `Unplaceable`
        when nothing of it fits now: a refused request declares nothing (values applied keep such a
        model pending instead); replicas of it beyond those placed are pending."""
        spec = with_source(spec, self.serving)
        check_model_limits([spec])
        with self._lock:
            if env is not None:
                self._caller_env = dict(env)
            others = [r.spec for r in self.deployed().values() if r.spec.model_id != spec.model_id]
            self._ensure_router()
            try:
                plan = self._deploy(spec, others, placement)
            except Exception:
                self.reconciles["error"] += 1
                raise
            self.reconciles["ok"] += 1
            self._declare([*others, spec])
            return plan

    def _deploy(
        self, spec: ModelSpec, others: list[ModelSpec], placement: PlacementSettings | None, keep_pending: bool = False
    ) -> Plan:
        """Plan and deploy `spec`. Nothing placed: with `keep_pending` the model is stored with every
        replica pending; otherwise it is forgotten and `Unplaceable` raised."""
        check_remote_code(spec, self.serving)  # every deploy, from a values file or POST /v1/deployments
        previous = self.deployed().get(spec.model_id)
        if previous is not None and previous.spec == spec and self._app_alive(spec.model_id):
            return self._plan([spec, *others], placement)
        same = previous if previous is not None and previous.spec == spec else None
        if previous is not None or self._app_exists(spec.model_id):
            # The new attempt is what status shows from now on, never the replaced one's states.
            reservations = previous.reservations if previous else []
            events = same.events if same else []
            self._store(Deployed(spec=spec, reservations=reservations, deploying=True, events=events))
            self._teardown(spec.model_id)  # a changed model is replaced, never mixed old/new
        plan = self._plan([spec, *others], placement)
        reservations = plan.replicas_of(spec.model_id)
        unplaced = next((u for u in plan.unplaced if u.model_id == spec.model_id), None)
        if not reservations and not keep_pending:
            self._forget(spec.model_id)
            reasons = [unplaced.reason] if unplaced else [f"model {spec.model_id}: the plan placed no replica"]
            raise Unplaceable(spec.model_id, reasons)
        serving, env = self.serving, self._env()
        events = list(same.events) if same else []
        resolved = resolve_model(spec, self._settings(placement))[1]  # once; the replicas use it
        record = Deployed(spec=spec, reservations=reservations, serving=serving, env=env, resolved=resolved)
        if reservations:
            app = serve_race_retried(lambda: model_application(record.replica_spec(), reservations, serving, env))
            deploy_in_background(app, model_app_name(spec.model_id))
            events = _with_event(events, "placed", "placed " + _placements(reservations))
        pending = _pending(unplaced, same.pending if same else None)
        if pending is not None and (same is None or same.pending is None or same.pending.reason != pending.reason):
            events = _with_event(events, "pending", pending.reason)
        self._store(record.model_copy(update={"pending": pending, "events": events}))
        return plan

    def _plan(
        self, models: list[ModelSpec], placement: PlacementSettings | None, exclude_nodes: set[str] | None = None
    ) -> Plan:
        overheads = {k: o.bytes for k, o in resolve_overheads(models, self._settings(placement)).items()}
        return self.allocator.plan(models, placement, sorted(exclude_nodes or ()), overheads=overheads)

    def _settings(self, placement: PlacementSettings | None) -> PlacementSettings:
        """`placement`, or the allocator's settings in force."""
        if placement is not None:
            return placement
        return self.allocator.settings()

    def remove(self, model_id: str) -> bool:
        """Shut a model down and free its reservations; False if it was not deployed (idempotent)."""
        with self._lock:
            known = model_id in self.deployed() or self._app_exists(model_id)
            self._teardown(model_id)
            self._forget(model_id)
            self._converge()  # the room it held may place pending replicas
            self._declare([r.spec for r in self.deployed().values()])
            return known

    def sleep_model(self, model_id: str) -> list[SleepReport]:
        """Put every awake replica of a model to sleep (`ray-vram sleep`); each replica's state after.
        Raises `KeyError` for an unknown model, `ReplicaWakeError` (through Ray) for one that never sleeps."""
        return [
            SleepReport.model_validate(self._replica_call(model_id, rid, "sleep_now")) for rid in self._placed(model_id)
        ]

    def wake_model(self, model_id: str) -> list[WakeReport]:
        """Wake every replica of a model (`ray-vram wake`), one after another; each one's `WakeReport`."""
        return [WakeReport.model_validate(self._replica_call(model_id, rid, "wake")) for rid in self._placed(model_id)]

    def _placed(self, model_id: str) -> list[str]:
        record = self.deployed().get(model_id)
        if record is None:
            known = ", ".join(sorted(self.deployed())) or "none"
            raise KeyError(f"unknown model {model_id!r}; deployed: {known}")
        return [r.replica_id for r in record.reservations]

    @staticmethod
    def _replica_call(model_id: str, replica_id: str, method: str) -> dict[str, Any]:
        handle = serve.get_deployment_handle(replica_id, app_name=model_app_name(model_id))
        return getattr(handle, method).remote().result(timeout_s=WAKE_CALL_TIMEOUT_S)

    def remove_all(self) -> list[str]:
        with self._lock:
            ids = sorted(set(self.deployed()) | self._model_apps())
            for model_id in ids:  # every record first: nothing left pending to place in the room freed
                self._forget(model_id)
            for model_id in ids:
                self._teardown(model_id)
            self._declare([])
            return ids

    def _teardown(self, model_id: str) -> None:
        if self._app_exists(model_id):
            serve.delete(model_app_name(model_id), _blocking=True)
        held = [r.replica_id for r in self.allocator.reservations() if r.model_id == model_id]
        if held:  # one call and one GCS write for all of the model's replicas
            self.allocator.release_many(held)

    # -- router -----------------------------------------------------------------------------

    def _ensure_router(self) -> None:
        """The router application with the current settings, each router on a node (`router_addresses`)."""
        wanted = router_settings(self.serving)
        stored = _stored_router()
        previous = stored["routers"] if stored and stored["serving"] == wanted else []
        self._deploy_router(self.serving, router_addresses(self.serving, previous), stored)

    def _repair_routers(self) -> None:
        """Routers whose node left move to the nodes there are, with the settings they were deployed
        with (a restarted controller actor may not know newer ones yet)."""
        stored = _stored_router()
        if stored is None:
            return
        serving = ServingSettings.model_validate(stored["serving"])
        addresses = router_addresses(serving, stored["routers"])
        if addresses != stored["routers"]:
            log.warning("routers move from nodes %s to %s", stored["routers"], addresses)
            self._deploy_router(serving, addresses, stored)

    @staticmethod
    def _deploy_router(serving: ServingSettings, addresses: list[str | None], stored: dict[str, Any] | None) -> None:
        record = {"serving": router_settings(serving), "routers": addresses}
        if record == stored and ROUTER_APP in serve.status().applications:
            return
        app = serve_race_retried(lambda: router_application(serving, addresses))
        serve.run(app, name=ROUTER_APP, route_prefix=None)
        internal_kv._internal_kv_put(SERVING_KEY, json.dumps(record), overwrite=True, namespace=NAMESPACE)

    def _declare(self, models: list[ModelSpec]) -> None:
        """Tell the routers the declared models and why one without a ready replica cannot answer."""
        declare(models, availability=availability(self.status()))

    def publish(self) -> None:
        """Declare the stored models again with their current availability (the board keeps the
        version when nothing changed): a router's 503 says what holds now."""
        with self._lock:  # never an older list after a change `apply` or `remove` declared
            records = self.deployed()
            if records:  # none: nothing of ours to tell (`remove` declared the last change)
                self._declare([r.spec for _, r in sorted(records.items())])

    def shutdown(self) -> None:
        """Remove every model and the router (local mode's exit)."""
        with self._lock:
            self.remove_all()
            if ROUTER_APP in serve.status().applications:
                serve.delete(ROUTER_APP, _blocking=True)
            internal_kv._internal_kv_del(SERVING_KEY, namespace=NAMESPACE)

    # -- status -----------------------------------------------------------------------------

    @staticmethod
    def _app_exists(model_id: str) -> bool:
        return model_app_name(model_id) in serve.status().applications

    @staticmethod
    def _app_alive(model_id: str) -> bool:
        app = serve.status().applications.get(model_app_name(model_id))
        return app is not None and app.status in ("RUNNING", "DEPLOYING")

    @staticmethod
    def _model_apps() -> set[str]:
        prefix = model_app_name("")
        return {name.removeprefix(prefix) for name in serve.status().applications if name.startswith(prefix)}

    def _env(self) -> dict[str, str]:
        return without_secrets({**replica_env(), **self._caller_env}, self.serving)

    def status(self) -> DeploymentList:
        """`GET /v1/deployments`: every model, its replicas' state and where they are."""
        apps = serve.status().applications
        held = {r.replica_id: r for r in self.allocator.reservations()}
        models = []
        for model_id, record in sorted(self.deployed().items()):
            app = apps.get(model_app_name(model_id))
            replicas = []
            for planned in record.reservations:
                reservation = held.get(planned.replica_id)
                deployment = app.deployments.get(planned.replica_id) if app and not record.deploying else None
                state, error = _replica_state(deployment, reservation is not None and not record.deploying)
                where = reservation or planned
                replicas.append(
                    ReplicaStatus(
                        replica_id=planned.replica_id,
                        state=state,
                        node=where.node,
                        gpu_index=where.gpu_index,
                        gpu_uuid=where.gpu_uuid,
                        bytes=where.bytes,
                        error=error,
                        sleep=reservation.state if reservation is not None else None,
                    )
                )
            if record.pending is not None and not record.deploying:
                replicas += [
                    ReplicaStatus(
                        replica_id=replica_id,
                        state="pending",
                        reason=record.pending.reason,
                        since=record.pending.since,
                    )
                    for replica_id in pending_ids(model_id, record.reservations, record.pending.count)
                ]
            spec = record.spec
            models.append(
                ModelStatus(
                    model_id=model_id,
                    model=spec.model,
                    vram_gb=spec.vram_gb,
                    requested=None if spec.max_replicas else spec.replicas,
                    router_name=spec.router_name,
                    replicas=replicas,
                    unplaced=[record.pending.reason] if record.pending else [],
                    endpoint=self.endpoint,
                    events=record.events,
                    resolved=record.resolved,
                )
            )
        return DeploymentList(models=models)

    def wait_ready(self, model_ids: list[str] | None = None, timeout_s: float = 600) -> DeploymentList:
        """Block until every placed replica of `model_ids` (default: all) is ready; raise on failure or
        timeout. Pending replicas are not waited for: they have no room (the status says why)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            chosen = [
                r
                for m in status.models
                if model_ids is None or m.model_id in model_ids
                for r in m.replicas
                if r.state != "pending"
            ]
            failed = [r for r in chosen if r.state == "failed"]
            if failed:
                raise RuntimeError("; ".join(f"{r.replica_id}: {r.error}" for r in failed))
            if all(r.state == "ready" for r in chosen) and self._routed(chosen):
                return status
            if time.monotonic() > deadline:
                states = ", ".join(f"{r.replica_id} {r.state} ({r.where})" for r in chosen)
                raise TimeoutError(f"replicas not ready after {timeout_s:g}s: {states}")
            time.sleep(0.5)

    def _routed(self, replicas: list[ReplicaStatus]) -> bool:
        wanted = {r.replica_id for r in replicas}
        if not wanted:
            return True
        table = EndpointTable.model_validate(ray.get(endpoint_board(ROUTER_APP).table.remote(), timeout=30))
        return wanted <= {e.replica_id for e in table.endpoints}

    # -- nodes leaving ----------------------------------------------------------------------

    def repair(self) -> dict[str, list[str]]:
        """Move the routers and the replicas of nodes that left the Ray cluster: a router goes to
        another node (`placement.router_addresses`); a replica (`placement.lost_nodes`): free its
        reservations, plan them again on the other nodes and redeploy their models, in which every
        other replica keeps running (`options.keep_if_unchanged`). Returns {model_id: moved replica ids}.

        Serve alone would restart such a replica pinned to the node that left, where it never
        starts. A model waits while one of its other replicas holds no reservation yet (still
        starting): planned now, a moved replica could be given that replica's room.
        """
        with self._lock:
            self._repair_routers()
        records = self.deployed()
        lost = lost_nodes({r.node for record in records.values() for r in record.reservations})
        if not lost:
            return {}
        moved: dict[str, list[str]] = {}
        with self._lock:
            records = self.deployed()
            for model_id, record in sorted(records.items()):
                gone = [r for r in record.reservations if r.node in lost]
                if not gone or record.deploying:
                    continue
                held = {r.replica_id for r in self.allocator.reservations()}
                staying = [r for r in record.reservations if r.node not in lost]
                if any(r.replica_id not in held for r in staying):
                    log.info("model %s: moving %s once its other replicas hold their reservations", model_id, gone)
                    continue
                for reservation in gone:
                    self.allocator.release(reservation.replica_id)
                others = [r.spec for other, r in records.items() if other != model_id]
                plan = self._plan([record.spec, *others], None, lost)
                reservations = plan.replicas_of(model_id)
                unplaced = next((u for u in plan.unplaced if u.model_id == model_id), None)
                pending = _pending(unplaced, record.pending)
                serving = record.serving or self.serving
                env = self._env() if record.env is None else record.env
                app = serve_race_retried(
                    lambda: model_application(record.replica_spec(), reservations, serving, env)  # noqa: B023
                )
                deploy_in_background(app, model_app_name(model_id))
                message = (
                    f"node(s) {', '.join(sorted(lost))} left the Ray cluster: {', '.join(r.replica_id for r in gone)} "
                    f"planned again: " + (_placements(reservations) or "nothing placed")
                )
                events = _with_event(record.events, "moved", message)
                if pending is not None:
                    events = _with_event(events, "pending", pending.reason)
                self._store(
                    record.model_copy(update={"reservations": reservations, "pending": pending, "events": events})
                )
                moved[model_id] = [r.replica_id for r in gone]
                log.warning(
                    "node(s) %s left the Ray cluster: model %s's replicas %s planned again: %s",
                    ", ".join(sorted(lost)),
                    model_id,
                    [r.replica_id for r in gone],
                    [f"{r.replica_id} on {r.node} GPU {r.gpu_index}" for r in reservations],
                )
        return moved

    # -- pending replicas -------------------------------------------------------------------

    def converge(self) -> dict[str, list[str]]:
        """Place pending replicas where room has appeared; returns {model_id: replica ids placed}."""
        if not any(record.pending for record in self.deployed().values()):
            return {}
        with self._lock:
            return self._converge()

    def _converge(self) -> dict[str, list[str]]:
        """Plan the stored models as a fresh start would (every reservation held stays where it is)
        and deploy each pending model's new replicas beside its running ones (`keep_if_unchanged`:
        those keep running). Waits while a planned replica holds no reservation yet and has not
        failed (starting: planned now, its room could be given away twice)."""
        records = self.deployed()
        waiting = sorted(m for m, record in records.items() if record.pending and not record.deploying)
        if not waiting:
            return {}
        held = {r.replica_id for r in self.allocator.reservations()}
        unheld = {r.replica_id for record in records.values() for r in record.reservations} - held
        if unheld:
            states = {r.replica_id: r.state for m in self.status().models for r in m.replicas}
            starting = sorted(rid for rid in unheld if states.get(rid) != "failed")
            if starting:
                log.debug("pending replicas wait for %s to hold their reservations", starting)
                return {}
        plan = self._plan([record.spec for _, record in sorted(records.items())], None)
        placed: dict[str, list[str]] = {}
        for model_id in waiting:
            record = records[model_id]
            assert record.pending is not None
            if any(r.replica_id in unheld for r in record.reservations):
                continue  # a failed replica of its own: its number and room are still its record's
            new = [r for r in plan.new if r.model_id == model_id][: record.pending.count]
            left = record.pending.count - len(new)
            unplaced = next((u for u in plan.unplaced if u.model_id == model_id), None)
            if not new:
                if unplaced is not None and _room_changed(record.pending, unplaced):
                    pending = _pending(unplaced, record.pending)
                    self._store(record.model_copy(update={"pending": pending}))
                continue
            reservations = [*record.reservations, *new]
            pending = _pending(unplaced, record.pending) if left and unplaced is not None else None
            if left and pending is None:
                pending = record.pending.model_copy(update={"count": left})
            serving = record.serving or self.serving
            env = self._env() if record.env is None else record.env
            app = serve_race_retried(lambda: model_application(record.replica_spec(), reservations, serving, env))  # noqa: B023
            deploy_in_background(app, model_app_name(model_id))
            waited = time.time() - record.pending.since
            message = (
                f"placed {_placements(new)}: room appeared after {waited:.0f}s pending (was: {record.pending.reason})"
            )
            events = _with_event(record.events, "placed", message)
            self._store(record.model_copy(update={"reservations": reservations, "pending": pending, "events": events}))
            placed[model_id] = [r.replica_id for r in new]
            log.info("model %s: %s", model_id, message)
        return placed


def pending_ids(model_id: str, reservations: list[Reservation], count: int) -> list[str]:
    """Names of a model's pending replicas: the lowest replica numbers its reservations do not take
    (the numbers the planner gives them once placed)."""
    taken = {replica_number(r.replica_id) for r in reservations}
    ids: list[str] = []
    number = 0
    while len(ids) < count:
        if number not in taken:
            ids.append(replica_id_for(model_id, number))
        number += 1
    return ids


def _pending(unplaced: Unplaced | None, previous: Pending | None) -> Pending | None:
    """The pending record for the planner's `unplaced`, keeping the time since it has had no room."""
    if unplaced is None:
        return None
    since = previous.since if previous is not None else time.time()
    return Pending(
        count=unplaced.count,
        reason=unplaced.reason,
        too_big=unplaced.too_big,
        since=since,
        largest_free_bytes=unplaced.largest_free_bytes,
        largest_free_gpu=unplaced.largest_free_gpu,
    )


#: A pending reason is written again when the largest free slot moved or changed by this much: host
#: memory (local mode on CPU) drifts by megabytes from poll to poll, and each write is a GCS write and
#: a new endpoint-board version for every router.
REASON_REFRESH_BYTES = 256 * 1024**2


def _room_changed(pending: Pending, unplaced: Unplaced) -> bool:
    """Whether the planner's view of a still-pending model differs enough to write its reason again."""
    return (
        pending.count != unplaced.count
        or pending.too_big != unplaced.too_big
        or pending.largest_free_gpu != unplaced.largest_free_gpu
        or abs(pending.largest_free_bytes - unplaced.largest_free_bytes) >= REASON_REFRESH_BYTES
    )


def _with_event(events: list[ModelEvent], kind: str, message: str) -> list[ModelEvent]:
    return [*events, ModelEvent(at=time.time(), kind=kind, message=message)][-EVENTS_KEPT:]


def _placements(reservations: list[Reservation]) -> str:
    return ", ".join(f"{r.replica_id} on node {r.node}, GPU {r.gpu_index}" for r in reservations)


def availability(models: DeploymentList) -> dict[str, ModelAvailability]:
    """Per model, whether it can answer and, when not, why: serving (a replica is ready), loading
    (one is starting), failed (the last error), pending (none placed: the reason, since when)."""
    out = {}
    for model in models.models:
        states = [r.state for r in model.replicas]
        failed = [r for r in model.replicas if r.state == "failed"]
        pending = model.pending
        if "ready" in states:
            out[model.model_id] = ModelAvailability(state="serving")
        elif "loading" in states or "reserved" in states:
            out[model.model_id] = ModelAvailability(state="loading")
        elif failed:
            out[model.model_id] = ModelAvailability(
                state="failed", detail=f"{failed[-1].replica_id}: {failed[-1].error}"
            )
        elif pending:
            out[model.model_id] = ModelAvailability(state="pending", detail=pending[0].reason, since=pending[0].since)
        else:
            out[model.model_id] = ModelAvailability(state="loading")
    return out


def _stored_router() -> dict[str, Any] | None:
    """The router application as last deployed: {"serving": settings, "routers": node addresses}."""
    raw = internal_kv._internal_kv_get(SERVING_KEY, namespace=NAMESPACE)
    stored = json.loads(raw) if raw else None
    return stored if isinstance(stored, dict) and {"serving", "routers"} <= set(stored) else None


def stored_serving_settings() -> ServingSettings | None:
    """The serving settings the cluster's router was last deployed with, `model_sources` aside
    (`app.router_settings`; None before any)."""
    stored = _stored_router()
    return ServingSettings.model_validate(stored["serving"]) if stored else None


def check_model_limits(specs: list[ModelSpec]) -> None:
    """Refuse, before anything is planned or reserved, a `max_model_len` over a model's own maximum
    (where the controller can read the model's config without downloading; replicas check again)."""
    problems = []
    for spec in specs:
        try:
            effective_max_model_len(spec)
        except ConfigError as error:
            problems += [f"{spec.model_id}: {p}" for p in error.problems]
    if problems:
        raise ConfigError("models", problems)


def deploy_in_background(app: Any, name: str) -> None:
    """Submit a Serve application and return at once (replicas load in the background)."""
    from ray.serve.api import RunTarget

    serve.run_many(
        [RunTarget(target=app, name=name, route_prefix=None)],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )


def _replica_state(deployment: Any, reserved: bool) -> tuple[ReplicaPhase, str | None]:
    if deployment is None:
        return ("loading" if reserved else "reserved"), None
    status = str(deployment.status)
    if status.endswith("HEALTHY") and not status.endswith("UNHEALTHY"):
        return "ready", None
    if status.endswith(("UNHEALTHY", "DEPLOY_FAILED")):
        return "failed", _last_line(deployment.message)
    return ("loading" if reserved else "reserved"), None


def _last_line(message: str) -> str:
    """The reason Serve recorded, without the remote traceback around it."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if "ReplicaStartupError" in line or line.startswith("replica "):
            return line.split("ReplicaStartupError: ", 1)[-1]
    return lines[-1] if lines else "failed"


def serve_race_retried(build: Callable[[], _T], attempts: int = 5) -> _T:
    """`build()` (a Serve application), again if Ray Serve's own thread race hit it.

    Every `RequestRouterConfig` Ray Serve constructs registers and then unregisters its router
    module with cloudpickle, unguarded; two threads doing it at once (our deploy, and a handle's
    long-poll thread decoding a deployment config) make one of them raise "... is not registered
    for pickle by value". Seen once in CI in `ray-vram serve`; building again succeeds.
    """
    for attempt in range(attempts):
        try:
            return build()
        except ValueError as error:
            if "registered for pickle by value" not in str(error) or attempt == attempts - 1:
                raise
            log.warning("Ray Serve config race while building an application (retrying): %s", error)
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("not reached")
