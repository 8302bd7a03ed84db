"""The provider interface and its one error type."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts the server reported at the end of a stream."""

    prompt_tokens: int | None
    completion_tokens: int | None


class ProviderError(Exception):
    """A model call failed.

    `user_message` is what the user is told (short, nothing internal);
    `detail` is for the operator's log and the audit record; `retryable`
    says whether trying again may help.
    """

    def __init__(self, user_message: str, *, detail: str = "", retryable: bool = False) -> None:
        super().__init__(detail or user_message)
        self.user_message = user_message
        self.detail = detail or user_message
        self.retryable = retryable


class Provider(Protocol):
    name: str

    def stream(
        self, model: str, messages: list[dict[str, str]], *, num_ctx: int, max_tokens: int
    ) -> AsyncIterator[str | Usage]:
        """Reply text deltas, then one Usage; raises ProviderError."""
        ...

    async def list_models(self) -> list[str]: ...

    async def close(self) -> None: ...


def unreachable(where: str, exc: BaseException) -> ProviderError:
    return ProviderError(
        "The model server can't be reached right now. Please try again in a moment.",
        detail=f"{where} unreachable: {type(exc).__name__}: {exc}",
        retryable=True,
    )


def cut_off(exc: BaseException) -> ProviderError:
    return ProviderError(
        "The model server stopped in the middle of the reply. Please try again.",
        detail=f"stream cut: {type(exc).__name__}: {exc}",
        retryable=True,
    )
