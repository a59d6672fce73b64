"""Posting a request to a model's endpoint: found once (`endpoints`), authenticated, retried while
the endpoint is busy (429/503, honouring ``Retry-After``), and every failure a typed
`InferenceError`. Chat and transcription requests go through the same `Call`."""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import BaseModel

from .chat_request import answer_of, parse_structured
from .endpoints import auth_headers, resolve_endpoint
from .inference_errors import (
    EndpointNotFoundError,
    InferenceError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
)

#: Status codes that mean "busy, try again": retried with backoff, honouring Retry-After.
RETRY_STATUSES = frozenset({429, 503})


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
        return min(self.backoff_s * 2.0**attempt, self.max_backoff_s)


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
class Call:
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
        content, finish_reason = answer_of(payload, self.model, self.url)
        if self.structured_output is None:
            return content
        return parse_structured(content, self.structured_output, self.model, self.url, finish_reason)


def endpoint_call(
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
) -> Call:
    """A request to `path` (under /v1) of the endpoint serving `model`: every kind of request
    (chat, transcription) finds its endpoint, authenticates and retries alike."""
    base = resolve_endpoint(model, base_url, api_key)
    return Call(
        model=model,
        url=f"{base}/{path}",
        body=body,
        headers=auth_headers(api_key),
        timeout_s=timeout_s,
        retry=retry or DEFAULT_RETRY,
        structured_output=structured_output,
        files=files,
    )


def _error_detail(response: httpx.Response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:500]
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)
    return str(error)


def raise_for(response: httpx.Response, model: str, url: str, attempts: int) -> None:
    """The typed `InferenceError` for a refused request (nothing for a success)."""
    status = response.status_code
    if status < 400:
        return
    detail = _error_detail(response)
    kwargs: dict[str, Any] = {"model": model, "url": url, "status": status}
    if status == 404:
        raise ModelNotFoundError(f"model {model!r} is not served at {url} (HTTP 404): {detail}", **kwargs)
    if status in RETRY_STATUSES:
        raise OverloadedError(
            f"model {model!r} at {url} stayed busy (HTTP {status}) through {attempts} attempt(s): {detail}", **kwargs
        )
    if status in {400, 413, 415, 422}:
        raise InvalidRequestError(f"model {model!r} at {url} refused the request (HTTP {status}): {detail}", **kwargs)
    raise InferenceError(f"model {model!r} at {url} failed (HTTP {status}): {detail}", **kwargs)


def connect_error(error: httpx.HTTPError, model: str, url: str) -> InferenceError:
    return EndpointNotFoundError(
        f"cannot reach the endpoint of model {model!r} at {url}: {type(error).__name__}: {error}", model=model, url=url
    )


def post_sync(call: Call) -> dict[str, Any]:
    """The answer (JSON) to `call`, on a client of its own, retried while the endpoint is busy;
    an `InferenceError` for an unreachable endpoint or a refusal."""
    response = None
    with httpx.Client() as client:
        for attempt in range(call.retry.attempts):
            try:
                response = client.post(call.url, **call.payload(), headers=call.headers, timeout=call.timeout_s)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                raise connect_error(error, call.model, call.url) from None
            if response.status_code not in RETRY_STATUSES or attempt == call.retry.attempts - 1:
                break
            time.sleep(call.retry.delay(attempt, response))
        assert response is not None
        raise_for(response, call.model, call.url, call.retry.attempts)
        answer: dict[str, Any] = response.json()
        return answer


async def post_async(call: Call, client: httpx.AsyncClient | None) -> dict[str, Any]:
    """`post_sync`, awaitable, on `client` (shared connections) or, if None, a client of its own."""
    if client is None:
        async with httpx.AsyncClient() as own:
            return await post_async(call, own)
    response = None
    for attempt in range(call.retry.attempts):
        try:
            response = await client.post(call.url, **call.payload(), headers=call.headers, timeout=call.timeout_s)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise connect_error(error, call.model, call.url) from None
        if response.status_code not in RETRY_STATUSES or attempt == call.retry.attempts - 1:
            break
        await asyncio.sleep(call.retry.delay(attempt, response))
    assert response is not None
    raise_for(response, call.model, call.url, call.retry.attempts)
    answer: dict[str, Any] = response.json()
    return answer
