"""Ollama's /api/chat stream without the ollama library's per-part models.

Profiled, the library cost about a quarter of the bot's CPU per exchange:
pydantic validation of every prompt message on the way out, and for each
streamed line `json.loads`, then a pydantic ChatResponse, through httpx's
text and line decoders. This sends the same request body on the library's
own httpx client (its host, headers, timeouts and transport errors) and reads
the NDJSON stream as bytes, each line parsed by orjson. Errors are the
library's: a status ≥ 400 or an "error" line raises ollama.ResponseError.
Messages with images still go through the library (its image encoding).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from ollama import AsyncClient, ResponseError

from bot.providers.base import Usage

_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def request_body(model: str, messages: list[dict[str, Any]],
                 options: dict[str, Any]) -> bytes:
    """The body ollama.AsyncClient.chat sends (empty fields dropped, as it drops them)."""
    return orjson.dumps({
        "model": model, "stream": True, "options": options,
        "messages": [{k: v for k, v in m.items() if v} for m in messages], "tools": []})


def _loads(line: bytes) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        # orjson refuses what the stdlib (and so the library) reads: a lone surrogate
        # escape, as a token that splits an emoji sends. Shown cleaned later.
        return json.loads(line)


def _part(line: bytes) -> tuple[str, Usage | None]:
    part = _loads(line)
    if not isinstance(part, dict):
        raise TypeError(f"a stream line that is not an object: {line[:100]!r}")
    if err := part.get("error"):
        raise ResponseError(err)
    message = part.get("message") or {}
    if not isinstance(message, dict):
        raise TypeError(f"message is {type(message).__name__}")
    text = message.get("content")
    if not isinstance(text, str | None):
        raise TypeError(f"content is {type(text).__name__}")
    if not part.get("done"):
        return text or "", None
    prompt, completion = part.get("prompt_eval_count"), part.get("eval_count")
    if not all(isinstance(n, int | None) for n in (prompt, completion)):
        raise TypeError("token counts that are not integers")
    return text or "", Usage(prompt, completion, part.get("done_reason"))


async def chat_parts(client: AsyncClient, model: str, messages: list[dict[str, Any]],
                     options: dict[str, Any]) -> AsyncIterator[tuple[str, Usage | None]]:
    """(text, None) per streamed part, then (text, Usage) for the part that says done."""
    http: httpx.AsyncClient = client._client  # the library's own client and settings
    async with http.stream("POST", "/api/chat", headers=_HEADERS,
                           content=request_body(model, messages, options)) as response:
        if response.status_code >= 400:
            await response.aread()
            raise ResponseError(response.text, response.status_code)
        pending = b""
        async for chunk in response.aiter_bytes():
            lines = (pending + chunk).split(b"\n") if pending else chunk.split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line.strip():
                    yield _part(line)
        if pending.strip():
            yield _part(pending)
