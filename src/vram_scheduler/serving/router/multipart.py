"""The `multipart/form-data` bodies of OpenAI's audio endpoints, as the router needs them: the form's
fields (`model`, ...) and its file, and a field added without re-encoding the upload.

No web framework in the router's path: parts are found by their boundary and only their headers go
through the standard library's MIME parser.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
from dataclasses import dataclass, field

from ...core.errors import RayVramError


class FormError(RayVramError, ValueError):
    """A multipart body that cannot be read."""


@dataclass
class Upload:
    name: str
    filename: str
    data: bytes


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[Upload] = field(default_factory=list)


def is_multipart(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "multipart/form-data"


def _boundary(content_type: str) -> bytes:
    header = email.message.Message()
    header["content-type"] = content_type
    marker = header.get_param("boundary")
    if not isinstance(marker, str) or not marker:
        raise FormError("multipart/form-data without a boundary")
    return marker.encode("latin-1")


def parse_form(content_type: str, body: bytes) -> Form:
    """Fields and files of a multipart/form-data `body` (parts found by their boundary, so a large
    upload is sliced, never scanned line by line; only part headers go through the MIME parser)."""
    delimiter = b"--" + _boundary(content_type)
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise FormError("the multipart body has no closing boundary")
    form = Form()
    for chunk in chunks[1:-1]:
        head, separator, payload = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not separator:
            raise FormError("a multipart part has no header block")
        headers = email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(head + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        payload = payload.removesuffix(b"\r\n")
        filename = headers.get_filename()
        if filename is not None:
            form.files.append(Upload(name, filename, payload))
        else:
            form.fields[name] = payload.decode(headers.get_content_charset() or "utf-8", errors="replace")
    return form


def add_field(content_type: str, body: bytes, name: str, value: str) -> bytes:
    """`body` with one more form field, inserted before the closing boundary (the upload is not copied
    through a parser)."""
    delimiter = b"--" + _boundary(content_type)
    at = body.rfind(delimiter + b"--")
    if at < 0:
        raise FormError("the multipart body has no closing boundary")
    part = (
        delimiter + b"\r\n"
        b'Content-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value.encode() + b"\r\n"
    )
    return body[:at] + part + body[at:]
