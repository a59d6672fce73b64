"""A chat-completions request (messages, images, limits, structured output, sampling) and reading
its answer: the text, or the pydantic class it must validate as."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .inference_errors import InferenceError, StructuredOutputError
from .media_inputs import ImageInput, with_images

T = TypeVar("T", bound=BaseModel)
#: A user message, or a list of chat messages.
Prompt = str | Sequence[dict[str, Any]]


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


def parse_structured(content: str, structured_output: type[T], model: str, url: str, finish_reason: str | None) -> T:
    """The model's output as `structured_output`, or a `StructuredOutputError` saying what failed."""
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
            errors=[dict(item) for item in error.errors(include_url=False)],
            model=model,
            url=url,
        ) from None


def _first_error(error: ValidationError) -> str:
    item = error.errors(include_url=False)[0]
    where = ".".join(str(p) for p in item["loc"]) or "(top level)"
    return f"{where}: {item['msg']}"


def answer_of(payload: dict[str, Any], model: str, url: str) -> tuple[str, str | None]:
    """The first choice's text and finish reason."""
    try:
        choice = payload["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise InferenceError(
            f"model {model!r} at {url} returned no choices: {str(payload)[:200]}", model=model
        ) from None
    return choice["message"].get("content") or "", choice.get("finish_reason")
