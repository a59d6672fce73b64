"""Size and pixel checks of `file://` images where the files are: on the replica's node.

The router checks what a request carries (data URLs) and where a `file://` path points, but the
file itself lies on the replica's node, which may be another machine. Without this check vLLM would
read any file there whole and answer an image over its pixel limit with HTTP 500. This ASGI wrapper
in front of vLLM's app reads only the chat requests that name a `file:` URL, stats each file and
reads its header, and answers 413 (too large) or 400 (unreadable) with the same words as the router.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from ..contract import MediaAccepts
from .media_checks import MediaRejected, check_pixels, check_size, image_size
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
                value = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" else None
                url = value.get("url") if isinstance(value, dict) else value
                if isinstance(url, str) and url.startswith("file:"):
                    self.check_file(unquote(urlsplit(url).path), f"messages[{i}].content[{j}]")

    def check_file(self, path: str, where: str) -> None:
        try:
            size = os.stat(path).st_size
        except OSError as error:
            raise MediaRejected(400, f"{where}: file {path} cannot be read here ({error.strerror})", where) from None
        check_size(size, f"{where} (file {path})", self.model, self.accepts)
        with open(path, "rb") as file:
            head = file.read(256 * 1024)
        try:
            width, height = image_size(head)
        except ValueError:
            try:
                with open(path, "rb") as file:
                    width, height = image_size(file.read())
            except ValueError as error:
                message = f"{where}: file {path} is not an image that can be read ({error})"
                raise MediaRejected(400, message, where) from None
        check_pixels(width, height, where, self.model, self.accepts)


async def _reject(send: Any, error: MediaRejected) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": error_body(error.status, str(error), error.kind, error.param)})
