"""The storage interface every backend implements, and the records it holds."""

from __future__ import annotations

import abc
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

# Tables in the order copy-db must fill them (parents before children).
TABLES = ("conversations", "messages", "summaries", "user_settings", "audit")


# The audit table's columns after `id`, in the order both backends store them.
AUDIT_COLUMNS = (
    "timestamp", "platform", "user_id", "chat_id", "conversation", "provider", "model",
    "user_input", "model_response", "status", "error", "response_time", "first_token_time",
    "prompt_tokens", "completion_tokens", "history_messages", "kind", "summary_used",
)


class StorageError(Exception):
    """The database cannot be used; the message is one line for the operator."""


def utcnow() -> str:
    """UTC timestamp, ISO 8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class ConversationRef:
    """Who a conversation belongs to; `key` is stable and human-readable."""

    key: str
    platform: str
    user_id: str
    place: str  # "dm", a server/group id, or "*" with MEMORY_SCOPE=user


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    role: str  # "user" or "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class Summary:
    text: str
    upto_id: int  # the newest message the summary covers
    updated_at: str


@dataclass(frozen=True, slots=True)
class TurnContext:
    """What one turn reads before the model call."""

    model_choice: str | None  # the user's /model pick, if any
    summary: Summary | None
    history: list[StoredMessage]  # newest messages after the summary, oldest first


@dataclass(slots=True)
class AuditRecord:
    """One row of the audit log: an exchange, a refusal, or a summary call."""

    platform: str
    user_id: str
    chat_id: str
    conversation: str
    user_input: str
    status: str = "ok"  # ok, error, rejected, cancelled
    kind: str = "chat"  # chat or summary
    provider: str = ""
    model: str = ""
    model_response: str = ""
    error: str = ""
    response_time: float | None = None
    first_token_time: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    history_messages: int = 0
    summary_used: bool = False
    timestamp: str = field(default_factory=utcnow)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def values(self) -> tuple[Any, ...]:
        """The record as a row, in AUDIT_COLUMNS order."""
        return tuple(getattr(self, column) for column in AUDIT_COLUMNS)


class Store(abc.ABC):
    """Memory and audit log; every method is safe to call concurrently."""

    _limiter: Any = None
    # Called as (steps done, steps in all) while open() migrates: `migrate`'s progress.
    on_migration: Any = None

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create what is missing, and apply pending migrations."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def applied_migrations(self) -> list[str]: ...

    # -- conversations and messages
    @abc.abstractmethod
    async def conversation_id(self, ref: ConversationRef) -> int:
        """The id of the conversation, created on first use."""

    @abc.abstractmethod
    async def recent_messages(
        self, conversation_id: int, limit: int, after_id: int = 0
    ) -> list[StoredMessage]:
        """The newest `limit` messages with id > after_id, oldest first."""

    @abc.abstractmethod
    async def messages_range(
        self, conversation_id: int, after_id: int, upto_id: int
    ) -> list[StoredMessage]:
        """Messages with after_id < id <= upto_id, oldest first."""

    @abc.abstractmethod
    async def count_messages(self, conversation_id: int) -> int: ...

    @abc.abstractmethod
    async def save_exchange(
        self, conversation_id: int, user_text: str, reply_text: str, audit: AuditRecord
    ) -> int:
        """Store both messages and the audit record in one transaction."""

    @abc.abstractmethod
    async def save_audit(self, audit: AuditRecord) -> int: ...

    @abc.abstractmethod
    async def reset_conversation(self, conversation_id: int) -> int:
        """Forget the conversation's messages and summary; return messages removed."""

    # -- summaries
    @abc.abstractmethod
    async def summary(self, conversation_id: int) -> Summary | None: ...

    @abc.abstractmethod
    async def save_summary(self, conversation_id: int, text: str, upto_id: int) -> bool:
        """Write the summary whole, only if message `upto_id` still exists."""

    async def turn_context(
        self, conversation_id: int, platform: str, user_id: str, limit: int,
        with_summary: bool,
    ) -> TurnContext:
        """The user's model pick, the summary, and the history after it.

        A backend may answer it in one round trip; this default asks three times.
        """
        summary = await self.summary(conversation_id) if with_summary else None
        history = await self.recent_messages(
            conversation_id, limit, after_id=summary.upto_id if summary else 0)
        return TurnContext(await self.user_model(platform, user_id), summary, history)

    # -- per-user settings
    @abc.abstractmethod
    async def user_model(self, platform: str, user_id: str) -> str | None: ...

    @abc.abstractmethod
    async def set_user_model(self, platform: str, user_id: str, model: str) -> None: ...

    # -- operators
    @abc.abstractmethod
    async def audit_log(self, limit: int, user: str | None = None) -> list[dict[str, Any]]:
        """The last `limit` records (optionally of `platform:user_id`), oldest first."""

    @abc.abstractmethod
    async def audit_rows_for_stats(self) -> list[dict[str, Any]]:
        """model, status, response_time, first_token_time, tokens of chat records."""

    @abc.abstractmethod
    async def forget_user(self, platform: str, user_id: str) -> dict[str, int]:
        """Erase everything kept about a user; return rows removed per table."""

    # -- operators: the filtered log, retention, stats (SQL in storage.audit_queries)
    async def audit_query(self, f: Any, limit: int) -> list[dict[str, Any]]:
        """The last `limit` records matching an AuditFilter, oldest first."""
        raise NotImplementedError

    async def audit_after(self, f: Any, after_id: int, limit: int) -> list[dict[str, Any]]:
        """Matching records with id > after_id, oldest first, at most `limit`."""
        raise NotImplementedError

    async def last_audit_id(self) -> int:
        raise NotImplementedError

    async def delete_audit_before(self, cutoff: str, batch: int) -> int:
        """Delete up to `batch` records older than `cutoff`; return how many went."""
        raise NotImplementedError

    async def audit_span(self) -> tuple[str | None, int]:
        """The oldest record's timestamp (None when empty) and the number of records."""
        raise NotImplementedError

    async def audit_stats(self, since: str | None = None
                          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Per-model counts and the millisecond histograms, aggregated by the database
        (bot.stats reads the percentiles off them)."""
        raise NotImplementedError

    # -- cross-process coordination (a no-op where one process owns the file)
    @abc.abstractmethod
    def conversation_lock(
        self, key: str, wait: float
    ) -> AbstractAsyncContextManager[None]:
        """Held across load → model → persist; gives up after `wait` seconds."""

    async def rate_hit(self, user_key: str, limit: int, window: int) -> float:
        """Count one message; return 0 if allowed, else seconds until allowed.

        In memory, with `limits`' moving window (its storage expires idle
        keys, so state does not grow with every user ever seen). A backend
        shared by several processes overrides this.
        """
        if self._limiter is None:
            from limits import storage, strategies

            self._limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())
        from limits import RateLimitItemPerSecond

        item = RateLimitItemPerSecond(limit, window)
        if self._limiter.hit(item, user_key):
            return 0.0
        reset_at, _ = self._limiter.get_window_stats(item, user_key)
        return max(0.1, reset_at - time.time())

    # -- copy-db
    @abc.abstractmethod
    async def table_counts(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def export_rows(self, table: str, batch: int = 1000) -> AsyncIterator[list[dict[str, Any]]]:
        ...

    @abc.abstractmethod
    async def import_rows(self, table: str, rows: list[dict[str, Any]]) -> None: ...

    @abc.abstractmethod
    async def finish_import(self) -> None:
        """After copy-db: move id sequences past the copied ids."""
