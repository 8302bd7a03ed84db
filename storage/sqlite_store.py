"""SQLite backend on aiosqlite: one connection, WAL, writes serialised.

Every write of a user's data checks, inside its write transaction, that the
user was not forgotten since the turn read it (`erasures`): `forget` takes
the same write lock, so the check and the write are one step whichever
process forgets. The file the bot opened is watched (device and inode, at
most once a second): deleted or replaced, the store stops taking turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from bot.records import (
    AuditRecord,
    ConversationRef,
    StorageError,
    StoreUnavailable,
    utcnow,
    utcnow_precise,
)
from bot.store import TABLES
from storage import queries, recall_index
from storage.dialect import SQLITE
from storage.migrations import MIGRATIONS, MIGRATIONS_TABLE, Migration
from storage.queries import AUDIT_ROW, MESSAGE_ROW, SQLITE_QUERIES
from storage.sql_store import SQLStore

log = logging.getLogger(__name__)

MAX_BATCH = 200  # exchanges per commit: 200 × 29 parameters, far below SQLite's 32,766
Synchronous = Literal["NORMAL", "FULL"]


@dataclass(slots=True)
class _PendingExchange:
    conversation_id: int
    user_text: str
    reply_text: str
    audit: AuditRecord
    done: asyncio.Future[int]


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None if there is none (runs in a thread)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _ref_of(audit: AuditRecord) -> ConversationRef:
    """The conversation an exchange belongs to, from its audit record (key = user@place)."""
    place = audit.conversation.rpartition("@")[2] if "@" in audit.conversation else "dm"
    return ConversationRef(audit.conversation, audit.platform, audit.user_id, place)


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


async def migrate(db: aiosqlite.Connection, steps: Sequence[Migration] = MIGRATIONS,
                  progress: Callable[[int, int], None] | None = None) -> None:
    """Apply the steps not yet recorded, each in its own transaction; `progress` is
    told (steps done, steps in all) after each."""
    q = SQLITE_QUERIES
    async with db.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as c:
        tables = {r[0] for r in await c.fetchall()}
    if tables and "_migrations" not in tables:
        # Someone else's database (or a file put in place of ours): never alter it.
        raise StorageError(
            f"it is not a memorybot database (it has tables {', '.join(sorted(tables)[:5])} "
            "but no _migrations); refusing to change it")
    await db.execute(MIGRATIONS_TABLE)
    # A table rebuild needs foreign keys off (it can't change inside a
    # transaction); they are checked, then turned back on, afterwards.
    await db.execute("PRAGMA foreign_keys = OFF")
    for step, (name, statements) in enumerate(steps, 1):
        # BEGIN IMMEDIATE takes the write lock first, so two processes
        # starting at once apply each step exactly once.
        await db.execute("BEGIN IMMEDIATE")
        try:
            async with db.execute(q.migration_done, (name,)) as c:
                done = await c.fetchone()
            if not done:
                for statement in statements(SQLITE):
                    await db.execute(statement)
                await db.execute(q.insert_migration, (name, utcnow()))
                log.info("database migration %s applied", name)
                # Only after a step that ran: the check reads every row (seconds with a
                # million messages), and start-up must not grow with the history.
                async with db.execute("PRAGMA foreign_key_check") as c:
                    broken = await c.fetchall()
                if broken:
                    raise StorageError(f"migration {name} broke {len(broken)} references")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        if progress is not None:
            progress(step, len(steps))
    await db.execute("PRAGMA foreign_keys = ON")


class SQLiteStore(SQLStore):
    """Memory and audit log in one SQLite file."""

    dialect = SQLITE
    q = SQLITE_QUERIES

    def __init__(self, path: str, *, busy_timeout: float = 5.0,
                 synchronous: Synchronous = "NORMAL", read_only: bool = False,
                 file_check_every: float = 1.0) -> None:
        self.path = path
        # Read-only (logs, stats): opened with mode=ro, no migrations, no writes.
        self.read_only = read_only
        # Seconds between checks that the path is still the file we opened.
        self.file_check_every = file_check_every
        self._file: tuple[int, int] | None = None
        self._next_file_check = 0.0
        self._lost: str | None = None  # why the store stopped taking turns
        # Seconds a statement waits for another connection's write lock.
        self.busy_timeout = busy_timeout
        # NORMAL in WAL survives a process kill, not a power cut; FULL both.
        if synchronous not in ("NORMAL", "FULL"):
            raise StorageError(f"SQLITE_SYNCHRONOUS must be NORMAL or FULL, not {synchronous!r}")
        self.synchronous = synchronous
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
            await self._db.execute(f"PRAGMA synchronous = {self.synchronous}")
            # One user's rows spread over many pages in a big file: a larger
            # cache and memory-mapped reads keep history loads flat as it grows.
            await self._db.execute("PRAGMA cache_size = -32768")
            await self._db.execute("PRAGMA mmap_size = 268435456")
            await migrate(self._db, progress=self.on_migration)
            if self.path != ":memory:":
                self._file = await asyncio.to_thread(_identity, self.path)
        except (OSError, sqlite3.Error, StorageError) as exc:
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

    async def check_file(self) -> None:
        """Raise StoreUnavailable once the path no longer names the file we opened.

        Writes would go to a deleted file (lost at exit) or another database
        would be used unannounced: neither may happen silently. Logged once.
        """
        if self._lost is not None:
            raise StoreUnavailable(self._lost)
        if self._file is None:
            return
        now = asyncio.get_running_loop().time()
        if now < self._next_file_check:
            return
        self._next_file_check = now + self.file_check_every
        found = await asyncio.to_thread(_identity, self.path)
        if found == self._file:
            return
        what = "deleted" if found is None else "replaced by another file"
        self._lost = (f"database file {self.path} was {what} while the bot ran; "
                      "not taking turns (restart the bot to use what is there now)")
        log.error("%s", self._lost)
        raise StoreUnavailable(self._lost)

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

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            yield self.db

    def _writing(self) -> contextlib.AbstractAsyncContextManager[aiosqlite.Connection]:
        return self._transaction()

    async def _fetch(self, sql: str, *args: Any) -> Sequence[Any]:
        # One trip to aiosqlite's thread instead of execute + fetchall + close.
        async with self._lock:
            return await self.db.execute_fetchall(sql, args)

    async def _write(self, sql: str, *args: Any) -> Sequence[Any]:
        async with self._transaction() as db:
            return await db.execute_fetchall(sql, args)

    # -- conversations and messages
    async def conversation_id(self, ref: ConversationRef) -> int:
        # Cached: ids are never reused (migration 004), so a stale entry left
        # by `forget` in another process can only fail the foreign key on the
        # next save, which then resolves the conversation again (_insert_exchanges).
        cached = self._conv_ids.get(ref.key)
        if cached is not None:
            return cached
        rows = await self._fetch(self.q.conversation_by_key, ref.key)
        if not rows:
            # The one writer: nobody can insert it between the two statements.
            async with self._transaction() as db:
                rows = await db.execute_fetchall(
                    self.q.conversation_insert,
                    (ref.key, ref.platform, ref.user_id, ref.place, utcnow()))
                if not rows:
                    rows = await db.execute_fetchall(self.q.conversation_by_key, (ref.key,))
        return self._remember(ref.key, int(rows[0][0]))

    def _remember(self, key: str, conversation_id: int) -> int:
        if len(self._conv_ids) >= 50_000:  # a cache, not a registry of every user
            self._conv_ids.clear()
        self._conv_ids[key] = conversation_id
        return conversation_id

    async def save_exchange(
        self, conversation_id: int, user_text: str, reply_text: str, audit: AuditRecord
    ) -> int:
        await self.check_file()
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
            except sqlite3.OperationalError as exc:
                # The write lock (another process) or the file itself: each
                # exchange alone would wait the busy timeout again. The batch
                # waited once; it fails together, and so do the exchanges that
                # queued behind it meanwhile (they would only wait once more).
                batch, self._pending = batch + self._pending, []
                _fail(batch, exc)
                continue
            except Exception:
                # One bad exchange must not fail the others: write them alone.
                for i, item in enumerate(batch):
                    try:
                        (audit_id,) = await self._insert_exchanges([item])
                    except sqlite3.OperationalError as exc:
                        _fail(batch[i:], exc)  # bounded: no second wait per exchange
                        break
                    except Exception as exc:
                        _fail([item], exc)
                    else:
                        _succeed([item], [audit_id])
                continue
            _succeed(batch, ids)

    async def _insert_exchanges(self, batch: list[_PendingExchange]) -> list[int]:
        """Write the batch in one transaction; 0 for an exchange of a user
        forgotten since its turn began (nothing of it is written)."""
        async with self._transaction() as db:
            # Inside the write lock: a `forget` is wholly before or after this.
            recent = await db.execute_fetchall(self.q.erasures_since,
                                               (min(e.audit.since for e in batch),))
            live = [e for e in batch if not queries.erased(
                recent, e.audit.platform, e.audit.user_id, e.audit.since)]
            ids: dict[int, int] = {}
            if live:
                try:
                    last = await self._insert_rows(db, live)
                except sqlite3.IntegrityError:
                    # A conversation erased by another process before these
                    # turns began (a stale cached id): resolve it and retry once.
                    await self._resolve_conversations(db, live)
                    last = await self._insert_rows(db, live)
                # Rows inserted by one statement take consecutive rowids.
                ids = {id(e): n for e, n in zip(live, range(last - len(live) + 1, last + 1),
                                                strict=True)}
        return [ids.get(id(e), 0) for e in batch]

    async def _insert_rows(self, db: aiosqlite.Connection, batch: list[_PendingExchange]) -> int:
        # Two statements whatever the batch size: one multi-row insert per table.
        messages: list[Any] = []
        audits: list[Any] = []
        for e in batch:
            messages += (e.conversation_id, "user", e.user_text, e.audit.timestamp,
                         e.conversation_id, "assistant", e.reply_text, e.audit.timestamp)
            audits += e.audit.values()
        cur = await db.execute(
            self.q.message_insert_head + ", ".join([MESSAGE_ROW] * (2 * len(batch))), messages)
        # Rows inserted by one statement take consecutive ids: index them in the
        # same transaction, so a stored message is always findable by recall.
        first = int(cur.lastrowid or 0) - 2 * len(batch) + 1
        await recall_index.index_messages(db, [
            (first + n, e.conversation_id, text) for n, (e, text) in enumerate(
                (e, t) for e in batch for t in (e.user_text, e.reply_text))])
        cur = await db.execute(
            self.q.audit_insert_head + ", ".join([AUDIT_ROW] * len(batch)), audits)
        return int(cur.lastrowid or 0)

    async def _resolve_conversations(
        self, db: aiosqlite.Connection, batch: list[_PendingExchange]
    ) -> None:
        """Point each exchange at its conversation as it is now (created if gone)."""
        wanted = sorted({e.conversation_id for e in batch})
        rows = await db.execute_fetchall(
            f"SELECT id FROM conversations WHERE id IN ({', '.join('?' * len(wanted))})",
            wanted)
        existing = {int(r[0]) for r in rows}
        for e in batch:
            if e.conversation_id in existing:
                continue
            ref = _ref_of(e.audit)
            found = await db.execute_fetchall(
                self.q.conversation_insert,
                (ref.key, ref.platform, ref.user_id, ref.place, utcnow()))
            if not found:
                found = await db.execute_fetchall(self.q.conversation_by_key, (ref.key,))
            e.conversation_id = self._remember(ref.key, int(found[0][0]))
            existing.add(e.conversation_id)

    async def save_audit(self, audit: AuditRecord) -> int:
        """The record, unless its user was forgotten since `audit.since` (then 0)."""
        async with self._transaction() as db:
            recent = await db.execute_fetchall(self.q.erasures_since, (audit.since,))
            if queries.erased(recent, audit.platform, audit.user_id, audit.since):
                return 0
            rows = await db.execute_fetchall(self.q.audit_insert, audit.values())
        return int(rows[0][0])

    async def reset_conversation(self, conversation_id: int) -> int:
        async with self._transaction() as db:
            # The words index has no foreign key (FTS5): its rows go first, by hand.
            await recall_index.delete_conversation(db, conversation_id)
            cur = await db.execute(self.q.delete_messages, (conversation_id,))
            await db.execute(self.q.delete_summary, (conversation_id,))
            await db.execute(self.q.delete_notes, (conversation_id,))
            return int(cur.rowcount or 0)

    # -- summaries
    async def save_summary(self, conversation_id: int, text: str, upto_id: int) -> bool:
        # The single writer serialises this with a /reset: whichever is first.
        async with self._transaction() as db:
            cur = await db.execute(
                self.q.save_summary,
                (conversation_id, text, upto_id, utcnow(), upto_id, conversation_id))
            return (cur.rowcount or 0) > 0

    # -- operators
    async def forget_user(self, platform: str, user_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        async with self._transaction() as db:
            for table, sql in queries.forget(self.dialect):
                cur = await db.execute(sql, (platform, user_id))
                if table in TABLES:  # the index is not a table of its own to report
                    counts[table] = int(cur.rowcount or 0)
            # In the same transaction: whatever read this user's data before
            # now writes nothing of it later (see _insert_exchanges, save_audit).
            await db.execute(self.q.prune_erasures, (queries.erasure_horizon(),))
            await db.execute(self.q.record_erasure,
                             (platform, queries.erasure_id(platform, user_id), utcnow_precise()))
        self._conv_ids.clear()
        return counts

    @contextlib.asynccontextmanager
    async def conversation_lock(self, key: str, wait: float) -> AsyncIterator[None]:
        # One process owns a SQLite file; the service's own per-conversation
        # ordering is the lock. A turn starts only on the file we opened.
        await self.check_file()
        yield

    # -- copy-db
    async def import_rows(self, table: str, rows: list[dict[str, Any]]) -> None:
        cols = queries.import_columns(table, rows)
        if not rows:
            return
        sql = (f"INSERT INTO {table} ({', '.join(map(queries.quoted, cols))}) "
               f"VALUES ({', '.join('?' * len(cols))})")
        async with self._transaction() as db:
            await db.executemany(sql, [tuple(_to_sqlite(r[c]) for c in cols) for r in rows])

    async def finish_import(self) -> None:
        """SQLite's AUTOINCREMENT continues after the largest id by itself."""


def _read_only_uri(path: str) -> str:
    """file: URI opening an existing database read-only (runs in a thread)."""
    p = Path(path)
    if not p.is_file():
        raise StorageError(f"no database at {path!r}")
    return p.resolve().as_uri() + "?mode=ro"


def _fail(batch: list[_PendingExchange], exc: BaseException) -> None:
    for item in batch:
        if not item.done.done():
            item.done.set_exception(exc)


def _succeed(batch: list[_PendingExchange], ids: list[int]) -> None:
    for item, audit_id in zip(batch, ids, strict=True):
        if not item.done.done():
            item.done.set_result(audit_id)


def _to_sqlite(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value
