"""ray-vram: VRAM-aware LLM serving on Ray.

The public API is imported lazily: ``from vram_scheduler import VRAMScheduler, inference``
loads neither Ray nor vLLM; ``get_vram_allocator()`` imports Ray when it is called.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> submodule defining it.
_EXPORTS = {
    "VRAMScheduler": "sdk.client",
    "DeployResult": "sdk.client",
    "DeploymentStatus": "core.contract",
    "ReplicaStatus": "core.contract",
    "SchedulerError": "sdk.scheduler_errors",
    "PlacementError": "sdk.scheduler_errors",
    "DeploymentError": "sdk.scheduler_errors",
    "ControllerUnavailableError": "sdk.scheduler_errors",
    "inference": "sdk.inference",
    "a_inference": "sdk.inference",
    "inference_batch": "sdk.batch",
    "a_inference_batch": "sdk.batch",
    "streaming_batch": "sdk.streaming",
    "a_streaming_batch": "sdk.streaming",
    "stream": "sdk.streaming",
    "StreamEvent": "sdk.streaming",
    "RetryPolicy": "sdk.http_calls",
    "resolve_endpoint": "sdk.endpoints",
    "forget_endpoints": "sdk.endpoints",
    "ArgumentOrderError": "sdk.arguments",
    "InferenceError": "sdk.inference_errors",
    "EndpointNotFoundError": "sdk.inference_errors",
    "ModelNotFoundError": "sdk.inference_errors",
    "InvalidRequestError": "sdk.inference_errors",
    "OverloadedError": "sdk.inference_errors",
    "StructuredOutputError": "sdk.inference_errors",
    "transcribe": "sdk.transcription",
    "a_transcribe": "sdk.transcription",
    "ImageInputError": "sdk.media_inputs",
    "ModelSpec": "core.config",
    "RayVRAMConfig": "core.config",
    "ConfigError": "core.config",
    "RayVramError": "core.errors",
    "VRAMState": "core.contract",
}

__all__ = ["__version__", "get_vram_allocator", *_EXPORTS]


def get_vram_allocator() -> Any:
    """The cluster's `vram_allocator` actor handle (see `vram_scheduler.allocator.actor`); imports Ray now."""
    from .allocator.actor import get_vram_allocator as get

    return get()


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
