"""What a request that produced no answer raises: which model, where, and why."""

from __future__ import annotations

from typing import Any

from ..core.errors import RayVramError


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
