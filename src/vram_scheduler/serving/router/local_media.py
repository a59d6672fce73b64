"""Checks of `file://` media where the files are: on the replica's node.

The router checks what a request carries (data URLs) and where a `file://` path points, but the
file itself lies on the replica's node, which may be another machine. Without this check vLLM would
read any file there whole and answer an image over its pixel limit with HTTP 500. This ASGI wrapper
in front of vLLM's app reads only the chat requests that name a `file:` URL and, for each image,
audio or video URL, resolves the path (links included) before opening anything: it must be a
regular file under the model's media directory (`media.local_media_dir`, resolved too), else 400
with one message for missing, outside, unreadable and not-a-file alike (an answer must not tell
whether a file exists elsewhere on the node). The file is then opened without following links,
checked again on its descriptor (a regular file, within `media.max_item_mb`: never `/dev/zero`, a
FIFO or a socket), and only its header is read; images are checked against their pixel limit.
Answers: 413 (too large) or 400, with the same words as the router.
"""

from __future__ import annotations

import os
import stat
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from ...core.contract import MediaAccepts
from .media_checks import PART_KINDS, MediaRejected, check_pixels, check_size, image_size
from .router import error_body

Scope = dict[str, Any]


class LocalMediaGuard:
    """Wraps vLLM's ASGI app for one model (see module docstring)."""

    def __init__(self, app: Any, model: str, accepts: MediaAccepts):
        self.app = app
        self.model = model
        self.accepts = accepts

    def __getattr__(self, name: str) -> Any:  # `state`, ... of the wrapped app
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if not (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/chat/completions"):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if b'"file:' in body:
            try:
                self.check(body)
            except MediaRejected as error:
                await _reject(send, error)
                return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # a disconnect, while vLLM streams
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def check(self, body: bytes) -> None:
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            return  # vLLM answers a bad body itself
        for i, message in enumerate(request.get("messages") or [] if isinstance(request, dict) else []):
            content = message.get("content") if isinstance(message, dict) else None
            for j, part in enumerate(content if isinstance(content, list) else []):
                kind = part.get("type") if isinstance(part, dict) else None
                if not kind or not kind.endswith("_url") or kind not in PART_KINDS:
                    continue
                value = part.get(kind)
                url = value.get("url") if isinstance(value, dict) else value
                if isinstance(url, str) and url[:5].lower() == "file:":
                    self.check_file(unquote(urlsplit(url).path), f"messages[{i}].content[{j}]", PART_KINDS[kind])

    def check_file(self, path: str, where: str, kind: str = "image") -> None:
        """`path` must be a regular file under the media directory, within the size (and for an image
        the pixel) limit; MediaRejected otherwise, never telling why a path is not a usable file."""
        with self._open(path, where) as file:
            size = os.fstat(file.fileno()).st_size
            check_size(size, f"{where} (file {path})", self.model, self.accepts)
            if kind != "image":
                return
            head = file.read(256 * 1024)
            try:
                width, height = image_size(head)
            except ValueError:
                try:  # a header beyond the first bytes; the file is within max_item_mb
                    width, height = image_size(head + file.read(self.accepts.max_item_bytes))
                except ValueError as error:
                    message = f"{where}: file {path} is not an image that can be read ({error})"
                    raise MediaRejected(400, message, where) from None
        check_pixels(width, height, where, self.model, self.accepts)

    def _open(self, path: str, where: str) -> Any:
        """The file `path` names, opened for reading once it is known to be a regular file under the
        media directory (resolved, links included); one refusal for every other case."""
        root = os.path.realpath(self.accepts.local_media_dir or "/nonexistent")
        refused = MediaRejected(
            400,
            f"{where}: file {path} is not a readable file in model `{self.model}`'s media directory "
            f"{self.accepts.local_media_dir} (media.local_media_dir)",
            where,
        )
        resolved = os.path.realpath(path) if os.path.isabs(path) else None
        if resolved is None or os.path.commonpath([resolved, root]) != root or resolved == root:
            raise refused
        try:
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            raise refused from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a device, FIFO, socket or directory
                raise refused
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise


async def _reject(send: Any, error: MediaRejected) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": error_body(error.status, str(error), error.kind, error.param)})
