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
    "VRAMScheduler": "client",
    "DeployResult": "client",
    "DeploymentStatus": "contract",
    "ReplicaStatus": "contract",
    "SchedulerError": "scheduler_errors",
    "PlacementError": "scheduler_errors",
    "DeploymentError": "scheduler_errors",
    "ControllerUnavailableError": "scheduler_errors",
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
    "transcribe": "transcription",
    "a_transcribe": "transcription",
    "ImageInputError": "media_inputs",
    "ModelSpec": "config",
    "RayVRAMConfig": "config",
    "ConfigError": "config",
    "RayVramError": "errors",
    "VRAMState": "contract",
}

__all__ = ["__version__", "get_vram_allocator", *_EXPORTS]


def get_vram_allocator() -> Any:
    """The cluster's `vram_allocator` actor handle (see `vram_scheduler.allocator`); imports Ray now."""
    from .allocator import get_vram_allocator as get

    return get()


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
