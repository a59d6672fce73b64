"""Images for chat requests, from what a caller has at hand: a path, bytes, a PIL image or a URL.

The SDK (`inference(..., images=[...])`) and `ray-vram chat --image` turn each into an OpenAI
`image_url` content part. A local file, bytes and PIL images travel inside the request as data URLs
(the model may run on another machine); URLs are passed on as they are: ``data:``, ``file://`` (a
path on the model's nodes, under its `media.local_media_dir`) and ``http(s)://`` (fetched by the
model's replica only from hosts its `media.media_domains` lists). Standard library only: a PIL
image is recognised by its type and saved through its own `save`.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.errors import RayVramError

#: What `images=[...]` takes: a path (str or Path), raw bytes, a PIL image, or a data/file/http(s) URL.
ImageInput = str | os.PathLike[str] | bytes | Any
_URL_PREFIXES = ("data:", "file://", "http://", "https://")
#: Image types by their first bytes (what vLLM's Pillow decodes).
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)


class ImageInputError(RayVramError, ValueError):
    """An `images` entry that is none of the accepted kinds, or a file that cannot be read."""


def image_type(data: bytes) -> str | None:
    """The MIME type of image bytes from their signature (None when unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for signature, mime in _SIGNATURES if data.startswith(signature)), None)


def _data_url(data: bytes, what: str) -> str:
    mime = image_type(data)
    if mime is None:
        raise ImageInputError(
            f"{what} ({len(data)} bytes, starting {data[:8].hex(' ') or 'empty'}) is not a PNG, JPEG, GIF, WebP, "
            "BMP or TIFF image"
        )
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _is_pil_image(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "save") and hasattr(value, "mode")


def image_url(image: ImageInput) -> str:
    """The URL an `image_url` content part carries for `image` (see module docstring)."""
    if isinstance(image, bytes | bytearray | memoryview):
        return _data_url(bytes(image), "image bytes")
    if _is_pil_image(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return _data_url(buffer.getvalue(), "PIL image")
    if isinstance(image, str) and image.startswith(_URL_PREFIXES):
        return image
    if isinstance(image, str | os.PathLike):
        path = Path(image).expanduser()
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ImageInputError(
                f"image {str(image)!r}: {error.strerror or error} (pass a local path, bytes, a PIL image, or a "
                "data:, file:// or http(s):// URL)"
            ) from None
        return _data_url(data, f"image file {path}")
    raise ImageInputError(
        f"image of type {type(image).__name__} is not a path, bytes, a PIL image or a data:/file:///http(s):// URL"
    )


def image_part(image: ImageInput) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": image_url(image)}}


def with_images(messages: list[dict[str, Any]], images: Sequence[ImageInput] | None) -> list[dict[str, Any]]:
    """`messages` with `images` appended to the content of the last user message (after its text)."""
    if not images:
        return messages
    if isinstance(images, str | bytes | os.PathLike) or _is_pil_image(images):
        raise ImageInputError("images must be a list (of paths, bytes, PIL images or URLs), not a single image")
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            message["content"] = parts + [image_part(image) for image in images]
            return messages
    raise ImageInputError("images need a user message to go with; the prompt has none")
