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
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite

from bot.recall.fitting import Around
from bot.recaller import FUSED_HITS
from bot.records import (
    AuditRecord,
    ConversationRef,
    StorageError,
    StoredMessage,
    StoreUnavailable,
    utcnow,
    utcnow_precise,
)
from bot.store import TABLES, TurnReads
from storage import queries, recall_index
from storage.dialect import SQLITE
from storage.history_cache import HistoryCache
from storage.migrations import MIGRATIONS, MIGRATIONS_TABLE, Migration
from storage.queries import AUDIT_ROW, MESSAGE_ROW, SQLITE_QUERIES
from storage.sql_store import SQLStore
from storage.sqlite_checkpoint import Checkpointer
from storage.sqlite_hop import in_one_hop, transaction

log = logging.getLogger(__name__)

MAX_BATCH = 200  # exchanges per commit: 200 × 29 parameters, far below SQLite's 32,766
Synchronous = Literal["NORMAL", "FULL"]
T = TypeVar("T")
AROUND_PREFETCH = FUSED_HITS  # words hits whose neighbours are read with the search
AROUNDS_KEPT = 256  # searches whose neighbours wait for recall_around (turns in flight)
# The rows of a turn's window not cached yet (storage/history_cache.py), by id.
_MESSAGES_BY_ID = ("SELECT id, role, content FROM messages"
                   " WHERE id IN (SELECT value FROM json_each(?))")


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


class _FileChanged(Exception):
    """The database's path no longer names the file the store opened (raised on its
    thread; the store turns it into StoreUnavailable, logged once)."""

    def __init__(self, found: tuple[int, int] | None) -> None:
        super().__init__(found)
        self.found = found


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
        # Messages of recent turns by id: a turn reads only the rows it hasn't seen.
        self._history = HistoryCache()
        # The neighbours of a recall search's best hits, by (conversation, before_id):
        # (the hits looked at, their Arounds by hit id), until recall_around asks.
        self._arounds: dict[tuple[int, int], tuple[frozenset[int], dict[int, Around]]] = {}
        self._pending: list[_PendingExchange] = []
        self._writer: asyncio.Task[None] | None = None
        self._checkpointer: Checkpointer | None = None
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
                # Checkpoints beside the turns, not in their commits (sqlite_checkpoint).
                await self._db.execute("PRAGMA wal_autocheckpoint = 0")
                self._checkpointer = Checkpointer(self.path, self.synchronous)
                await self._checkpointer.open()
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
        if self._checkpointer is not None:
            await self._checkpointer.close()
            self._checkpointer = None
        if self._db is not None:
            db, self._db = self._db, None
            with contextlib.suppress(Exception):
                await db.close()

    async def check_file(self) -> None:
        """Raise StoreUnavailable once the path no longer names the file we opened.

        Writes would go to a deleted file (lost at exit) or another database
        would be used unannounced: neither may happen silently. Logged once.
        A turn's reads and every write transaction check it themselves, on
        the database's thread (a stat in the same hand-off); this is for the
        rest, at most once every `file_check_every` seconds.
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
        if found != self._file:
            raise self._file_lost(found)

    def _file_lost(self, found: tuple[int, int] | None) -> StoreUnavailable:
        if self._lost is None:
            what = "deleted" if found is None else "replaced by another file"
            self._lost = (f"database file {self.path} was {what} while the bot ran; "
                          "not taking turns (restart the bot to use what is there now)")
            log.error("%s", self._lost)
        return StoreUnavailable(self._lost)

    def _on_file(self) -> None:
        """On the database's thread: raise _FileChanged unless the path is still our file."""
        if self._file is not None:
            found = _identity(self.path)
            if found != self._file:
                raise _FileChanged(found)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        # A transaction of several hand-offs: no other statement may come between.
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")
        self._wrote()

    def _wrote(self) -> None:
        if self._checkpointer is not None and self._lost is None:
            self._checkpointer.wrote()

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            yield self.db

    def _writing(self) -> contextlib.AbstractAsyncContextManager[aiosqlite.Connection]:
        return self._transaction()

    async def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`fn(conn, *args)` in one hand-off to the connection's thread (sqlite_hop).

        It can't interleave with anything else, so it needs no lock, only to
        wait for a transaction of several hand-offs (`_transaction`) to end.
        """
        try:
            if self._lock.locked():
                async with self._lock:
                    return await in_one_hop(self.db, fn, *args)
            return await in_one_hop(self.db, fn, *args)
        except _FileChanged as exc:
            raise self._file_lost(exc.found) from None

    async def _run_in_transaction(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`fn(conn, *args)` inside BEGIN IMMEDIATE … COMMIT, all in one hand-off, on
        the file the store opened (StoreUnavailable, nothing written, if not)."""
        if self._lost is not None:
            raise StoreUnavailable(self._lost)
        result = await self._run(self._transaction_on_file, fn, *args)
        self._wrote()
        return result

    async def _transaction_on_file(self, conn: aiosqlite.Connection,
                                   fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        self._on_file()
        return await transaction(conn, fn, *args)

    async def _fetch(self, sql: str, *args: Any) -> Sequence[Any]:
        # One trip to aiosqlite's thread instead of execute + fetchall + close.
        if self._lock.locked():
            async with self._lock:
                return await self.db.execute_fetchall(sql, args)
        return await self.db.execute_fetchall(sql, args)

    async def _write(self, sql: str, *args: Any) -> Sequence[Any]:
        return await self._run_in_transaction(_fetch_all, sql, args)

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
            rows = await self._run_in_transaction(self._create_conversation, ref)
        return self._remember(ref.key, int(rows[0][0]))

    async def _create_conversation(self, db: aiosqlite.Connection,
                                   ref: ConversationRef) -> Sequence[Any]:
        rows = await db.execute_fetchall(
            self.q.conversation_insert, (ref.key, ref.platform, ref.user_id, ref.place, utcnow()))
        if not rows:  # another process inserted it since our look-up
            rows = await db.execute_fetchall(self.q.conversation_by_key, (ref.key,))
        return rows

    def _remember(self, key: str, conversation_id: int) -> int:
        if len(self._conv_ids) >= 50_000:  # a cache, not a registry of every user
            self._conv_ids.clear()
        self._conv_ids[key] = conversation_id
        return conversation_id

    async def turn_reads(
        self, conversation_id: int, ref: ConversationRef, place_id: str | None, limit: int,
        *, with_summary: bool, with_personas: bool,
    ) -> TurnReads:
        # One hand-off for the turn's reads; of the history only the ids come from
        # the table's index, and the rows not cached from the table itself.
        reads, all_known = await self._run(self._turn_reads, conversation_id, ref, place_id,
                                           limit, with_summary, with_personas,
                                           self._history.known(conversation_id))
        self._history.keep(conversation_id, reads.context.history, all_known=all_known)
        return reads

    async def _turn_reads(self, db: aiosqlite.Connection, conversation_id: int,
                          ref: ConversationRef, place_id: str | None, limit: int,
                          with_summary: bool, with_personas: bool,
                          known: Mapping[int, StoredMessage]) -> tuple[TurnReads, bool]:
        """The reads, and whether every message of the window was in `known`."""
        self._on_file()  # a turn starts only on the file we opened
        q = self.q
        rows = await db.execute_fetchall(q.turn_context_ids, (
            conversation_id, with_summary, conversation_id, limit, ref.platform, ref.user_id))
        ids = queries.window_ids(rows)
        missing = [i for i in ids if i not in known]
        if missing:
            fetched = {m.id: m for m in queries.messages(await db.execute_fetchall(
                _MESSAGES_BY_ID, (json.dumps(missing),)))}
            # A row deleted since the ids were read (another process) is left out.
            history = [m for i in ids if (m := known.get(i) or fetched.get(i)) is not None]
        else:
            history = [known[i] for i in ids]
        context = queries.turn_context_by_ids(rows, history)
        notes = queries.notes(await db.execute_fetchall(q.notes, (conversation_id,)))
        personas = None
        if with_personas:
            rows = await db.execute_fetchall(q.personas_of, (ref.key, ref.platform,
                                                             place_id or ""))
            personas = (rows[0][0], rows[0][1]) if rows else (None, None)
        return TurnReads(context, notes, personas), not missing

    # -- the recall index: the best hits' neighbours come with the search
    async def recall_search(self, conversation_id: int, terms: list[str], before_id: int,
                            limit: int) -> list[tuple[int, float]]:
        # The turn asks for the best hits' neighbours next (bot.recaller): read
        # them in the same hand-off, kept until asked for.
        hits, looked, arounds = await self._run(_search_around, conversation_id, terms,
                                                before_id, limit, AROUND_PREFETCH)
        key = (conversation_id, before_id)
        self._arounds.pop(key, None)
        if looked:
            self._arounds[key] = (looked, {a.hit.id: a for a in arounds})
            while len(self._arounds) > AROUNDS_KEPT:
                self._arounds.pop(next(iter(self._arounds)))
        return hits

    async def recall_around(self, conversation_id: int, ids: list[int],
                            before_id: int) -> list[Around]:
        got = self._arounds.pop((conversation_id, before_id), None)
        kept = recall_index.prefetched(*got, ids) if got is not None else None
        if kept is not None:
            return kept
        return await super().recall_around(conversation_id, ids, before_id)

    async def save_exchange(
        self, conversation_id: int, user_text: str, reply_text: str, audit: AuditRecord
    ) -> int:
        if self._lost is not None:  # the write checks the file itself (_run_in_transaction)
            raise StoreUnavailable(self._lost)
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
            except (sqlite3.OperationalError, StoreUnavailable) as exc:
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
                    except (sqlite3.OperationalError, StoreUnavailable) as exc:
                        _fail(batch[i:], exc)  # bounded: no second wait per exchange
                        break
                    except Exception as exc:
                        _fail([item], exc)
                    else:
                        _succeed([item], [audit_id])
                continue
            _succeed(batch, ids)

    async def _insert_exchanges(self, batch: list[_PendingExchange]) -> list[int]:
        """Write the batch in one transaction (one hand-off); 0 for an exchange of a
        user forgotten since its turn began (nothing of it is written)."""
        written, resolved = await self._run_in_transaction(self._insert_live, batch)
        for key, conversation_id in resolved.items():
            self._remember(key, conversation_id)
        for e, (_, first) in zip(batch, written, strict=True):
            if first:  # the next turn of the conversation needs these two
                self._history.add(e.conversation_id, (
                    StoredMessage(first, "user", e.user_text),
                    StoredMessage(first + 1, "assistant", e.reply_text)))
        return [audit_id for audit_id, _ in written]

    async def _insert_live(self, db: aiosqlite.Connection, batch: list[_PendingExchange]
                           ) -> tuple[list[tuple[int, int]], dict[str, int]]:
        """(audit id, id of the first of its two messages) of each exchange, (0, 0)
        where nothing was written; and the conversations resolved anew."""
        # Inside the write lock: a `forget` is wholly before or after this.
        recent = await db.execute_fetchall(self.q.erasures_since,
                                           (min(e.audit.since for e in batch),))
        live = [e for e in batch if not queries.erased(
            recent, e.audit.platform, e.audit.user_id, e.audit.since)]
        ids: dict[int, tuple[int, int]] = {}
        resolved: dict[str, int] = {}
        if live:
            try:
                first, last = await self._insert_rows(db, live)
            except sqlite3.IntegrityError:
                # A conversation erased by another process before these
                # turns began (a stale cached id): resolve it and retry once.
                resolved = await self._resolve_conversations(db, live)
                first, last = await self._insert_rows(db, live)
            # Rows inserted by one statement take consecutive rowids.
            ids = {id(e): (last - len(live) + 1 + n, first + 2 * n)
                   for n, e in enumerate(live)}
        return [ids.get(id(e), (0, 0)) for e in batch], resolved

    async def _insert_rows(self, db: aiosqlite.Connection,
                           batch: list[_PendingExchange]) -> tuple[int, int]:
        """(the first message id, the last audit id) of the rows written."""
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
        return first, int(cur.lastrowid or 0)

    async def _resolve_conversations(
        self, db: aiosqlite.Connection, batch: list[_PendingExchange]
    ) -> dict[str, int]:
        """Point each exchange at its conversation as it is now (created if gone);
        the conversations resolved anew, by key (cached once back on the loop)."""
        wanted = sorted({e.conversation_id for e in batch})
        rows = await db.execute_fetchall(
            f"SELECT id FROM conversations WHERE id IN ({', '.join('?' * len(wanted))})",
            wanted)
        existing = {int(r[0]) for r in rows}
        resolved: dict[str, int] = {}
        for e in batch:
            if e.conversation_id in existing:
                continue
            ref = _ref_of(e.audit)
            found = await db.execute_fetchall(
                self.q.conversation_insert,
                (ref.key, ref.platform, ref.user_id, ref.place, utcnow()))
            if not found:
                found = await db.execute_fetchall(self.q.conversation_by_key, (ref.key,))
            e.conversation_id = resolved[ref.key] = int(found[0][0])
            existing.add(e.conversation_id)
        return resolved

    async def save_audit(self, audit: AuditRecord) -> int:
        """The record, unless its user was forgotten since `audit.since` (then 0)."""
        return await self._run_in_transaction(self._insert_audit, audit)

    async def _insert_audit(self, db: aiosqlite.Connection, audit: AuditRecord) -> int:
        recent = await db.execute_fetchall(self.q.erasures_since, (audit.since,))
        if queries.erased(recent, audit.platform, audit.user_id, audit.since):
            return 0
        rows = await db.execute_fetchall(self.q.audit_insert, audit.values())
        return int(rows[0][0])

    async def reset_conversation(self, conversation_id: int) -> int:
        removed = await self._run_in_transaction(self._reset, conversation_id)
        self._history.drop(conversation_id)
        self._arounds.clear()
        return removed

    async def _reset(self, db: aiosqlite.Connection, conversation_id: int) -> int:
        # The words index has no foreign key (FTS5): its rows go first, by hand.
        await recall_index.delete_conversation(db, conversation_id)
        cur = await db.execute(self.q.delete_messages, (conversation_id,))
        await db.execute(self.q.delete_summary, (conversation_id,))
        await db.execute(self.q.delete_notes, (conversation_id,))
        return int(cur.rowcount or 0)

    # -- summaries
    async def save_summary(self, conversation_id: int, text: str, upto_id: int) -> bool:
        # The single writer serialises this with a /reset: whichever is first.
        rows = await self._run_in_transaction(_rowcount, self.q.save_summary, (
            conversation_id, text, upto_id, utcnow(), upto_id, conversation_id))
        return rows > 0

    # -- operators
    async def forget_user(self, platform: str, user_id: str) -> dict[str, int]:
        counts = await self._run_in_transaction(self._forget, platform, user_id)
        self._conv_ids.clear()
        self._history.clear()  # nothing of theirs stays in memory either
        self._arounds.clear()
        return counts

    async def _forget(self, db: aiosqlite.Connection, platform: str,
                      user_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for table, sql in queries.forget(self.dialect):
            cur = await db.execute(sql, (platform, user_id))
            if table in TABLES:  # the index is not a table of its own to report
                counts[table] = int(cur.rowcount or 0)
        # In the same transaction: whatever read this user's data before
        # now writes nothing of it later (see _insert_exchanges, save_audit).
        await db.execute(self.q.prune_erasures, (queries.erasure_horizon(),))
        await db.execute(self.q.record_erasure,
                         (platform, queries.erasure_id(platform, user_id), utcnow_precise()))
        return counts

    @contextlib.asynccontextmanager
    async def conversation_lock(self, key: str, wait: float) -> AsyncIterator[None]:
        # One process owns a SQLite file; the service's own per-conversation
        # ordering is the lock. A turn starts only on the file we opened: its
        # reads check (turn_reads), without a hand-off of their own.
        if self._lost is not None:
            raise StoreUnavailable(self._lost)
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


async def _search_around(db: aiosqlite.Connection, conversation_id: int, terms: list[str],
                         before_id: int, limit: int, best: int
                         ) -> tuple[list[tuple[int, float]], frozenset[int], list[Around]]:
    """recall_index.search, and recall_index.around of its `best` first hits."""
    hits = await recall_index.search(db, conversation_id, terms, before_id, limit)
    top = [i for i, _ in hits[:best]]
    arounds = await recall_index.around(db, conversation_id, top, before_id) if top else []
    return hits, frozenset(top), arounds


async def _fetch_all(db: aiosqlite.Connection, sql: str,
                     args: Sequence[Any]) -> Sequence[Any]:
    return await db.execute_fetchall(sql, args)


async def _rowcount(db: aiosqlite.Connection, sql: str, args: Sequence[Any]) -> int:
    return int((await db.execute(sql, args)).rowcount or 0)


def _to_sqlite(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value
