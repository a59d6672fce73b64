"""Which vLLM engine arguments a model's `engine_kwargs` may not set, in any spelling vLLM accepts.

vLLM's parser takes `gpu-memory-utilization`, `gpu_memory_utilization` and the alias
`device-memory-utilization` alike, `--no-X` for booleans, `X.key` for one key of a JSON argument,
and keeps the last value given. So keys are first put in one spelling (`normalise_engine_kwargs`),
then checked against two tables by vLLM's *destination* name:

- `OWNED_ENGINE_ARGS`: what ray-vram sets or decides itself (the budget, the model and its names,
  media, the server's address and keys, one engine on one GPU): refused always.
- `CODE_LOADING_ENGINE_ARGS`: what makes vLLM import or run code named by the configuration (remote
  model code, worker/scheduler classes, middleware, parser plugins, logits processors, logging
  factories, connector modules): refused unless `serving.allow_remote_code` is true.

Pure (no vLLM import): the configuration schema uses it. `tests/unit/test_engine_guard_vllm.py`
enumerates every option string of the installed vLLM's `vllm serve` parser that maps to a guarded
destination and proves each spelling is refused, so a new alias cannot slip past unnoticed.
"""

from __future__ import annotations

import json
from typing import Any

#: vLLM engine arguments ray-vram sets from `media` (a model's engine_kwargs may not set them).
MEDIA_ENGINE_KWARGS = frozenset(
    {"limit_mm_per_prompt", "mm_processor_cache_gb", "allowed_local_media_path", "allowed_media_domains"}
)

_BUDGET = "ray-vram sets it from vram_gb (the replica's VRAM budget)"
_MODEL = "ray-vram sets it from model, model_id/router_name and max_model_len"
_MEDIA = "ray-vram sets it from the model's `media` settings; use those"
_ONE_GPU = "ray-vram runs one engine per replica, on the GPU it reserved"
_SERVER = "ray-vram sets the replica server's address, keys and TLS"
_METRICS = "ray-vram sets it from serving.engine_metrics"
_CONFIG = "a file of further arguments would bypass these checks; put them in engine_kwargs"

#: vLLM destination -> why a model may not set it.
OWNED_ENGINE_ARGS: dict[str, str] = {
    **dict.fromkeys(["gpu_memory_utilization", "kv_cache_memory_bytes", "num_gpu_blocks_override"], _BUDGET),
    **dict.fromkeys(["model", "model_tag", "served_model_name", "max_model_len"], _MODEL),
    **dict.fromkeys(sorted(MEDIA_ENGINE_KWARGS), _MEDIA),
    **dict.fromkeys(
        [
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "data_parallel_size",
            "data_parallel_size_local",
            "data_parallel_rank",
            "data_parallel_start_rank",
            "data_parallel_address",
            "data_parallel_rpc_port",
            "data_parallel_backend",
            "data_parallel_hybrid_lb",
            "data_parallel_external_lb",
            "data_parallel_multi_port_external_lb",
            "data_parallel_supervisor_port",
            "decode_context_parallel_size",
            "prefill_context_parallel_size",
            "nnodes",
            "node_rank",
            "master_addr",
            "master_port",
            "device_ids",
            "distributed_executor_backend",
            "headless",
            "api_server_count",
        ],
        _ONE_GPU,
    ),
    **dict.fromkeys(
        [
            "host",
            "port",
            "uds",
            "grpc",
            "grpc_port",
            "api_key",
            "root_path",
            "ssl_keyfile",
            "ssl_certfile",
            "ssl_ca_certs",
            "ssl_cert_reqs",
            "ssl_ciphers",
            "enable_ssl_refresh",
        ],
        _SERVER,
    ),
    "disable_log_stats": _METRICS,
    "config": _CONFIG,
}

#: vLLM destination -> what code it makes vLLM load.
CODE_LOADING_ENGINE_ARGS: dict[str, str] = {
    "trust_remote_code": "runs Python code shipped with the model repository",
    "code_revision": "picks the revision of the model's remote code",
    "worker_cls": "imports a worker class by name",
    "worker_extension_cls": "imports a worker extension class by name",
    "scheduler_cls": "imports a scheduler class by name",
    "middleware": "imports ASGI middleware by name",
    "tool_parser_plugin": "executes a Python file as a tool-parser plugin",
    "reasoning_parser_plugin": "executes a Python file as a reasoning-parser plugin",
    "logits_processors": "imports logits-processor classes by name",
    "io_processor_plugin": "loads an IO-processor plugin",
    "model_class_overrides": "imports model classes by name",
    "logging_config": "logging.config.dictConfig, which calls any factory it names",
    "log_config_file": "a logging config file, which calls any factory it names",
    "kv_transfer_config": "imports a KV connector module by path",
    "ec_transfer_config": "imports an encoder-cache connector module by path",
}

#: JSON arguments that are safe except for these keys (they name code to import).
CODE_LOADING_SUBKEYS: dict[str, dict[str, str]] = {
    "compilation_config": {"backend": "imports a compiler backend by name"},
}

#: Other spellings vLLM's parser maps to a guarded destination (its aliases, short options without
#: their dash): what the normalised key may be besides the destination itself.
ENGINE_ARG_ALIASES: dict[str, str] = {
    "device_memory_utilization": "gpu_memory_utilization",
    "tp": "tensor_parallel_size",
    "pp": "pipeline_parallel_size",
    "dp": "data_parallel_size",
    "dpl": "data_parallel_size_local",
    "dpn": "data_parallel_rank",
    "dpr": "data_parallel_start_rank",
    "dpa": "data_parallel_address",
    "dpp": "data_parallel_rpc_port",
    "dpb": "data_parallel_backend",
    "dph": "data_parallel_hybrid_lb",
    "dpe": "data_parallel_external_lb",
    "dpm": "data_parallel_multi_port_external_lb",
    "dcp": "decode_context_parallel_size",
    "pcp": "prefill_context_parallel_size",
    "n": "nnodes",
    "r": "node_rank",
    "cc": "compilation_config",
    "asc": "api_server_count",
}


def normalise_key(key: str) -> str:
    """One spelling per argument: no leading dashes, underscores for dashes (`--gpu-memory-utilization`
    -> `gpu_memory_utilization`); a `X.key` suffix (one key of a JSON argument) is kept."""
    name, dot, rest = key.strip().lstrip("-").partition(".")
    return name.replace("-", "_") + dot + rest


def normalise_engine_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with every key in one spelling; two keys that name the same argument are refused
    (vLLM would silently keep the last)."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise ValueError(f"engine argument names must be strings, got {key!r}")
        name = normalise_key(key)
        if not name or name.startswith("."):
            raise ValueError(f"{key!r} is not an engine argument name")
        if name in out:
            raise ValueError(f"{given[name]!r} and {key!r} are the same engine argument ({name}); give it once")
        out[name] = value
        given[name] = key
    return out


def destination(name: str) -> tuple[str, str | None, bool]:
    """(vLLM destination, sub-key of a JSON argument or None, negated) of a normalised key."""
    base, _, sub = name.partition(".")
    negated = base.startswith("no_") and len(base) > 3
    if negated:
        base = base[3:]
    base = ENGINE_ARG_ALIASES.get(base, base)
    return base, (sub.split(".")[0] if sub else None), negated


def owned_engine_args(kwargs: dict[str, Any]) -> list[str]:
    """One message per key of normalised `kwargs` that sets what ray-vram sets itself."""
    problems = []
    for name in kwargs:
        dest, _, _ = destination(name)
        if dest in OWNED_ENGINE_ARGS:
            shown = name if name == dest else f"{name} (vLLM's {dest})"
            problems.append(f"{shown}: {OWNED_ENGINE_ARGS[dest]}; remove it")
    return problems


def _json_keys(value: Any) -> set[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return set()
    return {normalise_key(str(k)) for k in value} if isinstance(value, dict) else set()


def code_loading_engine_args(kwargs: dict[str, Any]) -> list[str]:
    """One message per key of normalised `kwargs` that makes vLLM load code named by the configuration.
    Turning such a feature off (`trust_remote_code: false`, `no_trust_remote_code: true`) is fine."""
    problems = []
    for name, value in kwargs.items():
        dest, sub, negated = destination(name)
        if dest in CODE_LOADING_ENGINE_ARGS:
            off = (value is True) if negated else (value is None or value is False or value in ("", [], {}))
            if not off:
                problems.append(f"{name}: {CODE_LOADING_ENGINE_ARGS[dest]}")
        for key, why in CODE_LOADING_SUBKEYS.get(dest, {}).items():
            if sub == key or (sub is None and key in _json_keys(value)):
                problems.append(f"{name}: {dest}.{key} {why}")
    return problems
