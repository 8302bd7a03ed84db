"""Any OpenAI-compatible server through `openai.AsyncOpenAI`.

What differs between such servers is handled here: the reply limit's name
(api.openai.com wants `max_completion_tokens`, reasoning models refuse
`max_tokens`; other servers know only `max_tokens`), how a too-long prompt is
refused (400 `context_length_exceeded`, llama.cpp's `exceed_context_size_error`,
or llama-cpp-python's HTTP 200 with an empty stream), whether usage is sent,
and where the window and a tokenizer are found (vLLM `max_model_len` in
/v1/models, llama.cpp `/props` and `/tokenize`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai

from bot.i18n import N_
from bot.images import openai_messages
from bot.providers.base import (
    NO_OPTIONS,
    CallOptions,
    ModelInfo,
    ProviderError,
    Usage,
    cut_off,
    too_long,
    too_long_error,
    unreachable,
)

log = logging.getLogger(__name__)

_LIMIT_NAMES = ("max_tokens", "max_completion_tokens")


class OpenAIProvider:
    name = "openai"

    def __init__(self, *, base_url: str | None, api_key: str | None) -> None:
        # Local servers take any key; the client refuses to start without one.
        # Retries are ours (before any text only), so the client's are off.
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "not-needed", max_retries=0
        )
        host = urlsplit(str(self._client.base_url)).hostname or ""
        self._official = host == "api.openai.com"
        # The reply limit's name per model, once a server told us otherwise.
        self._limit_name: dict[str, str] = {}
        self._root = str(self._client.base_url).rstrip("/").removesuffix("/v1")
        # Endpoints a server has shown it lacks are not asked again.
        self._has_tokenize = not self._official
        self._has_props = not self._official

    def _limit_for(self, model: str) -> str:
        default = "max_completion_tokens" if self._official else "max_tokens"
        return self._limit_name.get(model, default)

    async def stream(
        self, model: str, messages: list[dict[str, Any]], *, num_ctx: int, max_tokens: int,
        options: CallOptions = NO_OPTIONS,
    ) -> AsyncIterator[str | Usage]:
        opened = False  # the server answered 200 and the stream began
        texted = False  # any text arrived
        finish: str | None = None  # a stream without a finish_reason was cut off
        usage: tuple[int | None, int | None] | None = None
        try:
            chunks = await self._open(model, messages, max_tokens, options)
            opened = True
            # Closed with this generator: a reader that stops early (/stop) hangs up the
            # call now, not when the stream is collected.
            async with chunks:
                async for chunk in chunks:
                    if chunk.usage is not None:
                        usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            texted = True
                            yield choice.delta.content
                        if choice.finish_reason:
                            finish = choice.finish_reason
        except openai.APIStatusError as exc:
            raise _status_error(model, exc) from None
        except (openai.APIConnectionError, httpx.TransportError, OSError) as exc:
            if texted:
                raise cut_off(exc) from None
            if not (opened or _hung_up(exc)):
                raise unreachable("OpenAI-compatible server", exc) from None
            # llama-cpp-python: a long prompt's stream is a 200 whose connection
            # drops, often before the headers are flushed (its error is raised
            # after the app sent them): the request reached it, so ask again.
            log.info("%s: the stream broke before any text: %s", model, exc)
        except openai.APIError as exc:  # e.g. an error event or a malformed chunk
            raise ProviderError(
                N_("The model server sent a reply I couldn't read. Please try again."),
                detail=f"openai error: {type(exc).__name__}: {exc}",
                retryable=not texted,
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(
                N_("The model server sent a reply I couldn't read. Please try again."),
                detail=f"malformed stream: {type(exc).__name__}: {exc}",
                retryable=not texted,
            ) from None
        if finish is None and not texted:
            # llama-cpp-python answers a too-long streamed prompt with 200 and
            # an empty or broken stream (and ends a stream that another request
            # interrupts the same way); asked without streaming it says why, or answers.
            text, answered = await self._diagnose_empty(model, messages, max_tokens)
            if text:
                yield text
            yield answered
            return
        if finish is None:
            raise cut_off(EOFError("stream ended without a finish_reason"))
        prompt, completion = usage if usage is not None else (None, None)
        yield Usage(prompt, completion, finish)

    async def _open(self, model: str, messages: list[dict[str, Any]], max_tokens: int,
                    options: CallOptions) -> Any:
        name = self._limit_for(model)
        try:
            return await self._create(model, messages, name, max_tokens, options, stream=True)
        except openai.BadRequestError as exc:
            other = _other_limit_name(exc, name)
            if other is None:
                raise
        # That server wants the other name (reasoning models refuse
        # max_tokens; older servers know only max_tokens): once more with it.
        log.info("%s: the server wants %s, not %s", model, other, name)
        self._limit_name[model] = other
        return await self._create(model, messages, other, max_tokens, options, stream=True)

    async def _create(self, model: str, messages: list[dict[str, Any]], limit_name: str,
                      max_tokens: int, options: CallOptions, *, stream: bool) -> Any:
        extra: dict[str, Any] = {**options.openai, limit_name: max_tokens}
        if stream:
            extra["stream_options"] = {"include_usage": True}
        return await self._client.chat.completions.create(
            model=model,
            messages=openai_messages(messages),  # type: ignore[arg-type]
            stream=stream,
            extra_body=extra,
        )

    async def _diagnose_empty(self, model: str, messages: list[dict[str, Any]],
                              max_tokens: int) -> tuple[str, Usage]:
        """After a 200 with an empty stream: the same request without streaming.

        Same reply limit (llama-cpp-python refuses prompt + limit > n_ctx).
        Every answer is one of: a too-long refusal in any status (raised as
        kind "too_long", so the caller learns the window and refits); a
        reply (the empty stream was an interruption: that reply is the
        answer); an empty reply cut at the length limit (the prompt filled
        the window: too long, window unknown); an empty reply (returned as
        such, the caller says so); any other error (raised, in words).
        """
        for attempt in (1, 2):
            try:
                done = await self._create(model, messages, self._limit_for(model), max_tokens,
                                          NO_OPTIONS, stream=False)
                break
            except openai.APIStatusError as exc:
                raise _status_error(model, exc, any_status=True) from None
            except (openai.APIConnectionError, httpx.TransportError, OSError) as exc:
                # llama-cpp-python closes the broken stream's connection after the
                # fact: the pooled one it left hangs up at once; a new one answers.
                if attempt == 2 or not _hung_up(exc):
                    raise unreachable("OpenAI-compatible server", exc) from None
            except (openai.APIError, ValueError, KeyError, TypeError) as exc:
                raise ProviderError(
                    N_("The model server sent a reply I couldn't read. Please try again."),
                    detail=f"empty stream, then {type(exc).__name__}: {exc}", retryable=True,
                ) from None
        choice = done.choices[0] if getattr(done, "choices", None) else None
        text = (choice.message.content or "") if choice and choice.message else ""
        finish = choice.finish_reason if choice else None
        used = done.usage
        prompt = used.prompt_tokens if used is not None else None
        completion = used.completion_tokens if used is not None else None
        if not text.strip() and finish == "length":
            raise too_long(f"empty stream, then an empty reply cut at the length limit "
                           f"({prompt} prompt tokens)")
        log.info("%s: empty stream, then %s without streaming", model,
                 "a reply" if text else "an empty reply")
        return text, Usage(prompt, completion, finish or "stop")

    async def list_models(self) -> list[str]:
        try:
            page = await self._client.models.list()
        except openai.APIStatusError as exc:
            raise ProviderError(
                N_("The model server had an error listing models."),
                detail=f"openai {exc.status_code}: {exc.message}",
            ) from None
        except (openai.APIConnectionError, httpx.TransportError, OSError) as exc:
            raise unreachable("OpenAI-compatible server", exc) from None
        return [m.id async for m in page]

    async def model_info(self, model: str) -> ModelInfo:
        length: int | None = None
        try:
            async for entry in await self._client.models.list():
                if entry.id != model:
                    continue
                extra = entry.model_extra or {}
                # vLLM: max_model_len; LM Studio and others: (max_)context_length.
                for key in ("max_model_len", "context_length", "max_context_length"):
                    if isinstance(extra.get(key), int) and extra[key] > 0:
                        length = extra[key]
                        break
        except (openai.APIError, httpx.HTTPError, OSError, ValueError) as exc:
            log.info("no model list for %s: %s", model, exc)
        if length is None and self._has_props:
            length = await self._props_window()
        return ModelInfo(context_length=length)

    async def _props_window(self) -> int | None:
        """llama.cpp server's n_ctx from /props."""
        body = await self._root_call("GET", "/props", None)
        if body is None:
            self._has_props = False
            return None
        settings = body.get("default_generation_settings") or {}
        n = settings.get("n_ctx", body.get("n_ctx"))
        return n if isinstance(n, int) and n > 0 else None

    async def count_tokens(self, model: str, text: str) -> int | None:
        if not self._has_tokenize:
            return None
        # llama.cpp reads "content", vLLM "prompt"; each ignores the other.
        body = await self._root_call("POST", "/tokenize",
                                     {"model": model, "content": text, "prompt": text,
                                      "add_special": False, "add_special_tokens": False})
        if body is None:
            self._has_tokenize = False
            return None
        if isinstance(body.get("count"), int):
            return int(body["count"])
        tokens = body.get("tokens")
        return len(tokens) if isinstance(tokens, list) else None

    async def _root_call(self, method: str, path: str,
                         payload: dict[str, Any] | None) -> dict[str, Any] | None:
        """A JSON call beside /v1 (llama.cpp, vLLM); None if the server has no such route."""
        try:
            if method == "GET":
                resp = await self._client.get(self._root + path, cast_to=httpx.Response)
            else:
                resp = await self._client.post(self._root + path, cast_to=httpx.Response,
                                               body=payload)
            body = resp.json()
        except (openai.APIError, httpx.HTTPError, OSError, ValueError) as exc:
            log.info("%s %s not available: %s", method, path, exc)
            return None
        return body if isinstance(body, dict) else None

    async def close(self) -> None:
        await self._client.close()


def _hung_up(exc: BaseException) -> bool:
    """The server took the request and closed the connection without answering."""
    cause = exc.__cause__ or exc
    # By name: the openai SDK's transport is httpx or, in newer releases, its fork httpx2.
    return any(c.__name__ in ("RemoteProtocolError", "ReadError") for c in type(cause).__mro__)


def _other_limit_name(exc: openai.BadRequestError, sent: str) -> str | None:
    """The other reply-limit name if this 400 says `sent` isn't supported."""
    text = f"{exc.message} {json.dumps(exc.body, default=str)}".lower()
    if sent in text and ("unsupported" in text or "not supported" in text
                         or "unrecognized" in text or "extra inputs" in text):
        return _LIMIT_NAMES[1] if sent == _LIMIT_NAMES[0] else _LIMIT_NAMES[0]
    return None


def _status_error(model: str, exc: openai.APIStatusError, *,
                  any_status: bool = False) -> ProviderError:
    """The user's words for an error status; `any_status` looks for a too-long
    refusal in any status (after an empty stream, a 500 may say so too)."""
    status = exc.status_code
    if any_status and status not in (400, 413, 422):
        err = too_long_error(f"{exc.message} {json.dumps(exc.body, default=str)}")
        if err is not None:
            return err
    if status == 401:
        return ProviderError(
            N_("The model server refused the bot's credentials. Please tell the operator."),
            detail=f"openai 401: {exc.message}",
        )
    if status == 403:
        return ProviderError(
            N_("The model server refused this request. Please tell the operator."),
            detail=f"openai 403: {exc.message}",
        )
    if status == 404:
        return ProviderError(
            N_("The model `{model}` is not available on the model server. "
               "Pick another with /model."),
            params={"model": model},
            detail=f"openai 404: {exc.message}",
        )
    if status == 429:
        return ProviderError(
            N_("The model server is rate-limiting the bot. Please try again in a minute."),
            detail=f"openai 429: {exc.message}",
            retryable=True,
        )
    if status in (400, 413, 422):
        body = exc.body if isinstance(exc.body, dict) else {}
        n_ctx = body.get("n_ctx")
        err = too_long_error(f"{exc.message} {json.dumps(exc.body, default=str)}",
                             n_ctx if isinstance(n_ctx, int) else None)
        if err is not None:
            return err
    return ProviderError(
        N_("The model server had an error. Please try again in a moment."),
        detail=f"openai {status}: {exc.message}",
        retryable=status >= 500,
    )
