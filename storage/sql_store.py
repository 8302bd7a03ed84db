"""The Store methods both backends answer alike: one query, its rows decoded once.

A backend supplies `_fetch` (a read), `_write` (one statement in its own
transaction), `_run` and `_run_in_transaction` (a function of several
statements on one connection, as one unit: on SQLite one hand-off to its
thread) and keeps to itself only what its engine does differently:
transactions, locks, batching, copying in bulk.
"""

from __future__ import annotations

import abc
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from bot.recall.fitting import Around
from bot.records import (
    AuditRecord,
    ConversationRef,
    Note,
    StoredMessage,
    Summary,
    TurnContext,
    utcnow,
)
from bot.store import TABLES, Store
from storage import audit_queries as aq
from storage import queries, recall_index
from storage.dialect import Dialect
from storage.queries import Queries

T = TypeVar("T")


def _query(query: tuple[str, list[Any]]) -> list[Any]:
    """A built query as _fetch's positional arguments."""
    return [query[0], *query[1]]


def _dict(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in row.keys()}


class SQLStore(Store):
    """A Store over SQL in one dialect."""

    dialect: Dialect
    q: Queries

    @abc.abstractmethod
    async def _fetch(self, sql: str, *args: Any) -> Sequence[Any]:
        """The rows of one read."""

    @abc.abstractmethod
    async def _write(self, sql: str, *args: Any) -> Sequence[Any]:
        """One statement in its own transaction; the rows it returns (RETURNING)."""

    @abc.abstractmethod
    async def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`fn(conn, *args)` on one connection (reads: no transaction of its own)."""

    @abc.abstractmethod
    async def _run_in_transaction(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`fn(conn, *args)` on one connection inside a transaction, committed after."""

    @abc.abstractmethod
    def _reading(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A connection for reads (storage/recall_index.py takes one)."""

    @abc.abstractmethod
    def _writing(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """A connection inside a transaction, committed on exit."""

    async def applied_migrations(self) -> list[str]:
        return [r[0] for r in await self._fetch(self.q.applied_migrations)]

    async def recent_messages(
        self, conversation_id: int, limit: int, after_id: int = 0
    ) -> list[StoredMessage]:
        rows = await self._fetch(self.q.recent_messages, conversation_id, after_id,
                                 self.dialect.limit(limit))
        return queries.messages(reversed(rows))

    async def turn_context(
        self, conversation_id: int, platform: str, user_id: str, limit: int,
        with_summary: bool,
    ) -> TurnContext:
        # One round trip instead of three: each costs a thread wake-up
        # (SQLite) or a pooled connection (PostgreSQL), most of a turn's
        # storage time when idle.
        return queries.turn_context(await self._fetch(
            self.q.turn_context, conversation_id, with_summary, conversation_id,
            self.dialect.limit(limit), platform, user_id))

    async def messages_range(
        self, conversation_id: int, after_id: int, upto_id: int, limit: int | None = None
    ) -> list[StoredMessage]:
        return queries.messages(await self._fetch(
            self.q.messages_range, conversation_id, after_id, upto_id,
            self.dialect.limit(-1 if limit is None else limit)))

    async def count_messages(self, conversation_id: int) -> int:
        return int((await self._fetch(self.q.count_messages, conversation_id))[0][0])

    async def save_audit(self, audit: AuditRecord) -> int:
        return int((await self._write(self.q.audit_insert, *audit.values()))[0][0])

    async def summary(self, conversation_id: int) -> Summary | None:
        rows = await self._fetch(self.q.summary, conversation_id)
        return queries.summary(rows[0] if rows else None)

    async def user_model(self, platform: str, user_id: str) -> str | None:
        rows = await self._fetch(self.q.user_model, platform, user_id)
        return rows[0][0] if rows else None

    async def set_user_model(self, platform: str, user_id: str, model: str) -> None:
        await self._write(self.q.set_user_model, platform, user_id, model, utcnow())

    async def user_language(self, platform: str, user_id: str) -> str | None:
        rows = await self._fetch(self.q.user_language, platform, user_id)
        return rows[0][0] if rows else None

    async def set_user_language(self, platform: str, user_id: str,
                                language: str | None) -> None:
        await self._write(self.q.set_user_language, platform, user_id, language, utcnow())
    async def personas_of(self, conversation_key: str, platform: str,
                          place_id: str | None) -> tuple[str | None, str | None]:
        rows = await self._fetch(self.q.personas_of, conversation_key, platform,
                                 place_id or "")
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    async def set_conversation_persona(self, ref: ConversationRef,
                                       persona: str | None) -> None:
        if persona is None:
            await self._write(self.q.clear_conversation_persona, ref.key)
        else:
            await self._write(self.q.set_conversation_persona, ref.key, ref.platform,
                              ref.user_id, persona, utcnow())

    async def set_place_persona(self, platform: str, place_id: str,
                                persona: str | None) -> None:
        if persona is None:
            await self._write(self.q.clear_place_persona, platform, place_id)
        else:
            await self._write(self.q.set_place_persona, platform, place_id, persona, utcnow())

    async def audit_log(self, limit: int, user: str | None = None) -> list[dict[str, Any]]:
        n = self.dialect.limit(limit)
        if user:
            platform, _, user_id = user.partition(":")
            rows = await self._fetch(self.q.audit_log_of_user, platform, user_id, n)
        else:
            rows = await self._fetch(self.q.audit_log, n)
        return [queries.audit_row(r) for r in reversed(rows)]

    async def audit_rows_for_stats(self) -> list[dict[str, Any]]:
        return [{k: r[k] for k in r.keys()} for r in await self._fetch(self.q.audit_for_stats)]

    # -- operators: the filtered log, retention, stats (SQL in storage.audit_queries)
    async def audit_query(self, f: aq.AuditFilter, limit: int) -> list[dict[str, Any]]:
        sql, args = aq.audit_log(self.dialect, f, limit)
        return [queries.audit_row(r) for r in reversed(await self._fetch(sql, *args))]

    async def audit_after(self, f: aq.AuditFilter, after_id: int,
                          limit: int) -> list[dict[str, Any]]:
        sql, args = aq.audit_after(self.dialect, f, after_id, limit)
        return [queries.audit_row(r) for r in await self._fetch(sql, *args)]

    async def last_audit_id(self) -> int:
        sql, args = aq.last_audit_id(self.dialect)
        return int((await self._fetch(sql, *args))[0][0])

    async def delete_audit_before(self, cutoff: str, batch: int) -> int:
        sql, args = aq.delete_older_than(self.dialect, cutoff, batch)
        return len(await self._write(sql, *args))

    async def audit_span(self) -> tuple[str | None, int]:
        sql, args = aq.oldest_timestamp(self.dialect)
        row = (await self._fetch(sql, *args))[0]
        return row[0], int(row[1])

    async def audit_stats(self, since: str | None = None
                          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        groups = await self._fetch(*_query(aq.stats(self.dialect, since)))
        histogram = await self._fetch(*_query(aq.stats_histogram(self.dialect, since)))
        return [_dict(r) for r in groups], [_dict(r) for r in histogram]

    async def model_info(self, model: str) -> dict[str, Any] | None:
        rows = await self._fetch(self.q.model_info, model)
        if not rows:
            return None
        return dict(zip(queries.MODEL_INFO_FIELDS, tuple(rows[0]), strict=True))

    async def save_model_info(self, model: str, **fields: float | int | None) -> None:
        cols = [c for c in queries.MODEL_INFO_FIELDS if c in fields]
        await self._write(queries.save_model_info(self.dialect, cols),
                          model, *(fields[c] for c in cols), utcnow())

    async def model_time(self) -> list[dict[str, Any]]:
        return [{k: r[k] for k in r.keys()} for r in await self._fetch(self.q.model_time)]

    async def table_counts(self) -> dict[str, int]:
        return {t: int((await self._fetch(queries.count_rows(t)))[0][0]) for t in TABLES}

    async def export_rows(
        self, table: str, batch: int = 1000
    ) -> AsyncIterator[list[dict[str, Any]]]:
        first = queries.export_batch(self.dialect, table, first=True)
        after = queries.export_batch(self.dialect, table, first=False)
        key = queries.PRIMARY_KEYS[table]
        rows = await self._fetch(first, batch)
        while rows:
            yield [queries.export_row(r) for r in rows]
            rows = await self._fetch(after, *(rows[-1][c] for c in key), batch)

    # -- notes
    async def notes(self, conversation_id: int) -> list[Note]:
        return queries.notes(await self._fetch(self.q.notes, conversation_id))

    async def add_note(self, conversation_id: int, text: str) -> int:
        return int((await self._write(self.q.note_insert, conversation_id, text,
                                      utcnow()))[0][0])

    async def delete_note(self, conversation_id: int, note_id: int) -> bool:
        return await self._run_in_transaction(self._delete_note, conversation_id, note_id)

    async def _delete_note(self, conn: Any, conversation_id: int, note_id: int) -> bool:
        if self.dialect.is_sqlite:
            cur = await conn.execute(self.q.note_delete, (note_id, conversation_id))
            return bool(cur.rowcount)
        return str(await conn.execute(self.q.note_delete, note_id,
                                      conversation_id)).endswith(" 1")

    async def user_conversations(self, platform: str, user_id: str) -> list[int]:
        return [int(r[0]) for r in await self._fetch(self.q.user_conversations, platform,
                                                     user_id)]

    # -- the recall index
    async def recall_search(self, conversation_id: int, terms: list[str], before_id: int,
                            limit: int) -> list[tuple[int, float]]:
        return await self._run(recall_index.search, conversation_id, terms, before_id, limit)

    async def recall_around(self, conversation_id: int, ids: list[int],
                            before_id: int) -> list[Around]:
        return await self._run(recall_index.around, conversation_id, ids, before_id)

    async def vectors_since(self, conversation_id: int, model: str,
                            after_id: int) -> list[tuple[int, bytes]]:
        return await self._run(recall_index.vectors_since, conversation_id, model, after_id)

    async def save_vectors(self, model: str, rows: list[tuple[int, int, bytes]]) -> int:
        if not rows:
            return 0
        return await self._run_in_transaction(self._save_vectors, model, rows)

    async def _save_vectors(self, conn: Any, model: str,
                            rows: list[tuple[int, int, bytes]]) -> int:
        # A message deleted (/reset, forget) while it was being embedded is skipped.
        ids = [r[0] for r in rows]
        if self.dialect.is_sqlite:
            cur = await conn.execute(
                "SELECT id FROM messages WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(ids),))
            alive = {int(r[0]) for r in await cur.fetchall()}
        else:
            alive = {int(r[0]) for r in await conn.fetch(
                "SELECT id FROM messages WHERE id = ANY($1::bigint[]) FOR SHARE", ids)}
        return await recall_index.save_vectors(conn, model, [r for r in rows if r[0] in alive])

    async def messages_without_vectors(
        self, model: str, after_id: int, limit: int,
        conversation_ids: list[int] | None = None,
    ) -> list[tuple[int, int, str]]:
        return await self._run(recall_index.messages_without_vectors, model, after_id, limit,
                               conversation_ids)

    async def index_unindexed(self, after_id: int, limit: int,
                              conversation_ids: list[int] | None = None) -> tuple[int, int]:
        rows = await self._run_in_transaction(_index_unindexed, after_id, limit,
                                              conversation_ids)
        return len(rows), (rows[-1][0] if rows else 0)

    async def count_missing(self, model: str | None,
                            conversation_ids: list[int] | None = None) -> int:
        return await self._run(recall_index.count_missing, model, conversation_ids)


async def _index_unindexed(conn: Any, after_id: int, limit: int,
                           conversation_ids: list[int] | None) -> list[tuple[int, int, str]]:
    rows = await recall_index.unindexed_messages(conn, after_id, limit, conversation_ids)
    await recall_index.index_messages(conn, rows)
    return rows
