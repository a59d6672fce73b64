"""Speech to text through a served model: `transcribe(audio, model_id)` and `a_transcribe`.

The request is OpenAI's `POST /v1/audio/transcriptions` (a multipart upload, as OpenAI's clients
send it), found, retried and refused like `inference`'s: the endpoint is discovered the same way,
429/503 are retried with Retry-After, and a 4xx raises `InvalidRequestError` with the router's words
(an unsupported format, a file over the model's `media.max_item_mb`, a model that does not transcribe).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import IO, Any, Literal

import httpx

from .http_calls import Call, RetryPolicy, endpoint_call, post_async, post_sync
from .inference_errors import InferenceError

#: What `transcribe` takes: a path, the file's bytes, or an open binary file.
AudioInput = str | os.PathLike[str] | bytes | IO[bytes]
ResponseFormat = Literal["json", "verbose_json"]


def _upload(audio: AudioInput) -> tuple[str, bytes]:
    """(file name, bytes) of `audio`; the name is informative only (the server reads the bytes)."""
    if isinstance(audio, bytes | bytearray | memoryview):
        return "audio", bytes(audio)
    if isinstance(audio, str | os.PathLike):
        path = Path(audio).expanduser()
        try:
            return path.name, path.read_bytes()
        except OSError as error:
            raise InferenceError(f"audio file {str(audio)!r}: {error.strerror or error}") from None
    if hasattr(audio, "read"):
        data = audio.read()
        if not isinstance(data, bytes):
            raise InferenceError("audio: open the file in binary mode ('rb')")
        return Path(str(getattr(audio, "name", "audio"))).name, data
    raise InferenceError(f"audio of type {type(audio).__name__} is not a path, bytes or a binary file")


def _prepare(
    audio: AudioInput,
    model_id: str,
    router_name: str | None,
    *,
    language: str | None,
    prompt: str | None,
    response_format: ResponseFormat,
    max_tokens: int | None,
    base_url: str | None,
    api_key: str | None,
    timeout_s: float,
    retry: RetryPolicy | None,
    params: dict[str, Any],
) -> Call:
    model = router_name or model_id
    filename, data = _upload(audio)
    fields: dict[str, Any] = {"model": model, "response_format": response_format}
    optional = {"language": language, "prompt": prompt, "max_completion_tokens": max_tokens}
    fields |= {key: str(value) for key, value in (optional | params).items() if value is not None}
    return endpoint_call(
        model,
        "audio/transcriptions",
        fields,
        base_url=base_url,
        api_key=api_key,
        timeout_s=timeout_s,
        retry=retry,
        files={"file": (filename, data)},
    )


def _result(payload: dict[str, Any], call: Call, response_format: ResponseFormat) -> Any:
    if response_format == "verbose_json":
        return payload
    text = payload.get("text")
    if not isinstance(text, str):
        raise InferenceError(
            f"model {call.model!r} at {call.url} returned no transcript: {str(payload)[:200]}", model=call.model
        )
    return text


def transcribe(
    audio: AudioInput,
    model_id: str,
    router_name: str | None = None,
    *,
    language: str | None = None,
    prompt: str | None = None,
    response_format: ResponseFormat = "json",
    max_tokens: int | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 600.0,
    retry: RetryPolicy | None = None,
    **params: Any,
) -> Any:
    """The transcript of `audio` (a path, bytes or a binary file) by speech model `model_id`.

    Returns the text; with ``response_format="verbose_json"``, the whole answer (language,
    duration, segments) as a dict. `language` (ISO 639-1, e.g. "en") skips language detection;
    `max_tokens` bounds the transcript (default: the model's `max_tokens`). Other keyword arguments
    (temperature, ...) are form fields vLLM reads.
    """
    call = _prepare(
        audio,
        model_id,
        router_name,
        language=language,
        prompt=prompt,
        response_format=response_format,
        max_tokens=max_tokens,
        base_url=base_url,
        api_key=api_key,
        timeout_s=timeout_s,
        retry=retry,
        params=params,
    )
    return _result(post_sync(call), call, response_format)


async def a_transcribe(
    audio: AudioInput,
    model_id: str,
    router_name: str | None = None,
    *,
    response_format: ResponseFormat = "json",
    client: httpx.AsyncClient | None = None,
    **kwargs: Any,
) -> Any:
    """`transcribe`, awaitable (keyword arguments as `transcribe`'s; `client` shares connections)."""
    options = {key: kwargs.pop(key, None) for key in ("language", "prompt", "max_tokens", "base_url", "api_key")}
    call = await asyncio.to_thread(
        _prepare,
        audio,
        model_id,
        router_name,
        response_format=response_format,
        timeout_s=kwargs.pop("timeout_s", 600.0),
        retry=kwargs.pop("retry", None),
        params=kwargs,
        **options,
    )
    return _result(await post_async(call, client), call, response_format)
