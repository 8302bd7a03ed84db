"""Any OpenAI-compatible server through `openai.AsyncOpenAI`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai

from bot.providers.base import ProviderError, Usage, cut_off, unreachable


class OpenAIProvider:
    name = "openai"

    def __init__(self, *, base_url: str | None, api_key: str | None) -> None:
        # Local servers take any key; the client refuses to start without one.
        # Retries are ours (before any text only), so the client's are off.
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "not-needed", max_retries=0
        )

    async def stream(
        self, model: str, messages: list[dict[str, str]], *, num_ctx: int, max_tokens: int
    ) -> AsyncIterator[str | Usage]:
        started = False
        finished = False  # a stream without a finish_reason was cut off
        usage: Usage | None = None
        try:
            chunks = await self._client.chat.completions.create(
                model=model,
                messages=messages,  # type: ignore[arg-type]
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=max_tokens,
            )
            async for chunk in chunks:
                started = True
                if chunk.usage is not None:
                    usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        yield choice.delta.content
                    if choice.finish_reason:
                        finished = True
        except openai.AuthenticationError as exc:
            raise ProviderError(
                "The model server refused the bot's credentials. Please tell the operator.",
                detail=f"openai 401: {exc.message}",
            ) from None
        except openai.PermissionDeniedError as exc:
            raise ProviderError(
                "The model server refused this request. Please tell the operator.",
                detail=f"openai 403: {exc.message}",
            ) from None
        except openai.NotFoundError as exc:
            raise ProviderError(
                f"The model `{model}` is not available on the model server. "
                "Pick another with /model.",
                detail=f"openai 404: {exc.message}",
            ) from None
        except openai.RateLimitError as exc:
            raise ProviderError(
                "The model server is rate-limiting the bot. Please try again in a minute.",
                detail=f"openai 429: {exc.message}",
                retryable=True,
            ) from None
        except openai.APIStatusError as exc:
            raise ProviderError(
                "The model server had an error. Please try again in a moment.",
                detail=f"openai {exc.status_code}: {exc.message}",
                retryable=exc.status_code >= 500,
            ) from None
        except (openai.APIConnectionError, httpx.TransportError, OSError) as exc:
            if started:
                raise cut_off(exc) from None
            raise unreachable("OpenAI-compatible server", exc) from None
        except openai.APIError as exc:  # e.g. an error event or a malformed chunk
            raise ProviderError(
                "The model server sent a reply I couldn't read. Please try again.",
                detail=f"openai error: {type(exc).__name__}: {exc}",
                retryable=not started,
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(
                "The model server sent a reply I couldn't read. Please try again.",
                detail=f"malformed stream: {type(exc).__name__}: {exc}",
                retryable=not started,
            ) from None
        if not finished:
            raise cut_off(EOFError("stream ended without a finish_reason"))
        yield usage or Usage(None, None)

    async def list_models(self) -> list[str]:
        try:
            page = await self._client.models.list()
        except openai.APIStatusError as exc:
            raise ProviderError(
                "The model server had an error listing models.",
                detail=f"openai {exc.status_code}: {exc.message}",
            ) from None
        except (openai.APIConnectionError, httpx.TransportError, OSError) as exc:
            raise unreachable("OpenAI-compatible server", exc) from None
        return [m.id async for m in page]

    async def close(self) -> None:
        await self._client.close()
