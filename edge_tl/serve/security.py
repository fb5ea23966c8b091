"""What the server lets in: the bearer token, the body size limit, the image limits and
class names that reach a head.

- The token is read from a file (never from the command line, where ``ps`` shows it), at
  least :data:`MIN_TOKEN_CHARS` characters, compared in constant time
  (:func:`hmac.compare_digest`) and never logged.
- A body over the limit is answered 413 before it is read (``Content-Length``) or as soon
  as the bytes read pass it (chunked uploads), by :class:`BodyLimit`, an ASGI middleware.
- An uploaded image is decoded from memory, never written to disk; its header's pixel
  count is checked against the server's limit before any pixel is decoded (a
  decompression bomb: a 100 KB PNG can claim 20,000 x 20,000 pixels), then the floor's
  own limit applies (:func:`edge_tl.images.read_image`).
- A class name follows the project's one rule (:func:`edge_tl.labels.check_label`: no
  ``/`` or ``\\``, no control characters, at most 100 characters) and, here, holds no
  ``..``.

Torch-free.
"""

from __future__ import annotations

import hmac
import io
import json
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from PIL import Image

from edge_tl.errors import EdgeTLError
from edge_tl.images import BadImageError, decoding, max_pixels
from edge_tl.labels import check_label
from edge_tl.runtime.preprocess import load_image
from edge_tl.serve.protocol import ProtocolError

__all__ = [
    "DEFAULT_MAX_BODY_MB",
    "DEFAULT_MAX_PIXELS",
    "MAX_REQUEST_PIXELS",
    "MIN_TOKEN_CHARS",
    "BodyLimit",
    "check_bearer",
    "decode_image",
    "decode_images",
    "read_token",
    "server_label",
]

MIN_TOKEN_CHARS = 16
DEFAULT_MAX_BODY_MB = 32.0
DEFAULT_MAX_PIXELS = 40_000_000
"""Pixels of one uploaded image, at most (a 40 MP camera frame; 120 MB decoded as RGB)."""
MAX_REQUEST_PIXELS = 400_000_000
"""Pixels of all the images of one request together, at most (about 1.2 GB decoded as
RGB; e.g. 200 phone photos scaled to 1600 x 1200, or ten 40 MP frames)."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def read_token(path: str | Path) -> str:
    """The bearer token in ``path`` (its first line, spaces stripped).

    Raises:
        EdgeTLError: the file is missing or unreadable, or the token is shorter than
            :data:`MIN_TOKEN_CHARS` (the message never shows the token).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeTLError(
            f"--token-file {path} cannot be read ({type(e).__name__}); create it, e.g. "
            f"`python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}`"
        ) from None
    lines = text.strip().splitlines()
    token = lines[0].strip() if lines else ""
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise EdgeTLError(
            f"--token-file {path} holds no usable token (at least {MIN_TOKEN_CHARS} "
            "characters without spaces on its first line); write one with "
            f"`python -c 'import secrets; print(secrets.token_urlsafe(32))' > {path}`"
        )
    return token


def check_bearer(authorization: str | None, token: str | None, what: str) -> None:
    """Let a request through when its ``Authorization: Bearer <token>`` matches ``token``
    (constant-time compare).

    Raises:
        ProtocolError: 403 when the server has no token (``what`` is then off), 401 when
            the header is missing or the token is wrong.
    """
    if token is None:
        raise ProtocolError(
            403, f"{what} needs a bearer token; start the server with --token-file FILE"
        )
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise ProtocolError(401, f"{what} needs the header 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ProtocolError(401, "the bearer token is wrong")


def server_label(name: object, what: str = "class name") -> str:
    """``name`` if it is a valid class name for a request (see the module docstring).

    Raises:
        ProtocolError: 400 with the rule it breaks.
    """
    if isinstance(name, str) and ".." in name:
        raise ProtocolError(400, f"{what} {name[:100]!r} contains '..'; use a plain name")
    try:
        return check_label(name, what)
    except EdgeTLError as e:
        raise ProtocolError(400, str(e)) from None


class _Named(io.BytesIO):
    """An upload in memory, named in error messages as ``image 2`` or its file name."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label

    __repr__ = __str__


def decode_images(
    items: list[tuple[str, bytes]],
    limit: int = DEFAULT_MAX_PIXELS,
    budget: int = MAX_REQUEST_PIXELS,
) -> list[Image.Image]:
    """Every ``(name, bytes)`` of one request decoded (:func:`decode_image`), once the
    pixels of all of them together, read from their headers, are within ``budget``
    (at least ``limit``, so that one image of the largest size always fits).

    Without it, 64 small PNGs that each claim 36 megapixels (a 3 MB infer request, no
    token needed) would be decoded together into gigabytes.

    Raises:
        ProtocolError: as :func:`decode_image`; 413 for images over ``budget`` pixels in
            all, before any of them is decoded.
    """
    budget = max(budget, min(limit, max_pixels()))
    total = 0
    for name, data in items:
        w, h = _size(data, name)
        total += w * h
        if total > budget:
            raise ProtocolError(
                413,
                f"the {len(items)} images of this request hold over {budget:,} pixels in all "
                f"(at {name}); send fewer images per request, or smaller ones",
            )
    return [decode_image(data, name, limit) for name, data in items]


def _size(data: bytes, name: str) -> tuple[int, int]:
    """``(width, height)`` of an uploaded image, from its header (nothing decoded).

    Raises:
        ProtocolError: 400 for empty data or bytes that are not an image; 413 for one over
            twice Pillow's limit (Pillow's own bomb check runs inside ``Image.open``).
    """
    if not data:
        raise ProtocolError(400, f"{name} is empty; send an image file (JPEG, PNG, ...)")
    try:
        with decoding(name), Image.open(_Named(data, name)) as f:
            w, h = f.size
    except EdgeTLError as e:
        bomb = isinstance(e, BadImageError) and "decompression bomb" in e.reason
        raise ProtocolError(413 if bomb else 400, _reason(e, name)) from None
    return w, h


def decode_image(data: bytes, name: str, limit: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An uploaded image file's bytes -> 8-bit RGB or grey, decoded in memory.

    Raises:
        ProtocolError: 400 for empty data or bytes that are not an image, 413 for an image
            over ``limit`` pixels (checked from its header, before decoding), each naming
            ``name``.
    """
    limit = min(limit, max_pixels())
    w, h = _size(data, name)
    if w * h > limit:
        raise ProtocolError(
            413,
            f"{name} is {w:,} x {h:,} = {w * h:,} pixels, over this server's limit of "
            f"{limit:,} (a guard against decompression bombs); send a smaller image",
        )
    try:
        return load_image(_Named(data, name))  # type: ignore[arg-type]
    except EdgeTLError as e:
        raise ProtocolError(400, _reason(e, name)) from None


def _reason(e: EdgeTLError, name: str) -> str:
    if isinstance(e, BadImageError) and "decompression bomb" in e.reason:
        return f"{name} {e.reason}; send a smaller image"
    if isinstance(e, BadImageError):
        return f"{name} {e.reason}; send an image file (JPEG, PNG, BMP, TIFF, WebP, ...)"
    return str(e)


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, before the app reads it
    (``Content-Length``) or once the bytes received pass it (no length given)."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length > limit:
                    await _too_large(send, limit, length)
                    return
        received = 0

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # answered by the app's handler for ProtocolError
                    raise ProtocolError(413, _too_large_message(limit, None))
            return message

        await self.app(scope, counting, send)


def _too_large_message(limit: int, length: int | None) -> str:
    size = f" ({length:,} bytes)" if length is not None else ""
    return (
        f"the request body{size} is over this server's limit of {limit:,} bytes; send "
        "fewer or smaller images (or start the server with a larger --max-body-mb)"
    )


async def _too_large(send: Send, limit: int, length: int | None) -> None:
    body = json.dumps({"error": _too_large_message(limit, length)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
