"""The one configuration schema: what users write in values files, local mode, the SDK and the controller.

Everything that reads model or serving settings goes through these models, and the chart's
``values.schema.json`` model section is generated from them (``ray-vram schema``), so the
chart, the controller and the SDK can never disagree about what a valid model is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from .engine_guard import code_loading_engine_args, normalise_engine_kwargs, owned_engine_args
from .errors import RayVramError
from .loopback import is_loopback_host

GIB = 1024**3

MODEL_ID_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"


class StrictModel(BaseModel):
    """Base for every user-facing model: unknown keys are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


#: The most pixels any image may have: Pillow's decompression-bomb limit, which vLLM applies too.
MAX_IMAGE_PIXELS = 178_956_970


class MediaSettings(StrictModel):
    """What a vision or speech model accepts per request. The limits bound the memory its
    multimodal encoder, encoder cache and processor cache use (so they are part of sizing), and
    the OpenAI router refuses a request beyond them before any replica sees it. Text-only models
    ignore them."""

    images_per_prompt: int = Field(
        default=4,
        ge=0,
        le=64,
        description="Most images one chat request may carry (vLLM's limit_mm_per_prompt.image; the encoder "
        "is profiled for this many).",
    )
    audios_per_prompt: int = Field(
        default=1,
        ge=0,
        le=16,
        description="Most audio clips one request may carry (limit_mm_per_prompt.audio); a transcription is one.",
    )
    max_item_mb: float = Field(
        default=10.0,
        gt=0,
        le=1024,
        description="Largest image or audio file in MiB, as sent (a data URL's decoded bytes, an uploaded file).",
    )
    max_image_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        le=MAX_IMAGE_PIXELS,
        description="Largest image in pixels (width × height); larger ones are refused, never decoded.",
    )
    processor_cache_gb: float = Field(
        default=0.25,
        ge=0,
        description="vLLM's cache of preprocessed images/audio (mm_processor_cache_gb), in host memory; "
        "counted in the budget on CPU; 0 turns it off.",
    )
    local_media_dir: str | None = Field(
        default=None,
        min_length=1,
        description="Directory on the model's nodes that `file://` image URLs may name (vLLM's "
        "allowed_local_media_path); unset: file URLs are refused.",
    )
    media_domains: list[str] = Field(
        default_factory=list,
        description="Hosts that http(s) image URLs may name (vLLM's allowed_media_domains); empty (default): "
        "no downloads, only data URLs and local files.",
    )

    @field_validator("local_media_dir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"must be an absolute path on the model's nodes, got {value!r}")
        return value

    @property
    def max_item_bytes(self) -> int:
        return round(self.max_item_mb * 1024**2)


SleepLevel = Literal[1, 2]


class SleepPolicy(StrictModel):
    """When an idle replica sleeps and how deep (docs/operations.md "More models than VRAM"). Asleep, a replica
    keeps only its sleeping footprint on the GPU, and its first request wakes it."""

    after_idle_s: float = Field(gt=0, description="Seconds without a request after which a replica goes to sleep.")
    level: SleepLevel = Field(
        default=1,
        description="1: the weights move to host RAM (placement.sleep.level1_host_gb_per_node bounds them; a "
        "sleeper beyond it goes to level 2), the KV cache is dropped; fastest wake. 2: weights and KV cache "
        "are dropped, a wake reloads the weights. On CPU (no sleep mode) the engine is stopped either way.",
    )
    footprint_gb: float | None = Field(
        default=None,
        ge=0,
        description="VRAM a sleeping replica keeps on its GPU (its engine's context), as measured; unset: "
        "the default sleeping footprint (2.3 GiB, from 1.74 GiB measured for a 7B-class model + margin).",
    )


class ModelSpec(StrictModel):
    """One model to serve and how much VRAM each of its replicas may use."""

    model_id: str = Field(
        pattern=MODEL_ID_PATTERN,
        description="Name clients use in the OpenAI `model` field; lowercase letters, digits, '.', '_', '-'.",
        examples=["qwen-0.5b"],
    )
    model: str = Field(
        min_length=1,
        description="Model source: a Hugging Face repository name or a local directory path.",
        examples=["Qwen/Qwen2-0.5B-Instruct", "/models/qwen"],
    )
    vram_gb: float = Field(
        gt=0,
        description="VRAM budget per replica in GiB (weights + KV cache + activations): vLLM's share of the GPU. "
        "The replica's reservation, which packing counts and its engine is capped to, is vram_gb + its overhead.",
    )
    overhead_gb: float | None = Field(
        default=None,
        ge=0,
        description="VRAM a replica uses beyond vram_gb (what vLLM does not count, plus a margin), as "
        "`ray-vram measure` recommends it. Unset: placement.replica_overhead_gb when set, else derived from "
        'the size of the model\'s weights (docs/configuration.md "Overheads").',
    )
    replicas: int = Field(default=1, ge=1, le=1024, description="Number of replicas to place.")
    max_replicas: bool = Field(
        default=False,
        description="Place as many replicas as fit in the remaining VRAM (instead of `replicas`).",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="Longest prompt + completion in tokens; default 8192 or the model's own maximum "
        "(its config.json), whichever is smaller. More than the model's maximum is refused.",
    )
    max_tokens: int = Field(default=256, ge=1, description="Default completion length when a request sets none.")
    router_name: str | None = Field(
        default=None,
        min_length=1,
        description="Extra name the model answers to (an alias routed to the same replicas).",
    )
    gpu_type: str | None = Field(
        default=None,
        min_length=1,
        description="Only place on GPUs whose name contains this text (case-insensitive), e.g. 'H100'.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra vLLM engine arguments (e.g. dtype, enforce_eager, quantization), in any spelling "
        "vLLM takes (dashes or underscores, leading --, no_ for a boolean's negative form). Arguments ray-vram "
        "sets (budget, model, names, media, server address and keys, parallelism) are refused; arguments that "
        "load code (trust_remote_code, worker/scheduler classes, middleware, plugins, logits processors) only "
        "with serving.allow_remote_code.",
    )
    media: MediaSettings = Field(
        default_factory=MediaSettings,
        description="Images and audio per request, their sizes and where they may come from (vision and "
        "speech models; see docs/multimodal.md).",
    )
    sleep: SleepPolicy | None = Field(
        default=None,
        description="Idle replicas of this model sleep (and a request wakes them); unset: "
        "placement.sleep.after_idle_s when set, else the model never sleeps.",
    )
    pinned: bool = Field(
        default=False,
        description="Never sleeps and is never put to sleep to make room for another model's wake.",
    )

    @model_serializer(mode="wrap")
    def _dump_without_unused_replicas(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A max_replicas spec dumps without `replicas`, so every dump validates again unchanged."""
        data: dict[str, Any] = handler(self)
        if self.max_replicas and isinstance(data, dict):
            data.pop("replicas", None)
        return data

    @model_validator(mode="after")
    def _replicas_xor_max(self) -> ModelSpec:
        if self.max_replicas and "replicas" in self.model_fields_set:
            raise ValueError(
                f"set either replicas ({self.replicas}) or max_replicas: true, not both — "
                "max_replicas places as many replicas as fit"
            )
        return self

    @model_validator(mode="after")
    def _pinned_never_sleeps(self) -> ModelSpec:
        if self.pinned and self.sleep is not None:
            raise ValueError(
                f"pinned: true never sleeps, but sleep is set (after_idle_s {self.sleep.after_idle_s:g}); "
                "remove one of them"
            )
        return self

    @field_validator("engine_kwargs", mode="before")
    @classmethod
    def _engine_kwargs_guarded(cls, value: Any) -> Any:
        """Keys in vLLM's canonical spelling, then refuse what ray-vram sets itself (any spelling)."""
        if not isinstance(value, dict):
            return value
        kwargs = normalise_engine_kwargs(value)
        problems = owned_engine_args(kwargs)
        if problems:
            raise ValueError("; ".join(problems))
        return kwargs

    def remote_code(self) -> list[str]:
        """What in `engine_kwargs` makes vLLM load code named by the configuration (empty: nothing)."""
        return code_loading_engine_args(self.engine_kwargs)

    @property
    def vram_bytes(self) -> int:
        return gib_to_bytes(self.vram_gb)

    @property
    def names(self) -> list[str]:
        """Every name a request may use for this model."""
        return [self.model_id] + ([self.router_name] if self.router_name else [])


class SleepSettings(StrictModel):
    """The cluster's rules for sleeping replicas: how many a GPU holds, where level-1 weights live,
    and the idle time of models that state no `sleep` of their own."""

    after_idle_s: float | None = Field(
        default=None,
        gt=0,
        description="Every model that is not pinned and states no sleep of its own sleeps (level 1) after "
        "this many idle seconds; unset (default): only models with their own sleep do.",
    )
    max_asleep_per_gpu: int = Field(
        default=4,
        ge=0,
        description="Most sleeping replicas one GPU holds (each keeps its sleeping footprint); a replica "
        "put to sleep beyond it is stopped instead (it holds nothing, and its next wake is a cold start).",
    )
    level1_host_gb_per_node: float = Field(
        default=64.0,
        ge=0,
        description="Host RAM per node that the weights of level-1 sleepers may use; a sleeper beyond it "
        "sleeps at level 2 (its weights are dropped and reloaded on wake).",
    )


class PlacementSettings(StrictModel):
    """How replicas are packed and how the ledger treats silent nodes and dead owners."""

    replica_overhead_gb: float | None = Field(
        default=None,
        ge=0,
        description="Overhead (VRAM beyond the budget) of every model that states no overhead_gb of its own. "
        "Unset (default): each model's is derived from the size of its weights, or 2.4 GiB where they "
        "cannot be read.",
    )
    stale_after_s: float = Field(
        default=10.0, gt=0, description="A node whose inventory is older than this gets no new reservations."
    )
    reclaim_interval_s: float = Field(
        default=5.0, gt=0, description="How often reservations of dead owners are reclaimed."
    )
    sleep: SleepSettings = Field(
        default_factory=SleepSettings,
        description='Sleeping replicas (docs/operations.md "More models than VRAM").',
    )


class ModelSource(StrictModel):
    """A local model directory that a `model` name stands for, and the engine arguments it is served with."""

    path: str = Field(min_length=1, description="The model's directory, present on every GPU node.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Engine arguments for this model; a model's own engine_kwargs win."
    )

    @field_validator("engine_kwargs")
    @classmethod
    def _one_spelling(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Keys in vLLM's canonical spelling (what a model's own engine_kwargs are merged over); what
        ray-vram sets itself is refused when a model is served from it (`with_source`)."""
        return normalise_engine_kwargs(value)


class ServingSettings(StrictModel):
    """The OpenAI-compatible endpoint."""

    host: str = Field(
        default="0.0.0.0",
        description="Address the OpenAI endpoint listens on (local mode: 127.0.0.1 unless set). Any address "
        "but loopback requires api_key_env.",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the OpenAI-compatible endpoint.")
    api_key_env: str | None = Field(
        default="RAY_VRAM_API_KEY",
        description="Environment variable holding the bearer API key; unset or empty variable = no auth "
        "(local mode refuses a non-loopback host without a key). Required (not null) when host is not loopback.",
    )
    request_timeout_s: float = Field(default=600.0, gt=0, description="Longest a request may take.")
    max_body_mb: float = Field(
        default=64.0,
        gt=0,
        le=4096,
        description="Largest JSON request body (completions, chat) in MiB; larger ones get 413 before they are "
        "read. Images sent as data URLs count at 4/3 of their size (the default fits 4 images of 10 MiB). "
        "Audio uploads are bounded by their model's media.max_item_mb instead.",
    )
    client_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest a client may take to send a request's headers, and then its body (408 after).",
    )
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="Requests a replica takes at once; more wait in the router's queue."
    )
    max_queued_requests: int = Field(
        default=256,
        ge=0,
        description="Requests per model each router holds while every replica of the model is at "
        "max_ongoing_requests; beyond that a request is refused at once with 429 and Retry-After.",
    )
    max_queue_wait_s: float = Field(
        default=30.0,
        ge=0,
        description="Longest a request waits in a router's queue for a replica with room; then 429 with Retry-After.",
    )
    max_wake_wait_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest a request for a sleeping or stopped model waits while a replica of it wakes; "
        "then 503 with Retry-After.",
    )
    engine_metrics: bool = Field(
        default=True,
        description="Export per-request metrics through Ray's metrics agent on every Ray node: vLLM's engine "
        "metrics (ray_vllm_*: TTFT, tokens, queue, KV cache) and the routers' request counts and latencies "
        "(ray_vram_router_*); off saves a little CPU per request.",
    )
    router_replicas: int = Field(
        default=2,
        ge=1,
        description="Router processes (Serve replicas) answering the endpoint; each listens on `port` of its "
        "node, so while one dies or restarts the others answer.",
    )
    router_placement: Literal["spread", "head"] = Field(
        default="spread",
        description="spread: routers on different Ray nodes when there are several (else together on one); "
        "where nodes are labelled `ray-vram.io/router-host=true` (the chart's head and CPU pods, the ones its "
        "`openai` Service reaches) only on those, at least one each; head: all on the head node.",
    )

    model_sources: dict[str, ModelSource] = Field(
        default_factory=dict,
        description="Model names that stand for a local directory: a model whose `model` is one of them is served "
        "from that path, with the source's engine_kwargs under its own. `ray-vram up` and `ray-vram serve` list "
        "the generated demo models here (demo, demo-vision, demo-audio).",
    )
    allow_remote_code: bool = Field(
        default=False,
        description="Let models' engine_kwargs load code: trust_remote_code (the model repository's Python), "
        "worker/scheduler classes, middleware, tool/reasoning parser plugins, logits processors, logging "
        "factories, KV connector modules. Off: such a model is refused, in values files and in "
        "POST /v1/deployments alike. Turn on only when everyone who can deploy models may run code on the GPU nodes.",
    )

    @field_validator("api_key_env")
    @classmethod
    def _key_beyond_loopback(cls, value: str | None, info: ValidationInfo) -> str | None:
        host = info.data.get("host")
        if host is not None and not is_loopback_host(host) and not (value or "").strip():
            raise ValueError(
                f"required when serving.host = {host!r} (reachable from other hosts): name the environment "
                "variable that holds the endpoint's API key (e.g. RAY_VRAM_API_KEY), or listen on 127.0.0.1"
            )
        return value


class RayVRAMConfig(StrictModel):
    """The whole configuration file: what `ray-vram up`, `ray-vram serve` and the chart share."""

    models: list[ModelSpec] = Field(default_factory=list, description="Models to serve.")
    placement: PlacementSettings = Field(default_factory=PlacementSettings)
    serving: ServingSettings = Field(default_factory=ServingSettings)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        seen: dict[str, str] = {}
        for position, spec in enumerate(models):
            named = [("model_id", spec.model_id)] + ([("router_name", spec.router_name)] if spec.router_name else [])
            for key, name in named:
                where = f"models[{position}].{key}"
                if name in seen:
                    raise ValueError(
                        f"{where} = {name!r} is already used by {seen[name]}; "
                        "every model_id and router_name must be unique (requests are routed by name)"
                    )
                seen[name] = where
        return models

    @model_validator(mode="after")
    def _remote_code_allowed(self) -> RayVRAMConfig:
        problems = [
            f"models[{i}].{problem}"
            for i, spec in enumerate(self.models)
            for problem in remote_code_problems(spec, self.serving)
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def model(self, name: str) -> ModelSpec:
        """The model answering to `name` (model_id or router_name)."""
        for spec in self.models:
            if name in spec.names:
                return spec
        known = ", ".join(n for spec in self.models for n in spec.names) or "none"
        raise KeyError(f"unknown model {name!r}; known: {known}")


def sleep_policy(spec: ModelSpec, settings: PlacementSettings) -> SleepPolicy | None:
    """How `spec`'s idle replicas sleep: its own policy, else the cluster's idle time at level 1
    (None: it never sleeps, pinned or no idle time anywhere)."""
    if spec.pinned:
        return None
    if spec.sleep is not None:
        return spec.sleep
    if settings.sleep.after_idle_s is not None:
        return SleepPolicy(after_idle_s=settings.sleep.after_idle_s)
    return None


def with_source(spec: ModelSpec, serving: ServingSettings) -> ModelSpec:
    """`spec` served from the directory its `model` stands for in `serving.model_sources` (with the
    source's engine_kwargs under its own), validated again; any other spec as it is."""
    source = serving.model_sources.get(spec.model)
    if source is None:
        return spec
    data = spec.model_dump() | {"model": source.path, "engine_kwargs": source.engine_kwargs | spec.engine_kwargs}
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"serving.model_sources[{spec.model!r}]", describe_validation_error(error)) from None


def remote_code_problems(spec: ModelSpec, serving: ServingSettings) -> list[str]:
    """Why `spec` may not be served under `serving`: its engine arguments load code and
    `serving.allow_remote_code` is off (empty: allowed)."""
    if serving.allow_remote_code:
        return []
    return [
        f"engine_kwargs.{problem}; refused unless serving.allow_remote_code is true (see docs/security.md)"
        for problem in spec.remote_code()
    ]


def check_remote_code(spec: ModelSpec, serving: ServingSettings) -> None:
    """Raise `ConfigError` naming each code-loading engine argument of `spec` that `serving` does not allow."""
    problems = remote_code_problems(spec, serving)
    if problems:
        raise ConfigError(f"model {spec.model_id!r}", problems)


class ConfigError(RayVramError, ValueError):
    """A configuration that cannot be used, with messages naming field, value and reason."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid configuration\n" + "\n".join(f"  - {p}" for p in problems))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, list[str]]]:
        # Picklable with its fields, so it crosses Ray task boundaries intact.
        return (type(self), (self.source, self.problems))


def gib_to_bytes(gib: float) -> int:
    return round(gib * GIB)


def format_gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB"


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def describe_validation_error(error: ValidationError) -> list[str]:
    """One line per problem: `models[1].vram_gb = -3: Input should be greater than 0`."""
    problems = []
    for item in error.errors(include_url=False):
        message = re.sub(r"^(Value|Assertion) error, ", "", item["msg"])
        where = _location(tuple(item["loc"]))
        if item["type"] == "extra_forbidden":
            value = f" = {item['input']!r}" if not isinstance(item.get("input"), dict | list) else ""
            problems.append(f"{where}{value}: unknown key (allowed keys are listed by `ray-vram schema`)")
        elif item["type"] == "missing":
            problems.append(f"{where}: required key is missing")
        elif "input" in item and not isinstance(item["input"], dict | list):
            problems.append(f"{where} = {item['input']!r}: {message}")
        else:
            problems.append(f"{where}: {message}")
    return problems


def parse_config(data: Any, source: str = "config") -> RayVRAMConfig:
    """Validate a loaded mapping; raise `ConfigError` naming each bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"expected a mapping at the top level, got {type(data).__name__}"])
    try:
        return RayVRAMConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(source, describe_validation_error(error)) from None


def load_config(path: str | Path) -> RayVRAMConfig:
    """Read a YAML/JSON config file (a chart values file works too: its `models`, `placement`
    and `serving` keys are taken, everything else is the chart's business)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(str(path), ["file not found"]) from None
    except yaml.YAMLError as error:
        raise ConfigError(str(path), [f"not valid YAML: {error}"]) from None
    if isinstance(data, dict) and _looks_like_chart_values(data):
        data = {key: data[key] for key in RayVRAMConfig.model_fields if key in data}
    return parse_config(data, str(path))


def _looks_like_chart_values(data: dict[str, Any]) -> bool:
    return bool(set(data) - set(RayVRAMConfig.model_fields)) and bool(
        {"rayCluster", "kuberay-operator", "monitor", "controller", "image"} & set(data)
    )


def config_json_schema(
    kind: Literal["config", "models"] = "config",
) -> dict[str, Any]:
    """JSON schema of the whole config or of the `models` list (for the chart's values.schema.json)."""
    schema = RayVRAMConfig.model_json_schema(mode="validation")
    if kind == "models":
        return {
            "type": "array",
            "items": {"$ref": "#/$defs/ModelSpec"},
            "$defs": schema["$defs"],
        }
    return schema
