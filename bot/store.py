"""The store's contract: what the core asks of memory and the audit log."""

from __future__ import annotations

import abc
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from bot.records import (
    AuditRecord,
    ConversationRef,
    Note,
    StoredMessage,
    Summary,
    TurnContext,
)

if TYPE_CHECKING:
    from bot.recall.fitting import Around

# Tables in the order copy-db must fill them (parents before children).
# The recall index is not copied: it is rebuilt from the messages (see copy-db).
TABLES = ("conversations", "messages", "summaries", "user_settings", "audit", "model_info",
          "conversation_settings", "place_settings", "notes")


@dataclass(frozen=True, slots=True)
class TurnReads:
    """Everything a chat turn reads before its model call."""

    context: TurnContext
    notes: list[Note]
    # (this conversation's persona, its place's default), None where unset; None
    # altogether when the turn did not ask (no personas are set up).
    personas: tuple[str | None, str | None] | None = None


def redact_url(url: str) -> str:
    """A database URL with any password replaced by ***, for messages and logs."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}{':***' if colon else ''}@{hostport}"
    except ValueError:
        return url.split("://", 1)[0] + "://***"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    with suppress(ValueError):
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    return url.split("://", 1)[0] + "://***"


class Store(abc.ABC):
    """Memory and audit log; every method is safe to call concurrently."""

    # Called as (steps done, steps in all) while open() migrates: `migrate`'s progress.
    on_migration: Callable[[int, int], None] | None = None

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
        self, conversation_id: int, after_id: int, upto_id: int, limit: int | None = None
    ) -> list[StoredMessage]:
        """Messages with after_id < id <= upto_id, oldest first (the first `limit`)."""

    @abc.abstractmethod
    async def count_messages(self, conversation_id: int) -> int: ...

    @abc.abstractmethod
    async def save_exchange(
        self, conversation_id: int, user_text: str, reply_text: str, audit: AuditRecord
    ) -> int:
        """Store both messages and the audit record in one transaction; the audit id.

        0, and nothing written, if the user was forgotten since `audit.since`
        (the turn read their data before the erasure). A conversation erased
        by another process before that is resolved again (created anew).
        """

    @abc.abstractmethod
    async def save_audit(self, audit: AuditRecord) -> int:
        """The record's id; 0, nothing written, if its user was forgotten since `audit.since`."""

    @abc.abstractmethod
    async def reset_conversation(self, conversation_id: int) -> int:
        """Forget the conversation's messages and summary; return messages removed."""

    # -- summaries
    @abc.abstractmethod
    async def summary(self, conversation_id: int) -> Summary | None: ...

    @abc.abstractmethod
    async def save_summary(self, conversation_id: int, text: str, upto_id: int) -> bool:
        """Write the summary whole, only if message `upto_id` still exists and no
        summary covering more is stored."""

    @contextlib.asynccontextmanager
    async def summary_lock(self, conversation_id: int) -> AsyncIterator[bool]:
        """Whether this process may summarise the conversation now (held while
        it does); False: another process is at it, skip. One process owns a
        SQLite file, and the Summarizer runs one summary per conversation."""
        yield True

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
        return TurnContext(await self.user_model(platform, user_id), summary, history,
                           await self.user_language(platform, user_id))

    async def turn_reads(
        self, conversation_id: int, ref: ConversationRef, place_id: str | None, limit: int,
        *, with_summary: bool, with_personas: bool,
    ) -> TurnReads:
        """The turn's context, the conversation's notes and (with_personas) its
        personas (`personas_of`). A backend may answer it all in one round trip;
        this default asks for each in turn."""
        context = await self.turn_context(conversation_id, ref.platform, ref.user_id, limit,
                                          with_summary)
        notes = await self.notes(conversation_id)
        personas = await self.personas_of(ref.key, ref.platform, place_id) \
            if with_personas else None
        return TurnReads(context, notes, personas)

    # -- notes (/remember)
    @abc.abstractmethod
    async def notes(self, conversation_id: int) -> list[Note]:
        """The conversation's notes, oldest first (numbered 1.. in this order)."""

    @abc.abstractmethod
    async def add_note(self, conversation_id: int, text: str) -> int: ...

    @abc.abstractmethod
    async def delete_note(self, conversation_id: int, note_id: int) -> bool: ...

    # -- the recall index (storage/recall_index.py); messages are indexed by save_exchange
    @abc.abstractmethod
    async def recall_search(self, conversation_id: int, terms: list[str], before_id: int,
                            limit: int) -> list[tuple[int, float]]:
        """Messages of the conversation older than before_id matching the terms, best first."""

    @abc.abstractmethod
    async def recall_around(self, conversation_id: int, ids: list[int],
                            before_id: int) -> list[Around]:
        """Each hit with its neighbours (all older than before_id), in the order of ids."""

    @abc.abstractmethod
    async def vectors_since(self, conversation_id: int, model: str,
                            after_id: int) -> list[tuple[int, bytes]]: ...

    @abc.abstractmethod
    async def save_vectors(self, model: str, rows: list[tuple[int, int, bytes]]) -> int:
        """(message_id, conversation_id, float32 blob) rows; a deleted message is skipped."""

    @abc.abstractmethod
    async def messages_without_vectors(
        self, model: str, after_id: int, limit: int,
        conversation_ids: list[int] | None = None,
    ) -> list[tuple[int, int, str]]:
        """(id, conversation_id, content) with no vector for `model`, oldest first."""

    @abc.abstractmethod
    async def index_unindexed(self, after_id: int, limit: int,
                              conversation_ids: list[int] | None = None) -> tuple[int, int]:
        """Index up to `limit` messages with id > after_id lacking words-index entries;
        (messages indexed, the last id looked at; 0 when nothing is left)."""

    @abc.abstractmethod
    async def count_missing(self, model: str | None,
                            conversation_ids: list[int] | None = None) -> int:
        """Messages lacking words-index entries (model None) or a vector for `model`."""

    @abc.abstractmethod
    async def user_conversations(self, platform: str, user_id: str) -> list[int]: ...

    # -- per-user settings
    @abc.abstractmethod
    async def user_model(self, platform: str, user_id: str) -> str | None: ...

    @abc.abstractmethod
    async def set_user_model(self, platform: str, user_id: str, model: str) -> None: ...

    @abc.abstractmethod
    async def user_language(self, platform: str, user_id: str) -> str | None:
        """The user's /language choice; None: follow the platform."""

    @abc.abstractmethod
    async def set_user_language(self, platform: str, user_id: str,
                                language: str | None) -> None:
        """Keep the user's /language choice (None: back to automatic)."""
    # -- personas (/persona)
    @abc.abstractmethod
    async def personas_of(self, conversation_key: str, platform: str,
                          place_id: str | None) -> tuple[str | None, str | None]:
        """(this conversation's persona, its place's default), None where unset."""

    @abc.abstractmethod
    async def set_conversation_persona(self, ref: ConversationRef,
                                       persona: str | None) -> None:
        """Pick a persona for one conversation; None goes back to the default."""

    @abc.abstractmethod
    async def set_place_persona(self, platform: str, place_id: str,
                                persona: str | None) -> None:
        """A server's or group's default persona; None removes it."""

    # -- what the bot learned about each model (its window, its token counts)
    @abc.abstractmethod
    async def model_info(self, model: str) -> dict[str, Any] | None:
        """context_length, learned_window, token_factor, cjk_factor; None if nothing yet."""

    @abc.abstractmethod
    async def save_model_info(self, model: str, **fields: float | int | None) -> None:
        """Set the named fields (others are kept); creates the row if needed."""

    # -- operators
    @abc.abstractmethod
    async def audit_log(self, limit: int, user: str | None = None) -> list[dict[str, Any]]:
        """The last `limit` records (optionally of `platform:user_id`), oldest first."""

    @abc.abstractmethod
    async def audit_rows_for_stats(self) -> list[dict[str, Any]]:
        """model, status, response_time, first_token_time, tokens of chat records."""

    async def model_time(self) -> list[dict[str, Any]]:
        """provider, model, kind, calls, seconds: model time of answered calls per kind."""
        return []

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

    # Rate limits: a backend several processes share counts them for all of
    # them (PostgreSQL); otherwise the service counts in memory (bot.ratelimit).
    shared_rate_limit: bool = False

    async def rate_hit(self, user_key: str, limit: int, window: int) -> float:
        """Count one message; return 0 if allowed, else seconds until allowed."""
        raise NotImplementedError("only a backend with shared_rate_limit counts")

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
