"""Tokens as they arrive: `a_streaming_batch` (many prompts, interleaved events),
`streaming_batch` (the same as a plain generator) and `stream` (one prompt's text pieces)."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from .arguments import check_batch, check_single, hinted, images_per_prompt, order_hint
from .chat_request import Prompt
from .http_calls import RETRY_STATUSES, Call, RetryPolicy, connect_error, raise_for
from .inference import prepare
from .inference_errors import EndpointNotFoundError, InferenceError, ModelNotFoundError
from .media_inputs import ImageInput


@dataclass
class StreamEvent:
    """One piece of a streamed batch: text for prompt `index`, or its end (`done`, with `finish_reason`)."""

    index: int
    text: str = ""
    done: bool = False
    finish_reason: str | None = None
    error: InferenceError | None = None


async def _stream_one(index: int, call: Call, client: httpx.AsyncClient, out: asyncio.Queue[StreamEvent]) -> None:
    try:
        for attempt in range(call.retry.attempts):
            async with client.stream(
                "POST", call.url, json=call.body, headers=call.headers, timeout=call.timeout_s
            ) as response:
                if response.status_code in RETRY_STATUSES and attempt < call.retry.attempts - 1:
                    await response.aread()
                    await asyncio.sleep(call.retry.delay(attempt, response))
                    continue
                if response.status_code >= 400:
                    await response.aread()
                    raise_for(response, call.model, call.url, call.retry.attempts)
                finish_reason = None
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise InferenceError(
                            f"model {call.model!r} at {call.url} failed mid-stream: {chunk['error']}",
                            model=call.model,
                            url=call.url,
                        )
                    for choice in chunk.get("choices", []):
                        text = (choice.get("delta") or {}).get("content") or ""
                        finish_reason = choice.get("finish_reason") or finish_reason
                        if text:
                            await out.put(StreamEvent(index=index, text=text))
                await out.put(StreamEvent(index=index, done=True, finish_reason=finish_reason))
                return
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:
        await out.put(StreamEvent(index=index, done=True, error=connect_error(error, call.model, call.url)))
    except InferenceError as error:
        await out.put(StreamEvent(index=index, done=True, error=error))
    except httpx.HTTPError as error:
        failure = InferenceError(
            f"stream of model {call.model!r} at {call.url} broke: {type(error).__name__}: {error}",
            model=call.model,
            url=call.url,
        )
        await out.put(StreamEvent(index=index, done=True, error=failure))


async def a_streaming_batch(
    prompts: Sequence[Prompt],
    model_id: str,
    router_name: str | None = None,
    *,
    concurrency: int = 8,
    max_tokens: int | None = None,
    truncate_prompt_tokens: int | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 600.0,
    retry: RetryPolicy | None = None,
    images: Sequence[Sequence[ImageInput] | None] | None = None,
    **sampling: Any,
) -> AsyncIterator[StreamEvent]:
    """Stream tokens for many prompts at once: `StreamEvent`s as they arrive, interleaved.

    Each prompt ends with exactly one event with `done=True` (and `error` set if it failed);
    at most `concurrency` streams are open at a time. `images`: one entry per prompt, as in
    `a_inference_batch`.
    """
    check_batch("a_streaming_batch", prompts, model_id)
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    per_prompt = images_per_prompt("a_streaming_batch", prompts, images)
    calls = [
        await asyncio.to_thread(
            prepare,
            model_id,
            prompt,
            router_name=router_name,
            structured_output=None,
            max_tokens=max_tokens,
            truncate_prompt_tokens=truncate_prompt_tokens,
            stream=True,
            base_url=base_url,
            api_key=api_key,
            timeout_s=timeout_s,
            retry=retry,
            sampling=sampling,
            images=prompt_images,
        )
        for prompt, prompt_images in zip(prompts, per_prompt, strict=True)
    ]
    out: asyncio.Queue[StreamEvent] = asyncio.Queue()
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(index: int, call: Call) -> None:
            async with limit:
                await _stream_one(index, call, client, out)

        tasks = [asyncio.create_task(one(i, call)) for i, call in enumerate(calls)]
        try:
            remaining = len(tasks)
            while remaining:
                event = await out.get()
                remaining -= event.done
                yield event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def streaming_batch(
    prompts: Sequence[Prompt], model_id: str, router_name: str | None = None, **kwargs: Any
) -> Iterator[StreamEvent]:
    """`a_streaming_batch` as a plain generator (runs the streams on a background event loop)."""
    check_batch("streaming_batch", prompts, model_id)
    return _pumped(prompts, model_id, router_name, kwargs)


def _pumped(
    prompts: Sequence[Prompt], model_id: str, router_name: str | None, kwargs: dict[str, Any]
) -> Iterator[StreamEvent]:
    events: queue.Queue[StreamEvent | BaseException | None] = queue.Queue()
    stop = threading.Event()

    async def pump() -> None:
        try:
            async for event in a_streaming_batch(prompts, model_id, router_name, **kwargs):
                events.put(event)
                if stop.is_set():
                    return
        except BaseException as error:
            events.put(error)
        finally:
            events.put(None)

    thread = threading.Thread(target=asyncio.run, args=(pump(),), name="ray-vram-stream", daemon=True)
    thread.start()
    try:
        while (item := events.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def stream(
    prompt: Prompt,
    model_id: str,
    router_name: str | None = None,
    *,
    images: Sequence[ImageInput] | None = None,
    **kwargs: Any,
) -> Iterator[str]:
    """Text pieces of one streamed answer; raises the stream's `InferenceError` if it fails."""
    check_single("stream", prompt, model_id)
    return _pieces(prompt, model_id, router_name, images, kwargs)


def _pieces(
    prompt: Prompt,
    model_id: str,
    router_name: str | None,
    images: Sequence[ImageInput] | None,
    kwargs: dict[str, Any],
) -> Iterator[str]:
    try:
        for event in _pumped([prompt], model_id, router_name, {"concurrency": 1, "images": [images], **kwargs}):
            if event.error is not None:
                raise event.error
            if event.text:
                yield event.text
    except (EndpointNotFoundError, ModelNotFoundError) as error:
        raise hinted(error, order_hint("stream", prompt)) from None
