"""Many answers from one model, in order, with at most `concurrency` requests in flight:
`a_inference_batch`, and `inference_batch` for synchronous code."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from .arguments import check_batch, images_per_prompt
from .chat_request import Prompt
from .inference import answer_async
from .inference_errors import InferenceError
from .media_inputs import ImageInput

_R = TypeVar("_R")

#: `inference`'s keyword arguments that are not sampling parameters, and their defaults.
_CALL_OPTIONS = {
    "max_tokens": None,
    "truncate_prompt_tokens": None,
    "base_url": None,
    "api_key": None,
    "timeout_s": 600.0,
    "retry": None,
}


async def a_inference_batch(
    prompts: Sequence[Prompt],
    model_id: str,
    router_name: str | None = None,
    structured_output: type[BaseModel] | None = None,
    *,
    concurrency: int = 8,
    return_exceptions: bool = False,
    images: Sequence[Sequence[ImageInput] | None] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Answers for every prompt, in order, with at most `concurrency` requests in flight.

    `images`, for a vision model, has one entry per prompt: that prompt's images (or None). With
    `return_exceptions`, a failed prompt yields its `InferenceError` in place of an answer instead
    of failing the batch. Other keyword arguments are `inference`'s.
    """
    check_batch("a_inference_batch", prompts, model_id)
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    per_prompt = images_per_prompt("a_inference_batch", prompts, images)
    options = {key: kwargs.pop(key, default) for key, default in _CALL_OPTIONS.items()}
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(prompt: Prompt, images: Sequence[ImageInput] | None) -> Any:
            async with limit:
                try:
                    return await answer_async(
                        prompt,
                        model_id,
                        router_name=router_name,
                        structured_output=structured_output,
                        client=client,
                        sampling=kwargs,
                        images=images,
                        **options,
                    )
                except InferenceError as error:
                    if return_exceptions:
                        return error
                    raise

        return list(await asyncio.gather(*(one(p, i) for p, i in zip(prompts, per_prompt, strict=True))))


def inference_batch(
    prompts: Sequence[Prompt],
    model_id: str,
    router_name: str | None = None,
    structured_output: type[BaseModel] | None = None,
    *,
    concurrency: int = 8,
    **kwargs: Any,
) -> list[Any]:
    """`a_inference_batch` for synchronous code (works inside a running event loop too)."""
    check_batch("inference_batch", prompts, model_id)
    return run_sync(
        lambda: a_inference_batch(prompts, model_id, router_name, structured_output, concurrency=concurrency, **kwargs)
    )


def run_sync(make: Callable[[], Coroutine[Any, Any, _R]]) -> _R:
    """Run a coroutine to completion from sync code, even when this thread already has a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(make())
        except BaseException as error:
            result["error"] = error

    thread = threading.Thread(target=target, name="ray-vram-sync", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    value: _R = result["value"]
    return value
