"""SQLite backend on aiosqlite: one connection, WAL, writes serialised."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from storage import audit_queries as aq
from storage.base import (
    AUDIT_COLUMNS,
    TABLES,
    AuditRecord,
    ConversationRef,
    StorageError,
    Store,
    StoredMessage,
    Summary,
    TurnContext,
    utcnow,
)
from storage.sqlite_migrations import MIGRATIONS

_AUDIT_ROW = f"({', '.join('?' * len(AUDIT_COLUMNS))})"
_AUDIT_INSERT_HEAD = f"INSERT INTO audit ({', '.join(AUDIT_COLUMNS)}) VALUES "
_AUDIT_INSERT = _AUDIT_INSERT_HEAD + _AUDIT_ROW
MAX_BATCH = 200  # exchanges per commit: 200 × 18 parameters, far below SQLite's 32,766

# The user's model pick, the summary, and the newest messages after it: one query.
_TURN_CONTEXT = """
WITH s AS (
    SELECT text, upto_id, updated_at FROM summaries
    WHERE conversation_id = :c AND :with_summary
)
SELECT * FROM (
    SELECT 0, id, role, content, NULL FROM messages
    WHERE conversation_id = :c AND id > coalesce((SELECT upto_id FROM s), 0)
    ORDER BY id DESC LIMIT :limit
)
UNION ALL SELECT 1, upto_id, NULL, text, updated_at FROM s
UNION ALL SELECT 2, 0, NULL, model, NULL FROM user_settings
    WHERE platform = :p AND user_id = :u
"""



@dataclass(slots=True)
class _PendingExchange:
    conversation_id: int
    user_text: str
    reply_text: str
    audit: AuditRecord
    done: asyncio.Future[int]


def _prepare_file(path: str) -> None:
    """Create the folder and an owner-only database file (runs in a thread)."""
    p = Path(path)
    if path != ":memory:":
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        # WAL maps the -shm file into memory: one this process may not write
        # kills it with SIGBUS at the first access, without a word. Say so first.
        for side in (p.with_name(p.name + "-shm"), p.with_name(p.name + "-wal")):
            if side.exists() and not os.access(side, os.R_OK | os.W_OK):
                raise OSError(f"{side.name} is not writable by this user (another user "
                              "ran the bot here?); fix its owner, or use read-only commands")


class SQLiteStore(Store):
    """Memory and audit log in one SQLite file."""

    def __init__(self, path: str, *, busy_timeout: float = 5.0, read_only: bool = False) -> None:
        self.path = path
        # Read-only (logs, stats): opened with mode=ro, no migrations, no writes.
        self.read_only = read_only
        # Seconds a statement waits for another connection's write lock.
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._conv_ids: dict[str, int] = {}
        self._pending: list[_PendingExchange] = []
        self._writer: asyncio.Task[None] | None = None
        # One connection: a transaction must not interleave with another
        # coroutine's statements, so every use takes this lock.
        self._lock = asyncio.Lock()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StorageError("the store is not open")
        return self._db

    async def open(self) -> None:
        if self.read_only:
            return await self._open_read_only()
        try:
            await asyncio.to_thread(_prepare_file, self.path)
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            self._db.row_factory = aiosqlite.Row
            await self._db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            await self._db.execute("PRAGMA journal_mode = WAL")
            await self._db.execute("PRAGMA synchronous = NORMAL")
            # One user's rows spread over many pages in a big file: a larger
            # cache and memory-mapped reads keep history loads flat as it grows.
            await self._db.execute("PRAGMA cache_size = -32768")
            await self._db.execute("PRAGMA mmap_size = 268435456")
            await self._migrate()
        except (OSError, sqlite3.Error) as exc:
            await self.close()
            raise StorageError(f"cannot use database {self.path!r}: {exc}") from None

    async def _open_read_only(self) -> None:
        try:
            uri = await asyncio.to_thread(_read_only_uri, self.path)
            self._db = await aiosqlite.connect(uri, uri=True, isolation_level=None)
            self._db.row_factory = aiosqlite.Row
            await self._db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            await self._db.execute("SELECT count(*) FROM _migrations")
        except sqlite3.Error as exc:
            await self.close()
            raise StorageError(f"cannot read database {self.path!r}: {exc}") from None

    async def close(self) -> None:
        if self._writer is not None and not self._writer.done():
            with contextlib.suppress(Exception):
                await self._writer  # exchanges already acknowledged are written
        if self._db is not None:
            db, self._db = self._db, None
            with contextlib.suppress(Exception):
                await db.close()

    async def _migrate(self) -> None:
        db = self.db
        await db.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT)"
        )
        # A table rebuild needs foreign keys off (it can't change inside a
        # transaction); they are checked, then turned back on, afterwards.
        await db.execute("PRAGMA foreign_keys = OFF")
        for step, (name, sql) in enumerate(MIGRATIONS, 1):
            # BEGIN IMMEDIATE takes the write lock first, so two processes
            # starting at once apply each step exactly once.
            await db.execute("BEGIN IMMEDIATE")
            try:
                async with db.execute("SELECT 1 FROM _migrations WHERE name = ?", (name,)) as c:
                    done = await c.fetchone()
                if not done:
                    for statement in _statements(sql):
                        await db.execute(statement)
                    await db.execute(
                        "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                        (name, utcnow()),
                    )
                async with db.execute("PRAGMA foreign_key_check") as c:
                    broken = await c.fetchall()
                if broken:
                    raise StorageError(f"migration {name} broke {len(broken)} references")
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            if self.on_migration is not None:
                self.on_migration(step, len(MIGRATIONS))
        await db.execute("PRAGMA foreign_keys = ON")

    async def applied_migrations(self) -> list[str]:
        async with self._lock, self.db.execute(
            "SELECT name FROM _migrations ORDER BY name"
        ) as cur:
            return [r[0] for r in await cur.fetchall()]

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")

    async def _fetchall(self, sql: str, args: tuple[Any, ...] | dict[str, Any] = ()
                        ) -> list[sqlite3.Row]:
        # One trip to aiosqlite's thread instead of execute + fetchall + close.
        async with self._lock:
            return list(await self.db.execute_fetchall(sql, args))

    # -- conversations and messages
    async def conversation_id(self, ref: ConversationRef) -> int:
        # Cached: ids are never reused (migration 004), so a stale entry left
        # by `forget` in another process can only fail the foreign key on the
        # next save, which empties the cache (see save_exchange).
        cached = self._conv_ids.get(ref.key)
        if cached is not None:
            return cached
        rows = await self._fetchall("SELECT id FROM conversations WHERE key = ?", (ref.key,))
        if rows:
            return self._remember(ref.key, int(rows[0][0]))
        async with self._transaction() as db:
            await db.execute(
                "INSERT OR IGNORE INTO conversations (key, platform, user_id, place, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (ref.key, ref.platform, ref.user_id, ref.place, utcnow()),
            )
            async with db.execute("SELECT id FROM conversations WHERE key = ?", (ref.key,)) as c:
                row = await c.fetchone()
        assert row is not None
        return self._remember(ref.key, int(row[0]))

    def _remember(self, key: str, conversation_id: int) -> int:
        if len(self._conv_ids) >= 50_000:  # a cache, not a registry of every user
            self._conv_ids.clear()
        self._conv_ids[key] = conversation_id
        return conversation_id

    async def recent_messages(
        self, conversation_id: int, limit: int, after_id: int = 0
    ) -> list[StoredMessage]:
        rows = await self._fetchall(
            "SELECT id, role, content FROM messages WHERE conversation_id = ? AND id > ?"
            " ORDER BY id DESC LIMIT ?",
            (conversation_id, after_id, limit),
        )
        return [StoredMessage(r[0], r[1], r[2]) for r in reversed(rows)]

    async def turn_context(
        self, conversation_id: int, platform: str, user_id: str, limit: int,
        with_summary: bool,
    ) -> TurnContext:
        # One trip to the database thread instead of three: each trip costs
        # a thread wake-up, which is most of a turn's storage time when idle.
        rows = await self._fetchall(_TURN_CONTEXT, {
            "c": conversation_id, "p": platform, "u": user_id, "limit": limit,
            "with_summary": int(with_summary)})
        choice: str | None = None
        summary: Summary | None = None
        history: list[StoredMessage] = []
        for kind, ident, role, content, updated in rows:
            if kind == 0:
                history.append(StoredMessage(ident, role, content))
            elif kind == 1:
                summary = Summary(content, int(ident), updated)
            else:
                choice = content
        history.reverse()
        return TurnContext(choice, summary, history)

    async def messages_range(
        self, conversation_id: int, after_id: int, upto_id: int
    ) -> list[StoredMessage]:
        rows = await self._fetchall(
            "SELECT id, role, content FROM messages WHERE conversation_id = ?"
            " AND id > ? AND id <= ? ORDER BY id",
            (conversation_id, after_id, upto_id),
        )
        return [StoredMessage(r[0], r[1], r[2]) for r in rows]

    async def count_messages(self, conversation_id: int) -> int:
        rows = await self._fetchall(
            "SELECT count(*) FROM messages WHERE conversation_id = ?", (conversation_id,)
        )
        return int(rows[0][0])

    async def save_exchange(
        self, conversation_id: int, user_text: str, reply_text: str, audit: AuditRecord
    ) -> int:
        # Group commit: exchanges that finish while a commit is under way are
        # written together in the next one. Each caller still returns only
        # once its own exchange is committed, whole.
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(_PendingExchange(conversation_id, user_text, reply_text, audit,
                                              done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        return await asyncio.shield(done)  # a cancelled caller must not undo the others

    async def _write_pending(self) -> None:
        while self._pending:
            # Bounded by SQLite's limit on bound parameters per statement.
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            try:
                ids = await self._insert_exchanges(batch)
            except Exception:
                # One bad exchange must not fail the others: write them alone.
                for item in batch:
                    try:
                        (audit_id,) = await self._insert_exchanges([item])
                    except Exception as exc:
                        if isinstance(exc, sqlite3.IntegrityError):
                            self._conv_ids.clear()  # the conversation may be forgotten
                        if not item.done.done():
                            item.done.set_exception(exc)
                    else:
                        if not item.done.done():
                            item.done.set_result(audit_id)
                continue
            for item, audit_id in zip(batch, ids, strict=True):
                if not item.done.done():
                    item.done.set_result(audit_id)

    async def _insert_exchanges(self, batch: list[_PendingExchange]) -> list[int]:
        # Four trips whatever the batch size: BEGIN, one multi-row insert per
        # table, COMMIT.
        messages: list[Any] = []
        audits: list[Any] = []
        for e in batch:
            messages += (e.conversation_id, "user", e.user_text, e.audit.timestamp,
                         e.conversation_id, "assistant", e.reply_text, e.audit.timestamp)
            audits += e.audit.values()
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO messages (conversation_id, role, content, created_at) VALUES "
                + ", ".join(["(?, ?, ?, ?)"] * (2 * len(batch))), messages)
            cur = await db.execute(
                _AUDIT_INSERT_HEAD + ", ".join([_AUDIT_ROW] * len(batch)), audits)
            # Rows inserted by one statement take consecutive rowids.
            last = int(cur.lastrowid or 0)
        return list(range(last - len(batch) + 1, last + 1))

    async def save_audit(self, audit: AuditRecord) -> int:
        async with self._transaction() as db:
            cur = await db.execute(_AUDIT_INSERT, audit.values())
            return int(cur.lastrowid or 0)

    async def reset_conversation(self, conversation_id: int) -> int:
        async with self._transaction() as db:
            cur = await db.execute(
                "DELETE FROM messages WHERE conversation_id = ?", (conversation_id,)
            )
            await db.execute("DELETE FROM summaries WHERE conversation_id = ?", (conversation_id,))
            return int(cur.rowcount or 0)

    # -- summaries
    async def summary(self, conversation_id: int) -> Summary | None:
        rows = await self._fetchall(
            "SELECT text, upto_id, updated_at FROM summaries WHERE conversation_id = ?",
            (conversation_id,),
        )
        return Summary(rows[0][0], int(rows[0][1]), rows[0][2]) if rows else None

    async def save_summary(self, conversation_id: int, text: str, upto_id: int) -> bool:
        # Conditional on the covered message still existing: a /reset while
        # the summary was being written must win.
        async with self._transaction() as db:
            cur = await db.execute(
                "INSERT INTO summaries (conversation_id, text, upto_id, updated_at)"
                " SELECT ?, ?, ?, ? WHERE EXISTS"
                " (SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?)"
                " ON CONFLICT (conversation_id) DO UPDATE SET text = excluded.text,"
                " upto_id = excluded.upto_id, updated_at = excluded.updated_at",
                (conversation_id, text, upto_id, utcnow(), upto_id, conversation_id),
            )
            return (cur.rowcount or 0) > 0

    # -- per-user settings
    async def user_model(self, platform: str, user_id: str) -> str | None:
        rows = await self._fetchall(
            "SELECT model FROM user_settings WHERE platform = ? AND user_id = ?",
            (platform, user_id),
        )
        return rows[0][0] if rows else None

    async def set_user_model(self, platform: str, user_id: str, model: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO user_settings (platform, user_id, model, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (platform, user_id)"
                " DO UPDATE SET model = excluded.model, updated_at = excluded.updated_at",
                (platform, user_id, model, utcnow()),
            )

    # -- operators
    async def audit_log(self, limit: int, user: str | None = None) -> list[dict[str, Any]]:
        cols = ", ".join(AUDIT_COLUMNS)
        if user:
            platform, _, user_id = user.partition(":")
            rows = await self._fetchall(
                f"SELECT id, {cols} FROM audit WHERE platform = ? AND user_id = ?"
                " ORDER BY id DESC LIMIT ?",
                (platform, user_id, limit),
            )
        else:
            rows = await self._fetchall(
                f"SELECT id, {cols} FROM audit ORDER BY id DESC LIMIT ?", (limit,)
            )
        return [_audit_dict(r) for r in reversed(rows)]

    async def audit_rows_for_stats(self) -> list[dict[str, Any]]:
        rows = await self._fetchall(
            "SELECT provider, model, status, response_time, first_token_time, prompt_tokens,"
            " completion_tokens FROM audit WHERE kind = 'chat' AND status != 'rejected'"
        )
        return [dict(r) for r in rows]

    async def audit_query(self, f: aq.AuditFilter, limit: int) -> list[dict[str, Any]]:
        rows = await self._fetchall(*_args(aq.audit_log("sqlite", f, limit)))
        return [_audit_dict(r) for r in reversed(rows)]

    async def audit_after(self, f: aq.AuditFilter, after_id: int,
                          limit: int) -> list[dict[str, Any]]:
        rows = await self._fetchall(*_args(aq.audit_after("sqlite", f, after_id, limit)))
        return [_audit_dict(r) for r in rows]

    async def last_audit_id(self) -> int:
        rows = await self._fetchall(*_args(aq.last_audit_id("sqlite")))
        return int(rows[0][0])

    async def delete_audit_before(self, cutoff: str, batch: int) -> int:
        async with self._transaction() as db:
            cur = await db.execute(*_args(aq.delete_older_than("sqlite", cutoff, batch)))
            return int(cur.rowcount or 0)

    async def audit_span(self) -> tuple[str | None, int]:
        rows = await self._fetchall(*_args(aq.oldest_timestamp("sqlite")))
        return rows[0][0], int(rows[0][1])

    async def audit_stats(self, since: str | None = None
                          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        groups = await self._fetchall(*_args(aq.stats("sqlite", since)))
        histogram = await self._fetchall(*_args(aq.stats_histogram("sqlite", since)))
        return [dict(r) for r in groups], [dict(r) for r in histogram]

    async def forget_user(self, platform: str, user_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        async with self._transaction() as db:
            where = "conversation_id IN (SELECT id FROM conversations WHERE platform = ?" \
                    " AND user_id = ?)"
            for table in ("messages", "summaries"):
                cur = await db.execute(f"DELETE FROM {table} WHERE {where}", (platform, user_id))
                counts[table] = int(cur.rowcount or 0)
            for table in ("conversations", "user_settings", "audit"):
                cur = await db.execute(
                    f"DELETE FROM {table} WHERE platform = ? AND user_id = ?", (platform, user_id)
                )
                counts[table] = int(cur.rowcount or 0)
        self._conv_ids.clear()
        return counts

    @contextlib.asynccontextmanager
    async def conversation_lock(self, key: str, wait: float) -> AsyncIterator[None]:
        # One process owns a SQLite file; the service's own per-conversation
        # ordering is the lock.
        yield

    # -- copy-db
    async def table_counts(self) -> dict[str, int]:
        out = {}
        for table in TABLES:
            rows = await self._fetchall(f"SELECT count(*) FROM {table}")
            out[table] = int(rows[0][0])
        return out

    async def export_rows(
        self, table: str, batch: int = 1000
    ) -> AsyncIterator[list[dict[str, Any]]]:
        if table not in TABLES:
            raise StorageError(f"unknown table {table}")
        order = "rowid"
        last = 0
        while True:
            rows = await self._fetchall(
                f"SELECT rowid AS _rowid, * FROM {table} WHERE rowid > ? ORDER BY {order}"
                " LIMIT ?",
                (last, batch),
            )
            if not rows:
                return
            last = rows[-1]["_rowid"]
            out = []
            for r in rows:
                d = dict(r)
                d.pop("_rowid")
                out.append(d)
            yield out

    async def import_rows(self, table: str, rows: list[dict[str, Any]]) -> None:
        if table not in TABLES:
            raise StorageError(f"unknown table {table}")
        if not rows:
            return
        cols = list(rows[0])
        sql = (f"INSERT INTO {table} ({', '.join(cols)}) "
               f"VALUES ({', '.join('?' * len(cols))})")
        async with self._transaction() as db:
            await db.executemany(sql, [tuple(_to_sqlite(r[c]) for c in cols) for r in rows])

    async def finish_import(self) -> None:
        """SQLite's INTEGER PRIMARY KEY continues after the largest id by itself."""


def _read_only_uri(path: str) -> str:
    """file: URI opening an existing database read-only (runs in a thread)."""
    p = Path(path)
    if not p.is_file():
        raise StorageError(f"no database at {path!r}")
    return p.resolve().as_uri() + "?mode=ro"


def _args(query: tuple[str, list[Any]]) -> tuple[str, tuple[Any, ...]]:
    return query[0], tuple(query[1])


def _to_sqlite(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value


def _audit_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["summary_used"] = bool(d.get("summary_used"))
    return d


def _statements(sql: str) -> list[str]:
    """Split a migration into statements (they hold no semicolons in strings)."""
    out = []
    for part in sql.split(";"):
        lines = [ln for ln in part.splitlines() if not ln.strip().startswith("--")]
        stmt = "\n".join(lines).strip()
        if stmt:
            out.append(stmt)
    return out
