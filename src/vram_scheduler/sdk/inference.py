"""One answer from a model: `inference` and `a_inference`, text or a pydantic class.

`prompt` is a user message or a list of chat messages; `images` (for a vision model) go with the
last user message. The endpoint is found as `endpoints` says; busy endpoints are retried
(`http_calls`); the arguments are checked against the documented order first (`arguments`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, overload

import httpx
from pydantic import BaseModel

from .arguments import check_single, hinted, order_hint
from .chat_request import Prompt, T, build_request
from .http_calls import Call, RetryPolicy, endpoint_call, post_async, post_sync
from .inference_errors import EndpointNotFoundError, ModelNotFoundError
from .media_inputs import ImageInput


def prepare(
    model_id: str,
    prompt: Prompt,
    *,
    router_name: str | None,
    structured_output: type[BaseModel] | None,
    max_tokens: int | None,
    truncate_prompt_tokens: int | None,
    stream: bool,
    base_url: str | None,
    api_key: str | None,
    timeout_s: float,
    retry: RetryPolicy | None,
    sampling: dict[str, Any],
    images: Sequence[ImageInput] | None = None,
) -> Call:
    """The chat request for one prompt, its endpoint found."""
    model = router_name or model_id
    body = build_request(  # before the endpoint lookup: an unreadable image fails without a network call
        model,
        prompt,
        structured_output=structured_output,
        max_tokens=max_tokens,
        truncate_prompt_tokens=truncate_prompt_tokens,
        stream=stream,
        sampling=sampling,
        images=images,
    )
    return endpoint_call(
        model,
        "chat/completions",
        body,
        base_url=base_url,
        api_key=api_key,
        timeout_s=timeout_s,
        retry=retry,
        structured_output=structured_output,
    )


@overload
def inference(
    prompt: Prompt, model_id: str, router_name: str | None = None, *, structured_output: type[T], **kwargs: Any
) -> T: ...
@overload
def inference(
    prompt: Prompt, model_id: str, router_name: str | None = None, structured_output: None = None, **kwargs: Any
) -> str: ...
def inference(
    prompt: Prompt,
    model_id: str,
    router_name: str | None = None,
    structured_output: type[BaseModel] | None = None,
    *,
    images: Sequence[ImageInput] | None = None,
    max_tokens: int | None = None,
    truncate_prompt_tokens: int | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 600.0,
    retry: RetryPolicy | None = None,
    **sampling: Any,
) -> Any:
    """Ask `model_id` once; return its text, or an instance of `structured_output`.

    `prompt` is a user message or a list of chat messages. `images` (for a vision model) go with
    the last user message: paths, bytes, PIL images, or data:/file:///http(s):// URLs.
    `router_name` sends the request to the model's alias instead. `truncate_prompt_tokens` keeps
    only the last N prompt tokens (-1: as many as the model's max_model_len allows). Extra keyword
    arguments are sampling parameters passed to vLLM (temperature, top_p, seed, stop, ...).
    """
    check_single("inference", prompt, model_id)
    try:
        call = prepare(
            model_id,
            prompt,
            router_name=router_name,
            structured_output=structured_output,
            max_tokens=max_tokens,
            truncate_prompt_tokens=truncate_prompt_tokens,
            stream=False,
            base_url=base_url,
            api_key=api_key,
            timeout_s=timeout_s,
            retry=retry,
            sampling=sampling,
            images=images,
        )
        return call.result(post_sync(call))
    except (EndpointNotFoundError, ModelNotFoundError) as error:
        raise hinted(error, order_hint("inference", prompt)) from None


async def a_inference(
    prompt: Prompt,
    model_id: str,
    router_name: str | None = None,
    structured_output: type[BaseModel] | None = None,
    *,
    images: Sequence[ImageInput] | None = None,
    max_tokens: int | None = None,
    truncate_prompt_tokens: int | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 600.0,
    retry: RetryPolicy | None = None,
    client: httpx.AsyncClient | None = None,
    **sampling: Any,
) -> Any:
    """`inference`, awaitable. Pass `client` to share connections across many calls."""
    check_single("a_inference", prompt, model_id)
    try:
        return await answer_async(
            prompt,
            model_id,
            router_name=router_name,
            structured_output=structured_output,
            max_tokens=max_tokens,
            truncate_prompt_tokens=truncate_prompt_tokens,
            base_url=base_url,
            api_key=api_key,
            timeout_s=timeout_s,
            retry=retry,
            client=client,
            sampling=sampling,
            images=images,
        )
    except (EndpointNotFoundError, ModelNotFoundError) as error:
        raise hinted(error, order_hint("a_inference", prompt)) from None


async def answer_async(
    prompt: Prompt, model_id: str, *, client: httpx.AsyncClient | None, sampling: dict[str, Any], **options: Any
) -> Any:
    """One answer, awaited (the endpoint lookup runs on a thread: it may make blocking calls)."""
    call = await asyncio.to_thread(prepare, model_id, prompt, stream=False, sampling=sampling, **options)
    return call.result(await post_async(call, client))
