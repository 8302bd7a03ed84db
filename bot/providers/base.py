"""The provider interface, what a call sends and gets back, and its one error type."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.i18n import N_, Translator


@dataclass(frozen=True, slots=True)
class Usage:
    """What the server reported at the end of a stream.

    Token counts are None when the server sent none (unknown, not 0).
    `stop_reason` is the server's done_reason / finish_reason ("stop",
    "length", ...), None if it gave none.
    """

    prompt_tokens: int | None
    completion_tokens: int | None
    stop_reason: str | None = None


@dataclass(frozen=True, slots=True)
class CallOptions:
    """Per-call model settings beyond the window and the reply limit.

    `ollama` goes into Ollama's `options` as is (Modelfile parameter names:
    temperature, top_p, seed, stop, ...); `openai` are extra request fields
    of an OpenAI-compatible server (temperature, top_p, seed, stop, ...).
    A persona fills both; images go with the messages themselves.
    """

    ollama: Mapping[str, Any] = field(default_factory=dict)
    openai: Mapping[str, Any] = field(default_factory=dict)


NO_OPTIONS = CallOptions()


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a server says about one model; None where it says nothing."""

    context_length: int | None = None
    parameter_size: str | None = None
    quantization: str | None = None
    # What the model can do, as Ollama's /api/show `capabilities` lists it
    # ("completion", "vision", "tools", ...); None where the server doesn't say.
    capabilities: tuple[str, ...] | None = None


class ProviderError(Exception):
    """A model call failed.

    `msgid` and `params` are what the user is told (short, nothing internal):
    an English catalogue message (bot.i18n) with its named placeholders,
    shown in each user's language by `message(tr)`; `user_message` is it in
    English. `detail` is for the operator's log and the audit record; `retryable`
    says whether trying again may help. `kind` is "too_long" when the prompt
    did not fit the model's window (`window` then holds the window the
    server named, if it named one), "unreachable" when no server answered.
    """

    def __init__(self, msgid: str, *, params: Mapping[str, Any] | None = None,
                 detail: str = "", retryable: bool = False,
                 kind: str = "", window: int | None = None) -> None:
        self.msgid = msgid
        self.params = dict(params or {})
        self.user_message = msgid.format(**self.params)
        super().__init__(detail or self.user_message)
        self.detail = detail or self.user_message
        self.retryable = retryable
        self.kind = kind
        self.window = window

    def message(self, tr: Translator) -> str:
        """What the user is told, in `tr`'s language."""
        return tr.gettext(self.msgid, **self.params)


class Provider(Protocol):
    name: str

    def stream(
        self, model: str, messages: list[dict[str, Any]], *, num_ctx: int, max_tokens: int,
        options: CallOptions = NO_OPTIONS,
    ) -> AsyncIterator[str | Usage]:
        """Reply text deltas, then one Usage; raises ProviderError."""
        ...

    async def list_models(self) -> list[str]: ...

    async def model_info(self, model: str) -> ModelInfo:
        """The model's window and size as the server reports them (never raises)."""
        ...

    async def count_tokens(self, model: str, text: str) -> int | None:
        """The server's own count of `text`, or None where it has no tokenizer endpoint."""
        ...

    async def close(self) -> None: ...


def unreachable(where: str, exc: BaseException) -> ProviderError:
    return ProviderError(
        N_("The model server can't be reached right now. Please try again in a moment."),
        detail=f"{where} unreachable: {type(exc).__name__}: {exc}",
        retryable=True, kind="unreachable",
    )


def cut_off(exc: BaseException) -> ProviderError:
    return ProviderError(
        N_("The model server stopped in the middle of the reply. Please try again."),
        detail=f"stream cut: {type(exc).__name__}: {exc}",
        retryable=True,
    )


# How servers say a prompt is too long: OpenAI and vLLM ("maximum context
# length is 8192 tokens"), llama-cpp-python ("exceed context window of 2048"),
# llama.cpp server ("exceeds the available context size", n_ctx in the body).
_TOO_LONG = re.compile(
    r"context_length_exceeded|exceed_context_size|maximum context length|context window"
    r"|context size|context length|too many tokens|prompt is too long",
    re.IGNORECASE,
)
_WINDOW = re.compile(
    r"(?:maximum context length is|context window of|context length of|n_ctx\"?\s*[:=]\s*"
    r"|context size \()\s*(\d+)",
    re.IGNORECASE,
)


def too_long_error(text: str, window: int | None = None) -> ProviderError | None:
    """A too-long ProviderError if the server's error `text` says so, else None."""
    if not _TOO_LONG.search(text):
        return None
    if window is None and (m := _WINDOW.search(text)):
        window = int(m.group(1))
    return too_long(text, window)


def too_long(why: str, window: int | None = None) -> ProviderError:
    """The prompt did not fit the model's window (`window` if the server named it)."""
    return ProviderError(
        N_("This conversation no longer fits the model's context window."),
        detail=f"prompt too long for the model's window ({window or 'size unknown'}): "
               f"{why[:300]}",
        kind="too_long", window=window,
    )
