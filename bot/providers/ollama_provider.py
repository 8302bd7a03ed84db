"""Ollama through `ollama.AsyncClient`, streaming /api/chat."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import ollama
from aiohttp.helpers import get_env_proxy_for_url
from httpx_aiohttp import AiohttpTransport
from yarl import URL

from bot.i18n import N_
from bot.images import ollama_messages
from bot.providers import ollama_stream
from bot.providers.base import (
    NO_OPTIONS,
    CallOptions,
    ModelInfo,
    ProviderError,
    Usage,
    cut_off,
    unreachable,
)

log = logging.getLogger(__name__)


async def _parts(stream: AsyncIterator[ollama.ChatResponse]) \
        -> AsyncIterator[tuple[str, Usage | None]]:
    """The ollama library's parts as (text, Usage once done): for messages with images."""
    try:
        async for part in stream:
            text = part.message.content if part.message else ""
            yield text or "", (Usage(part.prompt_eval_count, part.eval_count, part.done_reason)
                               if part.done else None)
    finally:
        # Closed with this generator: a reader that stops early hangs up the call now.
        await stream.aclose()  # type: ignore[attr-defined]


class OllamaProvider:
    name = "ollama"

    def __init__(self, host: str) -> None:
        # Plain http (the usual local Ollama): no TLS, so no certificate store to load;
        # loading it is the largest single cost of starting the bot (~0.1-0.2 s).
        plain = host.lower().startswith("http://")
        tls = {"verify": False} if plain else {}
        # aiohttp under the library's httpx client: profiled, httpcore's pure-Python
        # HTTP/1.1 (h11, anyio) read of the streamed chunks was a quarter of the
        # bot's CPU per exchange; aiohttp parses them in C. The text chat stream uses
        # the same session directly (bot.providers.ollama_stream).
        self._session: aiohttp.ClientSession | None = None
        self._transport = AiohttpTransport(client=self._http, **tls)
        self._client = ollama.AsyncClient(host=host, transport=self._transport, **tls)
        http: httpx.AsyncClient = self._client._client  # the library's client and settings
        # As httpx merges the library's "/api/chat": under the host's own path.
        self._chat_url = str(http.base_url).rstrip("/") + "/api/chat"
        self._headers = {**http.headers, "Content-Type": "application/json",
                         "Accept": "application/json"}
        # A proxy from the environment, as httpx honours it: found once, not per call
        # (aiohttp's trust_env looks it up for every request).
        try:
            self._proxy: tuple[URL | None, aiohttp.BasicAuth | None] = \
                get_env_proxy_for_url(URL(self._chat_url))
        except LookupError:
            self._proxy = (None, None)

    def _http(self) -> aiohttp.ClientSession:
        """The one aiohttp session (made on first use, in the running loop)."""
        if self._session is None or self._session.closed:
            # The limits httpx had: 100 connections, idle ones kept 5 s.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=5.0,
                                               ssl=self._transport.ssl_context))
        return self._session

    async def stream(
        self, model: str, messages: list[dict[str, Any]], *, num_ctx: int, max_tokens: int,
        options: CallOptions = NO_OPTIONS,
    ) -> AsyncIterator[str | Usage]:
        started = False
        try:
            # num_ctx: Ollama otherwise truncates long prompts silently at its
            # own default window.
            call_options = {**options.ollama, "num_ctx": num_ctx, "num_predict": max_tokens}
            if any(m.get("images") for m in messages):
                parts: AsyncIterator[Any] = _parts(await self._client.chat(
                    model=model, messages=ollama_messages(messages), stream=True,
                    options=call_options))
            else:
                parts = ollama_stream.chat_parts(self._http(), self._chat_url, self._headers,
                                                 self._proxy, model, messages, call_options)
            done: Usage | None = None
            async for text, finished in parts:
                started = True
                if text:
                    yield text
                if finished is not None:
                    done = finished
                    # Read on to the end of the body (it ends here) so that
                    # the HTTP connection goes back to the pool for reuse.
            if done is not None:
                yield done
                return
        except ollama.ResponseError as exc:
            raise _response_error(model, exc) from None
        except (httpx.TransportError, aiohttp.ClientError, ConnectionError, OSError) as exc:
            if started:
                raise cut_off(exc) from None
            raise unreachable("Ollama", exc) from None
        except (json.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
            raise ProviderError(
                N_("The model server sent a reply I couldn't read. Please try again."),
                detail=f"malformed stream: {type(exc).__name__}: {exc}",
                retryable=not started,
            ) from None
        raise cut_off(EOFError("stream ended without done"))

    async def list_models(self) -> list[str]:
        try:
            listed = await self._client.list()
        except ollama.ResponseError as exc:
            raise _response_error("", exc) from None
        except (httpx.TransportError, ConnectionError, OSError) as exc:
            raise unreachable("Ollama", exc) from None
        names = [m.model for m in listed.models if m.model]
        return [n.removesuffix(":latest") for n in names]

    async def model_info(self, model: str) -> ModelInfo:
        try:
            shown = await self._client.show(model)
        except (ollama.ResponseError, httpx.HTTPError, ConnectionError, OSError,
                ValueError) as exc:
            log.info("no model info for %s: %s", model, exc)
            return ModelInfo()
        info = shown.modelinfo or {}
        arch = info.get("general.architecture")
        length = info.get(f"{arch}.context_length") if arch else None
        details = shown.details
        return ModelInfo(
            context_length=length if isinstance(length, int) and length > 0 else None,
            parameter_size=details.parameter_size if details else None,
            quantization=details.quantization_level if details else None,
            capabilities=tuple(shown.capabilities) if shown.capabilities is not None else None,
        )

    async def count_tokens(self, model: str, text: str) -> int | None:
        return None  # Ollama has no tokenize endpoint; it reports counts after a call

    async def close(self) -> None:
        client = getattr(self._client, "_client", None)
        if client is not None:
            await client.aclose()
        if self._session is not None:
            await self._session.close()  # closed already if the library had used it


def _response_error(model: str, exc: ollama.ResponseError) -> ProviderError:
    status = exc.status_code
    text = str(exc.error)
    if status == 404 and "model" not in text.lower():
        # Ollama names the model in its 404s; a bare 404 page is another server.
        return ProviderError(
            N_("The model server does not speak Ollama's API; set LLM_PROVIDER=openai "
               "(and OPENAI_BASE_URL) for an OpenAI-compatible server."),
            detail=f"ollama 404 without an Ollama error body: {text[:200]}",
        )
    if status == 404 or "not found" in text.lower():
        return ProviderError(
            N_("The model `{model}` is not installed on the model server. "
               "Pick another with /model (or ask the operator to `ollama pull` it)."),
            params={"model": model},
            detail=f"ollama {status}: {text}",
        )
    if status == 429:
        return ProviderError(
            N_("The model server is busy. Please try again in a moment."),
            detail=f"ollama 429: {text}", retryable=True,
        )
    return ProviderError(
        N_("The model server had an error. Please try again in a moment."),
        detail=f"ollama {status}: {text}",
        retryable=status is None or status >= 500 or status < 0,
    )
