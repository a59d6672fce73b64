"""Inference helpers for models served by ray-vram (or any OpenAI-compatible endpoint).

Sync and async single calls, bounded-concurrency batches and streaming batches, with
structured output parsed into pydantic classes, images for vision models (``images=[...]``:
paths, bytes, PIL images or URLs, see `media_inputs`), retries on 429/503 honouring
``Retry-After``, and typed errors; speech-to-text is `transcription.transcribe`. Only ``httpx``
is needed: nothing here imports Ray or vLLM, so a notebook or a web app can call models without
the serving stack installed.

Where the endpoint is, in order: the ``base_url`` argument, ``$RAY_VRAM_ENDPOINT``, the
serving controller (``$RAY_VRAM_CONTROLLER``, default ``http://127.0.0.1:8080``) which
names each model's endpoint, then Ray Serve's status through the Ray dashboard
(``$RAY_VRAM_DASHBOARD``, default ``http://127.0.0.1:8265``); each candidate is checked
against its ``/v1/models`` so a request goes where the model is actually served.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import queue
import re
import sys
import threading
import time
import types
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import httpx
from pydantic import BaseModel, ValidationError

from ..core.contract import DeploymentList
from ..core.errors import RayVramError
from .controller_http import CONTROLLER_ENV, DEFAULT_CONTROLLER
from .media_inputs import ImageInput, with_images
from .token import auth_headers as controller_auth_headers

T = TypeVar("T", bound=BaseModel)
Prompt = str | Sequence[dict[str, Any]]

ENDPOINT_ENV = "RAY_VRAM_ENDPOINT"
DASHBOARD_ENV = "RAY_VRAM_DASHBOARD"
API_KEY_ENV = "RAY_VRAM_API_KEY"
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"

#: Status codes that mean "busy, try again": retried with backoff, honouring Retry-After.
RETRY_STATUSES = frozenset({429, 503})


# --------------------------------------------------------------------------- errors


class InferenceError(RayVramError, RuntimeError):
    """A request that did not produce an answer; says which model, where and why."""

    def __init__(self, message: str, *, model: str | None = None, url: str | None = None, status: int | None = None):
        self.model = model
        self.url = url
        self.status = status
        super().__init__(message)


class EndpointNotFoundError(InferenceError):
    """No endpoint serving the model could be found (nothing deployed, or nothing reachable)."""


class ModelNotFoundError(InferenceError):
    """The endpoint answered, but does not serve this model (HTTP 404)."""


class InvalidRequestError(InferenceError):
    """The endpoint refused the request as invalid (HTTP 400/413/415/422): a prompt over the model's
    limit, an image for a text-only model, an image or audio file too large or of an unknown format."""


class OverloadedError(InferenceError):
    """The endpoint stayed busy (HTTP 429/503) through every retry."""


class StructuredOutputError(InferenceError):
    """The model's output did not validate against the requested pydantic class."""

    def __init__(self, message: str, *, raw: str, errors: list[dict[str, Any]], **kwargs: Any):
        self.raw = raw
        self.errors = errors
        super().__init__(message, **kwargs)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying a busy endpoint: exponential backoff, or the server's Retry-After."""

    attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        hinted = retry_after_seconds(response.headers.get("retry-after")) if response is not None else None
        if hinted is not None:
            return min(hinted, self.max_backoff_s)
        return min(self.backoff_s * 2**attempt, self.max_backoff_s)


DEFAULT_RETRY = RetryPolicy()


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class StreamEvent:
    """One piece of a streamed batch: text for prompt `index`, or its end (`done`, with `finish_reason`)."""

    index: int
    text: str = ""
    done: bool = False
    finish_reason: str | None = None
    error: InferenceError | None = None


# --------------------------------------------------------------------------- endpoint discovery


class _EndpointCache:
    """Base URLs (ending in /v1) per model name, remembered for a short while."""

    ttl_s = 30.0

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> str | None:
        with self._lock:
            entry = self._entries.get(model)
        if entry and time.monotonic() - entry[0] < self.ttl_s:
            return entry[1]
        return None

    def put(self, model: str, base_url: str) -> None:
        with self._lock:
            self._entries[model] = (time.monotonic(), base_url)

    def forget(self, model: str | None = None) -> None:
        with self._lock:
            if model is None:
                self._entries.clear()
            else:
                self._entries.pop(model, None)


_endpoints = _EndpointCache()


def forget_endpoints(model: str | None = None) -> None:
    """Drop remembered endpoints (after a redeploy moved a model)."""
    _endpoints.forget(model)


def _as_v1(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def _local_host(host: str) -> str:
    return "127.0.0.1" if host in {"0.0.0.0", "::", "", "localhost"} else host


def _candidates_from_controller(client: httpx.Client, controller: str, model: str) -> list[str]:
    response = client.get(f"{controller.rstrip('/')}/v1/deployments", headers=controller_auth_headers())
    response.raise_for_status()
    found: list[str] = []
    for entry in DeploymentList.model_validate(response.json()).models:
        if entry.endpoint and (entry.serves(model) or not found):
            found.insert(0 if entry.serves(model) else len(found), entry.endpoint)
    return found


def _candidates_from_serve(client: httpx.Client, dashboard: str) -> list[str]:
    response = client.get(f"{dashboard.rstrip('/')}/api/serve/applications/")
    response.raise_for_status()
    status = response.json()
    options = status.get("http_options") or {}
    port = options.get("port")
    if not port:
        return []
    host = _local_host(str(options.get("host") or "127.0.0.1"))
    found = []
    for app in (status.get("applications") or {}).values():
        prefix = (app.get("route_prefix") or "/").rstrip("/")
        if app.get("status") == "RUNNING" and app.get("route_prefix") is not None:
            found.append(f"http://{host}:{port}{prefix}")
    return found


def _serves(client: httpx.Client, base_url: str, model: str, headers: dict[str, str]) -> bool:
    response = client.get(f"{base_url}/models", headers=headers)
    if response.status_code != 200:
        return False
    return any(item.get("id") == model for item in response.json().get("data", []))


def resolve_endpoint(model: str, base_url: str | None = None, api_key: str | None = None) -> str:
    """The base URL (ending in /v1) of the endpoint that serves `model`.

    An explicit `base_url` or ``$RAY_VRAM_ENDPOINT`` is trusted as is; otherwise the controller
    and Ray Serve's status are asked, and each candidate must list the model in /v1/models.
    """
    explicit = base_url or os.environ.get(ENDPOINT_ENV)
    if explicit:
        return _as_v1(explicit)
    cached = _endpoints.get(model)
    if cached:
        return cached
    controller = os.environ.get(CONTROLLER_ENV, DEFAULT_CONTROLLER)
    dashboard = os.environ.get(DASHBOARD_ENV, DEFAULT_DASHBOARD)
    tried: list[str] = []
    with httpx.Client(timeout=5.0) as client:
        for source, lookup in (
            (f"controller {controller}", lambda: _candidates_from_controller(client, controller, model)),
            (f"Ray Serve status at {dashboard}", lambda: _candidates_from_serve(client, dashboard)),
        ):
            try:
                candidates = [_as_v1(c) for c in lookup()]
            except (httpx.HTTPError, ValueError) as error:
                tried.append(f"{source}: {type(error).__name__}: {error}")
                continue
            for candidate in candidates:
                try:
                    if _serves(client, candidate, model, auth_headers(api_key)):
                        _endpoints.put(model, candidate)
                        return candidate
                except (httpx.HTTPError, ValueError) as error:
                    tried.append(f"{candidate}: {type(error).__name__}: {error}")
                    continue
                tried.append(f"{candidate} (from {source}) does not serve {model!r}")
            if not candidates:
                tried.append(f"{source}: no endpoints listed")
    raise EndpointNotFoundError(
        f"no endpoint serves model {model!r}; tried: " + "; ".join(tried) + f". Deploy it, or set ${ENDPOINT_ENV}",
        model=model,
    )


# --------------------------------------------------------------------------- requests


def auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def _messages(prompt: Prompt, images: Sequence[ImageInput] | None = None) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(message) for message in prompt]
    return with_images(messages, images)


def response_format_for(structured_output: type[BaseModel]) -> dict[str, Any]:
    """The OpenAI `response_format` asking for JSON that matches a pydantic class."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": structured_output.__name__,
            "schema": structured_output.model_json_schema(),
            "strict": True,
        },
    }


def build_request(
    model: str,
    prompt: Prompt,
    *,
    structured_output: type[BaseModel] | None = None,
    max_tokens: int | None = None,
    truncate_prompt_tokens: int | None = None,
    stream: bool = False,
    sampling: dict[str, Any] | None = None,
    images: Sequence[ImageInput] | None = None,
) -> dict[str, Any]:
    """The chat-completions body: messages (`images` added to the last user message), limits,
    structured output and any sampling parameter."""
    body: dict[str, Any] = {"model": model, "messages": _messages(prompt, images)}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if truncate_prompt_tokens is not None:
        body["truncate_prompt_tokens"] = truncate_prompt_tokens
    if structured_output is not None:
        body["response_format"] = response_format_for(structured_output)
    if stream:
        body["stream"] = True
    body.update(sampling or {})
    return body


def _error_detail(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500]
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)
    return str(error)


def _raise_for(response: httpx.Response, model: str, url: str, attempts: int) -> None:
    status = response.status_code
    if status < 400:
        return
    detail = _error_detail(response)
    kwargs = {"model": model, "url": url, "status": status}
    if status == 404:
        raise ModelNotFoundError(f"model {model!r} is not served at {url} (HTTP 404): {detail}", **kwargs)
    if status in RETRY_STATUSES:
        raise OverloadedError(
            f"model {model!r} at {url} stayed busy (HTTP {status}) through {attempts} attempt(s): {detail}", **kwargs
        )
    if status in {400, 413, 415, 422}:
        raise InvalidRequestError(f"model {model!r} at {url} refused the request (HTTP {status}): {detail}", **kwargs)
    raise InferenceError(f"model {model!r} at {url} failed (HTTP {status}): {detail}", **kwargs)


def _connect_error(error: httpx.HTTPError, model: str, url: str) -> InferenceError:
    return EndpointNotFoundError(
        f"cannot reach the endpoint of model {model!r} at {url}: {type(error).__name__}: {error}", model=model, url=url
    )


def _parse(content: str, structured_output: type[T], model: str, url: str, finish_reason: str | None) -> T:
    hint = " (generation stopped at max_tokens; raise max_tokens)" if finish_reason == "length" else ""
    try:
        # strict=False: grammar-constrained decoding can emit raw control characters inside strings
        data = json.loads(content, strict=False)
    except json.JSONDecodeError as error:
        raise StructuredOutputError(
            f"output of model {model!r} is not JSON for {structured_output.__name__}{hint}: {error}; "
            f"output was {content[:200]!r}",
            raw=content,
            errors=[{"type": "json_invalid", "loc": (), "msg": str(error)}],
            model=model,
            url=url,
        ) from None
    try:
        return structured_output.model_validate(data)
    except ValidationError as error:
        raise StructuredOutputError(
            f"output of model {model!r} does not validate as {structured_output.__name__}{hint}: "
            f"{error.error_count()} error(s), first: {_first_error(error)}; output was {content[:200]!r}",
            raw=content,
            errors=error.errors(include_url=False),
            model=model,
            url=url,
        ) from None


def _first_error(error: ValidationError) -> str:
    item = error.errors(include_url=False)[0]
    where = ".".join(str(p) for p in item["loc"]) or "(top level)"
    return f"{where}: {item['msg']}"


def _answer(payload: dict[str, Any], model: str, url: str) -> tuple[str, str | None]:
    try:
        choice = payload["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise InferenceError(
            f"model {model!r} at {url} returned no choices: {str(payload)[:200]}", model=model
        ) from None
    return choice["message"].get("content") or "", choice.get("finish_reason")


@dataclass
class _Call:
    """Everything one request needs, resolved once."""

    model: str
    url: str
    body: dict[str, Any]
    headers: dict[str, str]
    timeout_s: float
    retry: RetryPolicy
    structured_output: type[BaseModel] | None
    files: dict[str, tuple[str, bytes]] | None = None  # a multipart upload (`body` is then its form fields)

    def payload(self) -> dict[str, Any]:
        """httpx's keyword arguments for the body: JSON, or a multipart form with its files."""
        return {"data": self.body, "files": self.files} if self.files is not None else {"json": self.body}

    def result(self, payload: dict[str, Any]) -> Any:
        content, finish_reason = _answer(payload, self.model, self.url)
        if self.structured_output is None:
            return content
        return _parse(content, self.structured_output, self.model, self.url, finish_reason)


def _prepare(
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
) -> _Call:
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
    return _endpoint_call(
        model,
        "chat/completions",
        body,
        base_url=base_url,
        api_key=api_key,
        timeout_s=timeout_s,
        retry=retry,
        structured_output=structured_output,
    )


def _endpoint_call(
    model: str,
    path: str,
    body: dict[str, Any],
    *,
    base_url: str | None,
    api_key: str | None,
    timeout_s: float,
    retry: RetryPolicy | None,
    structured_output: type[BaseModel] | None = None,
    files: dict[str, tuple[str, bytes]] | None = None,
) -> _Call:
    """A request to `path` (under /v1) of the endpoint serving `model`: every kind of request
    (chat, transcription) finds its endpoint, authenticates and retries alike."""
    base = resolve_endpoint(model, base_url, api_key)
    return _Call(
        model=model,
        url=f"{base}/{path}",
        body=body,
        headers=auth_headers(api_key),
        timeout_s=timeout_s,
        retry=retry or DEFAULT_RETRY,
        structured_output=structured_output,
        files=files,
    )


def _post_sync(call: _Call) -> dict[str, Any]:
    """The answer (JSON) to `call`, on a client of its own, retried while the endpoint is busy;
    an `InferenceError` for an unreachable endpoint or a refusal."""
    response = None
    with httpx.Client() as client:
        for attempt in range(call.retry.attempts):
            try:
                response = client.post(call.url, **call.payload(), headers=call.headers, timeout=call.timeout_s)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                raise _connect_error(error, call.model, call.url) from None
            if response.status_code not in RETRY_STATUSES or attempt == call.retry.attempts - 1:
                break
            time.sleep(call.retry.delay(attempt, response))
        assert response is not None
        _raise_for(response, call.model, call.url, call.retry.attempts)
        return response.json()


async def _post_async(call: _Call, client: httpx.AsyncClient | None) -> dict[str, Any]:
    """`_post_sync`, awaitable, on `client` (shared connections) or, if None, a client of its own."""
    if client is None:
        async with httpx.AsyncClient() as own:
            return await _post_async(call, own)
    response = None
    for attempt in range(call.retry.attempts):
        try:
            response = await client.post(call.url, **call.payload(), headers=call.headers, timeout=call.timeout_s)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise _connect_error(error, call.model, call.url) from None
        if response.status_code not in RETRY_STATUSES or attempt == call.retry.attempts - 1:
            break
        await asyncio.sleep(call.retry.delay(attempt, response))
    assert response is not None
    _raise_for(response, call.model, call.url, call.retry.attempts)
    return response.json()


# --------------------------------------------------------------------------- argument order

#: A model name never contains whitespace; a prompt almost always does.
_NO_SPACE = re.compile(r"^\S+$")


def _deprecated_order(function: str, first: str, stacklevel: int) -> None:
    warnings.warn(
        f"{function}({first}, model_id) is the documented order; {function}(model_id, {first}) is deprecated "
        "and was read as such this time: swap the two arguments (or pass model_id= by name)",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )


def _served(name: str, base_url: str | None, api_key: str | None) -> bool:
    """Whether an endpoint (the explicit one, or a discovered one) lists `name` in /v1/models."""
    explicit = base_url or os.environ.get(ENDPOINT_ENV)
    try:
        if not explicit:
            resolve_endpoint(name, None, api_key)
            return True
        with httpx.Client(timeout=5.0) as client:
            return _serves(client, _as_v1(explicit), name, auth_headers(api_key))
    except (InferenceError, httpx.HTTPError, ValueError):
        return False


def _single_order(prompt: Any, model_id: Any, base_url: str | None, api_key: str | None) -> bool:
    """True when (prompt, model_id) came in the deprecated order (model_id, prompt).

    Decided from the values: a list of messages is a prompt, a name with whitespace is not a
    model; two one-word strings are told apart by asking which one an endpoint serves.
    """
    if not isinstance(prompt, str):
        return False
    if not isinstance(model_id, str):
        return True  # (model_id, [messages])
    if _NO_SPACE.match(model_id):
        if not _NO_SPACE.match(prompt):
            return False
        return not _served(model_id, base_url, api_key) and _served(prompt, base_url, api_key)
    return bool(_NO_SPACE.match(prompt))


def _images_per_prompt(
    function: str, prompts: Sequence[Prompt], images: Sequence[Sequence[ImageInput] | None] | None
) -> list[Sequence[ImageInput] | None]:
    """One entry of `images` per prompt (None for all when there are no images)."""
    if images is None:
        return [None] * len(prompts)
    if isinstance(images, str | bytes) or len(images) != len(prompts):
        count = "one image" if isinstance(images, str | bytes) else f"{len(images)} entries"
        raise ValueError(
            f"{function}: images needs one entry per prompt ({len(prompts)}: a list of images, or None), got {count}"
        )
    return list(images)


def _batch_order(function: str, prompts: Any, model_id: Any) -> tuple[Sequence[Prompt], str]:
    """(prompts, model_id), swapping (with a DeprecationWarning) a call in the old (model_id, prompts) order."""
    if isinstance(prompts, str) and not isinstance(model_id, str):
        _deprecated_order(function, "prompts", stacklevel=3)
        prompts, model_id = model_id, prompts
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{function}: prompts must be a list of prompts, got {type(prompts).__name__} {prompts!r:.60}")
    if not isinstance(model_id, str):
        raise TypeError(f"{function}: model_id must be a str, got {type(model_id).__name__}")
    return prompts, model_id


# --------------------------------------------------------------------------- public API


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
    if _single_order(prompt, model_id, base_url, api_key):
        _deprecated_order("inference", "prompt", stacklevel=2)
        prompt, model_id = model_id, prompt
    call = _prepare(
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
    return call.result(_post_sync(call))


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
    if await asyncio.to_thread(_single_order, prompt, model_id, base_url, api_key):
        _deprecated_order("a_inference", "prompt", stacklevel=2)
        prompt, model_id = model_id, prompt
    return await _a_inference(
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


async def _a_inference(
    prompt: Prompt, model_id: str, *, client: httpx.AsyncClient | None, sampling: dict[str, Any], **options: Any
) -> Any:
    call = await asyncio.to_thread(_prepare, model_id, prompt, stream=False, sampling=sampling, **options)
    return call.result(await _post_async(call, client))


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
    prompts, model_id = _batch_order("a_inference_batch", prompts, model_id)
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    per_prompt = _images_per_prompt("a_inference_batch", prompts, images)
    options = {key: kwargs.pop(key, default) for key, default in _CALL_OPTIONS.items()}
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:

        async def one(prompt: Prompt, images: Sequence[ImageInput] | None) -> Any:
            async with limit:
                try:
                    return await _a_inference(
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
    prompts, model_id = _batch_order("inference_batch", prompts, model_id)
    return _run_sync(
        lambda: a_inference_batch(prompts, model_id, router_name, structured_output, concurrency=concurrency, **kwargs)
    )


async def _stream_one(index: int, call: _Call, client: httpx.AsyncClient, out: asyncio.Queue[StreamEvent]) -> None:
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
                    _raise_for(response, call.model, call.url, call.retry.attempts)
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
        await out.put(StreamEvent(index=index, done=True, error=_connect_error(error, call.model, call.url)))
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
    prompts, model_id = _batch_order("a_streaming_batch", prompts, model_id)
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    per_prompt = _images_per_prompt("a_streaming_batch", prompts, images)
    calls = [
        await asyncio.to_thread(
            _prepare,
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

        async def one(index: int, call: _Call) -> None:
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
    prompts, model_id = _batch_order("streaming_batch", prompts, model_id)
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
    if _single_order(prompt, model_id, kwargs.get("base_url"), kwargs.get("api_key")):
        _deprecated_order("stream", "prompt", stacklevel=2)
        prompt, model_id = model_id, prompt
    for event in streaming_batch([prompt], model_id, router_name, concurrency=1, images=[images], **kwargs):
        if event.error is not None:
            raise event.error
        if event.text:
            yield event.text


def _run_sync(make: Callable[[], Any]) -> Any:
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
    return result["value"]


class _CallableModule(types.ModuleType):
    """`from vram_scheduler import inference` gives this module; calling it calls `inference()`,
    so both `inference(prompt, model_id)` and `inference.a_inference(...)` read naturally."""

    __call__ = staticmethod(inference)


sys.modules[__name__].__class__ = _CallableModule
