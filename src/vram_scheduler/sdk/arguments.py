"""The documented argument order of the inference calls, checked from the values alone.

`inference(prompt, model_id, router_name=None, structured_output=None, ...)` and the batch calls'
`(prompts, model_id, ...)` are the one signature. Earlier releases also took `(model_id, prompt)`
and told the two apart by asking endpoints which name they serve; now a call that can only be the
old order (a list of messages or of prompts where the model name goes, a "model name" with
whitespace in it) is refused with an `ArgumentOrderError` naming the argument, what was given and
the documented order, before any network call. Two one-word strings cannot be told apart: they are
read in the documented order, and a model that is not found then says which order that was.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

from ..core.errors import RayVramError
from .chat_request import Prompt
from .inference_errors import InferenceError
from .media_inputs import ImageInput

_E = TypeVar("_E", bound=InferenceError)
#: A model name never contains whitespace; a prompt almost always does.
_NO_SPACE = re.compile(r"^\S+$")


class ArgumentOrderError(RayVramError, TypeError):
    """An inference call's arguments are not in the documented order (or not of its types)."""


def _one_word(value: Any) -> bool:
    return isinstance(value, str) and bool(_NO_SPACE.match(value))


def _model_name(function: str, model_id: Any, first: str, first_value: Any) -> None:
    """Refuse a `model_id` that cannot be a model name, saying how the call reads."""
    order = f"The documented order is {function}({first}, model_id, ...)"
    old = f"; {function}(model_id, {first}) is the old order: swap the two arguments" if _one_word(first_value) else ""
    if not isinstance(model_id, str):
        raise ArgumentOrderError(
            f"{function}: model_id must be a model name (str), got {type(model_id).__name__} {model_id!r:.60}. "
            f"{order}{old if isinstance(first_value, str) else ''}"
        )
    if not _NO_SPACE.match(model_id):
        raise ArgumentOrderError(
            f"{function}: model_id {model_id!r:.60} is not a model name (a model name has no whitespace). {order}{old}"
        )


def check_single(function: str, prompt: Any, model_id: Any) -> None:
    """`function(prompt, model_id, ...)`: a prompt (str or chat messages) and a model name."""
    _model_name(function, model_id, "prompt", prompt)
    if not isinstance(prompt, str | Sequence):
        raise ArgumentOrderError(
            f"{function}: prompt must be a str or a list of chat messages, got {type(prompt).__name__}"
        )


def check_batch(function: str, prompts: Any, model_id: Any) -> None:
    """`function(prompts, model_id, ...)`: a list of prompts and a model name."""
    if isinstance(prompts, str):
        old = (
            f" (and model_id is a {type(model_id).__name__}: that is the old order {function}(model_id, prompts); "
            "swap the two arguments)"
            if isinstance(model_id, Sequence) and not isinstance(model_id, str)
            else ""
        )
        raise ArgumentOrderError(
            f"{function}: prompts must be a list of prompts, got str {prompts!r:.60}{old}. "
            f"The documented order is {function}(prompts, model_id, ...)"
        )
    if not isinstance(prompts, Sequence):
        raise ArgumentOrderError(f"{function}: prompts must be a list of prompts, got {type(prompts).__name__}")
    _model_name(function, model_id, "prompts", None)


def order_hint(function: str, prompt: Any) -> str:
    """What to add to "model not found" when the call might have been meant in the old order."""
    if not _one_word(prompt):
        return ""
    return (
        f" (read as {function}(prompt={prompt!r}, model_id=...), the documented order; "
        f"if {prompt!r} is the model, swap the two arguments)"
    )


def hinted(error: _E, hint: str) -> _E:
    """`error` again, of the same type, with `hint` after its message (a not-found error: its
    constructor is `InferenceError`'s)."""
    return type(error)(f"{error}{hint}", model=error.model, url=error.url, status=error.status)


def images_per_prompt(
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
