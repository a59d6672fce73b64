"""Checks of images and audio in a request against what its model accepts, before a replica sees it.

vLLM refuses most bad media itself, but in words that name neither the model nor the limit, some
only after decoding (a decompression bomb is its HTTP 500), and it fetches any http(s) URL unless
told otherwise. The router knows each model's limits (`MediaAccepts`, announced by its replicas),
so it refuses, naming what, where and by how much:

- 400: an image or audio for a model that takes none, too many items, a file path outside the
  model's media directory, a download URL (off by default), an unreadable image, bad base64;
- 413: an item over `media.max_item_mb`, an image over `media.max_image_pixels`;
- 415: an upload that is no audio format vLLM decodes.

Only headers are decoded (an image's size comes from its first bytes), so a check costs little.
Pure functions: the router calls them; nothing here imports Ray or vLLM.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from collections import Counter
from typing import Any
from urllib.parse import unquote, urlsplit

from ...core.contract import MediaAccepts
from ...core.errors import RayVramError

MIB = 1024**2
#: OpenAI/vLLM chat content part types that carry media, and their input kind.
PART_KINDS = {
    "image_url": "image",
    "image_embeds": "image",
    "input_audio": "audio",
    "audio_url": "audio",
    "audio_embeds": "audio",
    "video_url": "video",
}
#: Base64 characters decoded to read an image's header (its size); more only when that is not enough.
HEADER_CHARS = 256 * 1024
#: Audio containers vLLM decodes (libsndfile, then FFmpeg through PyAV), by their first bytes.
AUDIO_FORMATS = "wav, flac, ogg/opus, mp3, m4a/mp4, webm"


class MediaRejected(RayVramError, ValueError):
    """A request whose media its model does not take: an OpenAI error with this status and param."""

    def __init__(self, status: int, message: str, param: str | None = None):
        self.status = status
        self.param = param
        super().__init__(message)

    @property
    def kind(self) -> str:
        """The OpenAI error `type`."""
        return {413: "RequestTooLargeError", 415: "UnsupportedMediaTypeError"}.get(self.status, "BadRequestError")


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:.2f} MiB"


def _takes(accepts: MediaAccepts) -> str:
    if not accepts.items_per_prompt:
        return "it takes text only"
    return "it takes " + ", ".join(f"up to {n} {kind}(s)" for kind, n in sorted(accepts.items_per_prompt.items()))


def check_chat(body: dict[str, Any], model: str, accepts: MediaAccepts) -> None:
    """Refuse (`MediaRejected`) the media parts of a chat request that `model` does not take."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    parts: list[tuple[str, str, dict[str, Any]]] = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = PART_KINDS.get(part.get("type")) if isinstance(part, dict) else None
            if kind is not None:
                parts.append((kind, f"messages[{i}].content[{j}]", part))
    counts = Counter(kind for kind, _, _ in parts)
    for kind, count in counts.items():
        limit = accepts.items_per_prompt.get(kind)
        if limit is None:
            where = next(w for k, w, _ in parts if k == kind)
            message = f"model `{model}` does not take {kind} input ({_takes(accepts)}); {where} is one"
            raise MediaRejected(400, message, where)
        if count > limit:
            raise MediaRejected(
                400,
                f"model `{model}` takes at most {limit} {kind}(s) per request (media.{kind}s_per_prompt); this one "
                f"has {count}, {count - limit} too many",
                "messages",
            )
    for kind, where, part in parts:
        _check_part(kind, where, part, model, accepts)


def _check_part(kind: str, where: str, part: dict[str, Any], model: str, accepts: MediaAccepts) -> None:
    value = part.get(part["type"])
    if part["type"].endswith("_embeds"):  # precomputed embeddings: vLLM takes them only if told to
        return
    if part["type"] == "input_audio":
        data = value.get("data") if isinstance(value, dict) else None
        if isinstance(data, str):
            check_size(_decoded_size(data, where), where, model, accepts)
        return
    url = value.get("url") if isinstance(value, dict) else value
    if isinstance(url, str):
        check_url(url, kind, where, model, accepts)


def check_url(url: str, kind: str, where: str, model: str, accepts: MediaAccepts) -> None:
    """A media URL's scheme, place and (for data URLs) size and pixels against the model's limits."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, _, payload = url[5:].partition(",")
        if not header.endswith(";base64"):
            raise MediaRejected(400, f"{where}: a data URL must be base64 (data:<type>;base64,<data>)", where)
        check_size(_decoded_size(payload, where), where, model, accepts)
        if kind == "image":
            check_image(payload, where, model, accepts)
    elif scheme == "file":
        check_local_path(unquote(urlsplit(url).path), where, model, accepts)
    elif scheme in ("http", "https"):
        host = (urlsplit(url).hostname or "").lower()
        if host not in {domain.lower() for domain in accepts.media_domains}:
            allowed = ", ".join(accepts.media_domains) if accepts.media_domains else "none"
            raise MediaRejected(
                400,
                f"{where}: model `{model}` does not download media from {host or url[:60]!r} (allowed hosts: "
                f"{allowed}, media.media_domains); send the {kind} as a data URL instead",
                where,
            )
    else:
        message = f"{where}: unsupported {kind} URL scheme {scheme or url[:20]!r} (use data: or file:)"
        raise MediaRejected(400, message, where)


def check_local_path(path: str, where: str, model: str, accepts: MediaAccepts) -> None:
    """A `file://` path must lie inside the model's media directory (vLLM resolves links again)."""
    root = accepts.local_media_dir
    if root is None:
        message = f"{where}: model `{model}` reads no local files (media.local_media_dir is unset); send a data URL"
        raise MediaRejected(400, message, where)
    normalized, base = os.path.normpath(path), os.path.normpath(root)
    if not os.path.isabs(normalized) or os.path.commonpath([normalized, base]) != base:
        message = f"{where}: file {path} is outside model `{model}`'s media directory {root} (media.local_media_dir)"
        raise MediaRejected(400, message, where)


def _decoded_size(payload: str, where: str) -> int:
    payload = payload.strip()
    if len(payload) % 4 == 1:
        raise MediaRejected(400, f"{where}: the data is not valid base64 (length {len(payload)})", where)
    return len(payload) * 3 // 4 - payload[-2:].count("=")


def check_size(size: int, where: str, model: str, accepts: MediaAccepts) -> None:
    """An item of `size` bytes (described by `where`) within the model's `media.max_item_mb`."""
    if size > accepts.max_item_bytes:
        raise MediaRejected(
            413,
            f"{where} is {_mib(size)}, over the {_mib(accepts.max_item_bytes)} limit of model `{model}` "
            f"(media.max_item_mb) by {_mib(size - accepts.max_item_bytes)}",
            where,
        )


def _b64decode(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as error:
        raise MediaRejected(400, f"{where}: the data is not valid base64 ({error})", where) from None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from an image's bytes (its header suffices); ValueError if it is no image.

    PIL's own guard refuses images over twice its MAX_IMAGE_PIXELS (vLLM's default limit too): those
    come back as a size just over that limit.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.size
        except Image.DecompressionBombError:
            over = 2 * int(Image.MAX_IMAGE_PIXELS or 0) + 1
            return over, 1
        except Image.UnidentifiedImageError:
            raise ValueError("not a format Pillow knows") from None
        except Exception as error:  # a known format, damaged: SyntaxError, struct.error, OSError ...
            raise ValueError(str(error) or type(error).__name__) from None


def check_image(payload: str, where: str, model: str, accepts: MediaAccepts) -> None:
    """The image in a base64 `payload` must be readable and within the pixel limit."""
    try:
        import PIL  # noqa: F401
    except ImportError:  # no Pillow here: vLLM checks the image itself
        return
    prefix = payload[: HEADER_CHARS - HEADER_CHARS % 4]
    try:
        width, height = image_size(_b64decode(prefix, where))
    except ValueError as error:
        if len(prefix) == len(payload):
            raise MediaRejected(400, f"{where} is not an image that can be read ({error})", where) from None
        try:  # a header beyond the first bytes (a large EXIF block, say)
            width, height = image_size(_b64decode(payload, where))
        except ValueError as full_error:
            raise MediaRejected(400, f"{where} is not an image that can be read ({full_error})", where) from None
    check_pixels(width, height, where, model, accepts)


def check_pixels(width: int, height: int, where: str, model: str, accepts: MediaAccepts) -> None:
    pixels = width * height
    if pixels > accepts.max_image_pixels:
        size = f"{width}×{height} = {pixels:,} pixels" if height > 1 else f"more than {pixels - 1:,} pixels"
        raise MediaRejected(
            413,
            f"{where} is {size}, over the {accepts.max_image_pixels:,}-pixel limit of model `{model}` "
            f"(media.max_image_pixels) by {pixels - accepts.max_image_pixels:,}; scale it down",
            where,
        )


def audio_format(data: bytes) -> str | None:
    """The container of an audio file from its first bytes, None when it is none vLLM decodes."""
    head = data[:16]
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    if head[4:8] == b"ftyp":
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "webm"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    return None


def check_audio_upload(data: bytes, filename: str, model: str, accepts: MediaAccepts) -> None:
    """An uploaded audio file (`file` of a transcription) against the model's limits."""
    if "audio" not in accepts.items_per_prompt:
        raise MediaRejected(400, f"model `{model}` does not take audio input ({_takes(accepts)})", "file")
    try:
        check_size(len(data), f"file {filename!r}", model, accepts)
    except MediaRejected as error:
        raise MediaRejected(error.status, str(error), "file") from None
    if audio_format(data) is None:
        raise MediaRejected(
            415,
            f"file {filename!r} ({_mib(len(data))}, starting {data[:8].hex(' ') or 'empty'}) is not an audio format "
            f"model `{model}` decodes: send {AUDIO_FORMATS}",
            "file",
        )
