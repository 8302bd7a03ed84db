"""Ollama's /api/chat stream without the ollama library's per-part models.

Profiled, the library cost about a quarter of the bot's CPU per exchange:
pydantic validation of every prompt message on the way out, and for each
streamed line `json.loads`, then a pydantic ChatResponse, through httpx's
text and line decoders. This sends the same request body, with the library
client's headers (its User-Agent, an OLLAMA_API_KEY's bearer), on the aiohttp
session under the library's httpx client (one connection pool), and reads the
NDJSON stream as bytes, each line parsed by orjson: httpx's request building
and its four stream layers per chunk were another ~5 % of the bot's CPU per
exchange. Errors are the library's: a status >= 400 or an "error" line raises
ollama.ResponseError; transport errors are aiohttp's. Messages with images
still go through the library (its image encoding).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
from ollama import ResponseError

from bot.providers.base import Usage

# No time limit of the session's own: the call's deadlines are bot.llm_call's.
_UNLIMITED = aiohttp.ClientTimeout(total=None)


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


async def chat_parts(session: aiohttp.ClientSession, url: str, headers: Mapping[str, str],
                     proxy: tuple[Any, aiohttp.BasicAuth | None], model: str,
                     messages: list[dict[str, Any]],
                     options: dict[str, Any]) -> AsyncIterator[tuple[str, Usage | None]]:
    """(text, None) per streamed part, then (text, Usage) for the part that says done.

    `proxy`: (its URL, its credentials), (None, None) for none."""
    async with session.post(url, data=request_body(model, messages, options), headers=headers,
                            proxy=proxy[0], proxy_auth=proxy[1],
                            timeout=_UNLIMITED) as response:
        if response.status >= 400:
            raise ResponseError(await response.text(errors="replace"), response.status)
        pending = b""
        async for chunk in response.content.iter_any():
            lines = (pending + chunk).split(b"\n") if pending else chunk.split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line.strip():
                    yield _part(line)
        if pending.strip():
            yield _part(pending)
