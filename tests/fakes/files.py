"""Serving a stored file as the platforms' file servers do: in 64 KiB pieces, counted."""

from __future__ import annotations

from typing import Protocol

from aiohttp import web

PIECE = 64 * 1024


class Served(Protocol):
    """A stored file: how it is sent (`chunked`: no Content-Length) and how much was."""

    chunked: bool
    sent: int


async def serve_file(request: web.Request, stored: Served, body: bytes) -> web.StreamResponse:
    """Stream `body`, adding to `stored.sent` what reached the downloader."""
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if not stored.chunked:
        response.content_length = len(body)
    await response.prepare(request)
    try:
        for start in range(0, len(body), PIECE):
            piece = body[start:start + PIECE]
            await response.write(piece)
            stored.sent += len(piece)
        await response.write_eof()
    except ConnectionError:
        pass  # the downloader hung up: what it read is in `sent`
    return response
