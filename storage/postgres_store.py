"""PostgreSQL backend on asyncpg: one database shared by several bot processes.

Behaviour and return shapes match `SQLiteStore`; timestamps are the same ISO
strings stored as TEXT, so copy-db round-trips exactly. What SQLite gets from
being the only process, PostgreSQL gets from locks:

* `conversation_lock` holds a session advisory lock on the conversation key
  across load → model → persist, so the turns of one conversation run one at
  a time, in order, whichever process received them.
* `rate_hit` keeps the moving window in the `rate_events` table, serialised
  per user by a transaction advisory lock, so the limit holds across processes.
* Writes that must not interleave with a /reset or a forget (a summary being
  saved) lock the conversation row first.
* `forget` holds a transaction advisory lock on the user ("erase:…") and notes
  the erasure in `erasures`; every write of a user's data takes that lock
  shared, then checks for an erasure since its turn began: a turn or summary
  in flight in any process writes nothing of a forgotten user afterwards.
* A summary pass holds a session advisory lock on "summary:<conversation>"
  (try-lock: another process already at it is left to it), and a summary is
  never replaced by one covering less.

Pool sizing. Every turn in flight holds one pooled connection for its
conversation lock, for up to LLM_TIMEOUT + LLM_STALL_TIMEOUT seconds (turns
wait for a model slot while holding it); store calls borrow another connection
for milliseconds. So at most `pool_size - 1` connections may hold locks, and at
least one is always left for store calls: a lock holder's own calls can never
starve, so the pool cannot deadlock. Turns beyond that wait (up to their
`wait`) for a lock slot. Hence DB_POOL_SIZE must be at least 2 and should
exceed LLM_CONCURRENCY by a few (LLM_CONCURRENCY + 2 is a good floor), and
processes × DB_POOL_SIZE must stay below the server's max_connections. Session
locks need a session: connect directly or through a pooler in session mode
(not PgBouncer transaction mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg

from bot.recall.fitting import Around
from bot.recaller import FUSED_HITS
from bot.records import (
    AUDIT_COLUMNS,
    AuditRecord,
    ConversationRef,
    Note,
    StorageError,
    TurnContext,
    utcnow,
    utcnow_precise,
)
from bot.store import redact_url
from storage import queries, recall_index
from storage.dialect import POSTGRES
from storage.migrations import MIGRATIONS, MIGRATIONS_TABLE, Migration
from storage.queries import COLUMNS, POSTGRES_QUERIES, SERIAL_TABLES
from storage.sql_store import SQLStore

T = TypeVar("T")

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds to reach the server at open
COMMAND_TIMEOUT = 60.0  # default bound on one statement (the lock wait sets its own)
MIGRATION_TIMEOUT = 7 * 86400.0  # a step takes what the history needs (asyncpg needs a bound)
CLOSE_TIMEOUT = 10.0  # seconds close() waits for borrowed connections
UNLOCK_TIMEOUT = 5.0
RATE_HORIZON = 3600.0  # rate events older than this (and the window) are garbage
RATE_PRUNE_EVERY = 500  # hits between sweeps of every user's old rate events
# Any fixed 64-bit number will do; it only has to be the same in every process.
MIGRATION_LOCK = 0x6D656D6F72796231  # "memoryb1"
_LOCK_KEY = "hashtextextended($1, 0)"  # 64-bit advisory lock key of a text
AROUND_PREFETCH = FUSED_HITS  # words hits whose neighbours are read with the search


def _rowcount(status: str) -> int:
    """Rows affected, from a command tag such as 'DELETE 3' or 'INSERT 0 1'."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _secrets(url: str) -> list[str]:
    """The password as it may appear in an error message (raw and decoded)."""
    found: list[str] = []
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        if ":" in userinfo:
            found.append(userinfo.partition(":")[2])
        found += re.findall(r"(?i)(?:^|&)password=([^&]*)", parts.query)
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def _describe(exc: BaseException, url: str) -> str:
    """One line naming the error, with no password in it."""
    text = " ".join(str(exc).split()) or "no detail"
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return f"{type(exc).__name__}: {text}"


def _import_value(kind: type, value: Any) -> Any:
    """SQLite's value as the column wants it; anything odd is left for asyncpg to refuse."""
    if kind is bool and value in (0, 1):
        return bool(value)  # SQLite stores summary_used as 0/1
    if kind is float and type(value) is int:
        return float(value)  # SQLite may hand back an integral REAL as int
    return value


def _erase_key(platform: str, user_id: str) -> str:
    return f"erase:{platform}:{user_id}"


class _Connection(asyncpg.Connection):
    """A pooled connection that is not reset on release.

    The default reset (pg_advisory_unlock_all, CLOSE ALL, UNLISTEN *, RESET ALL) is
    a round trip per release, a third of an exchange's. The store leaves no session
    state behind: the lock connection unlocks and restores lock_timeout in the
    unlock statement itself, and is ended if that fails. An open transaction is
    still rolled back on release (asyncpg always does that).
    """

    def get_reset_query(self) -> str:
        return ""


@dataclasses.dataclass
class _Turn:
    """The connection holding one conversation's lock, lent to that turn's own calls."""

    conn: asyncpg.Connection
    key: str
    conversation_id: int | None  # read with the lock; None: not created yet
    busy: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    # The session lock: "held", "released" (by the exchange's save, which keeps it
    # as a transaction lock until its commit) or "unknown" (a save that failed).
    lock: str = "held"
    notes: tuple[int, list[Note]] | None = None  # (conversation, its notes) read with context
    # Neighbours of the best words hits, read with the search: (hit ids, arounds).
    # (conversation, before_id, the hits looked at, their arounds by hit id)
    around: tuple[int, int, frozenset[int], dict[int, Around]] | None = None


_PG_TYPE = {str: "TEXT", int: "BIGINT", float: "DOUBLE PRECISION", bool: "BOOLEAN"}
# An exchange's writes in one statement and one round trip: memorybot_save_guard
# (storage/migrations.py) checks for an erasure, finds the conversation (anew if
# it was erased before the turn began) and, given the lock key, ends the session
# lock (held on as a transaction lock until commit); the two messages, their words
# and the audit row follow, each written only if the guard said so. Arguments: the
# guard's ten, user text, reply text, their tsvectors, then the audit row.
_SAVE_EXCHANGE = POSTGRES.sql(
    "WITH g AS (SELECT conv, unlocked FROM memorybot_save_guard("
    "?, ?, ?, ?, ?, ?, ?, ?, ?, ?)), "
    "m AS (INSERT INTO messages (conversation_id, role, content, created_at) "
    "SELECT g.conv, r.role, r.content, $9 FROM g, (VALUES (1, 'user', CAST(? AS TEXT)), "
    "(2, 'assistant', CAST(? AS TEXT))) AS r(n, role, content) WHERE g.conv > 0 "
    "ORDER BY r.n RETURNING id, role, conversation_id), "
    "t AS (INSERT INTO recall_terms (message_id, conversation_id, terms) "
    "SELECT m.id, m.conversation_id, CASE m.role WHEN 'user' THEN CAST(? AS TSVECTOR) "
    "ELSE CAST(? AS TSVECTOR) END FROM m), "
    f"a AS (INSERT INTO audit ({', '.join(queries.quoted(c) for c in AUDIT_COLUMNS)}) "
    "SELECT " + ", ".join(f"CAST(? AS {_PG_TYPE[COLUMNS['audit'][c]]})" for c in AUDIT_COLUMNS)
    + " FROM g WHERE g.conv > 0 RETURNING id) "
    "SELECT (SELECT id FROM a), (SELECT unlocked FROM g)")
# The turn's context (queries.turn_context) and the conversation's notes, in one
# round trip; notes are kind 3 rows (id, created_at, text).
_TURN_CONTEXT_AND_NOTES = POSTGRES_QUERIES.turn_context + (
    " UNION ALL SELECT 3, id, created_at, text, NULL FROM notes WHERE conversation_id = $1")
# Unlock and restore the default lock_timeout in one round trip.
_UNLOCK = f"SELECT pg_advisory_unlock({_LOCK_KEY}), set_config('lock_timeout', '0', false)"
_UNLOCK_ALL = "SELECT pg_advisory_unlock_all(), set_config('lock_timeout', '0', false)"


async def _release_lock_connection(
    pool: asyncpg.Pool, conn: asyncpg.Connection, key: str, *, locked: bool
) -> None:
    """Unlock and give the connection back (to the pool it came from, even if closing).

    Never raises: the turn it ends may have stored its exchange already. A
    lock whose session ended early (the connection was killed or lost) is
    reported, once: for a while the conversation was not locked.
    """
    try:
        if locked:
            if conn.is_closed():
                _lock_lost(key, "its connection was closed")
            elif not await conn.fetchval(_UNLOCK, key, timeout=UNLOCK_TIMEOUT):
                _lock_lost(key, "the server no longer held it")
        elif not conn.is_closed():
            # Not locked: the server may still have granted it as we were cancelled.
            await conn.execute(_UNLOCK_ALL, timeout=UNLOCK_TIMEOUT)
    except asyncpg.InterfaceError:
        # The pool took the dead connection back already (the session ended).
        if locked:
            _lock_lost(key, "its connection was lost")
        with contextlib.suppress(Exception):
            conn.terminate()
    except Exception as exc:
        if locked:
            _lock_lost(key, f"{type(exc).__name__}: {exc}")
        # Ending the session is what surely frees a session lock.
        with contextlib.suppress(Exception):
            conn.terminate()
    finally:
        with contextlib.suppress(Exception):
            await pool.release(conn)


def _gone(conn: asyncpg.Connection) -> bool:
    """Whether the connection is closed (the pool takes a dead one back at once)."""
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True


def _lock_lost(key: str, why: str) -> None:
    log.warning("lock of %s was lost before its turn ended (%s); another process may have "
                "worked on it meanwhile", key, " ".join(why.split()))


async def migrate(conn: asyncpg.Connection, steps: Sequence[Migration] = MIGRATIONS,
                  progress: Callable[[int, int], None] | None = None) -> None:
    """Apply the steps not yet recorded, each in its own transaction; `progress` is
    told (steps done, steps in all) after each."""
    q = POSTGRES_QUERIES
    # The advisory lock makes a second process starting at once wait, then
    # find each step recorded (CREATE ... IF NOT EXISTS alone races in PG).
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(MIGRATIONS_TABLE)
    for step, (name, statements) in enumerate(steps, 1):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            if not await conn.fetchval(q.migration_done, name):
                for statement in statements(POSTGRES):
                    # A step may rewrite every row (backfills): no COMMAND_TIMEOUT.
                    await conn.execute(statement, timeout=MIGRATION_TIMEOUT)
                await conn.execute(q.insert_migration, name, utcnow())
        if progress is not None:
            progress(step, len(steps))


class PostgresStore(SQLStore):
    """Memory, audit log and cross-process coordination in one PostgreSQL database."""

    dialect = POSTGRES
    q = POSTGRES_QUERIES

    def __init__(self, url: str, *, pool_size: int = 10, read_only: bool = False) -> None:
        self.url = url
        self.pool_size = pool_size
        # Read-only (logs, stats): no migrations, and the server refuses writes.
        self.read_only = read_only
        self._pool: asyncpg.Pool | None = None
        # Connections that may hold conversation locks: one is always kept for
        # store calls, so a lock holder's own calls always get a connection.
        self._lock_slots = asyncio.Semaphore(max(1, pool_size - 1))
        self._hits_since_prune = 0
        # The task running a turn → its lock connection (see _conn).
        self._turns: dict[asyncio.Task[Any], _Turn] = {}

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("the store is not open")
        return self._pool

    async def open(self) -> None:
        if self._pool is not None:
            return
        where = redact_url(self.url)
        if self.pool_size < 2:
            raise StorageError(
                f"DB_POOL_SIZE is {self.pool_size}; PostgreSQL needs at least 2 (one connection "
                "per conversation lock in flight, plus one for queries); use LLM_CONCURRENCY + 2"
            )
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self.pool_size, timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT, connection_class=_Connection,
                # Keepalives: if this host dies, the server ends the session and frees
                # its conversation locks in about a minute and a half, not two hours.
                server_settings={"application_name": "memorybot",
                                 "tcp_keepalives_idle": "60",
                                 "tcp_keepalives_interval": "10",
                                 "tcp_keepalives_count": "3",
                                 **({"default_transaction_read_only": "on"}
                                    if self.read_only else {})},
            )
            async with self._pool.acquire() as conn:
                encoding = await conn.fetchval("SHOW server_encoding")
                if encoding not in ("UTF8", "SQL_ASCII"):
                    raise StorageError(
                        f"database {where} uses encoding {encoding}; the bot needs UTF8 to "
                        "keep any text (create it with ENCODING 'UTF8')"
                    )
                if self.read_only:
                    await conn.fetchval("SELECT count(*) FROM _migrations")
                else:
                    await migrate(conn, progress=self.on_migration)
                    await self._prune_rate_events(conn, RATE_HORIZON)
        except StorageError:
            await self.close()
            raise
        except Exception as exc:
            await self.close()
            raise StorageError(
                f"cannot use database {where}: {_describe(exc, self.url)}"
            ) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except BaseException as exc:
            # A turn still holds a connection (or we were cancelled): drop them
            # all; the server frees their locks when the sessions end.
            pool.terminate()
            if not isinstance(exc, Exception):
                raise

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        """The connection for one call: the turn's lock connection when the task
        holding a conversation lock calls (no pool round, and its reads see its
        own conversation), else one from the pool."""
        task = asyncio.current_task()
        turn = self._turns.get(task) if task is not None else None
        if turn is not None and not turn.busy.locked():
            async with turn.busy:
                yield turn.conn
            return
        async with self.pool.acquire() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._conn() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn

    async def _run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async with self._reading() as conn:
            return await fn(conn, *args)

    async def _run_in_transaction(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async with self._writing() as conn:
            return await fn(conn, *args)

    async def _fetch(self, sql: str, *args: Any) -> Sequence[Any]:
        async with self._conn() as conn:
            return await conn.fetch(sql, *args)

    async def _write(self, sql: str, *args: Any) -> Sequence[Any]:
        async with self._conn() as conn:
            return await conn.fetch(sql, *args)

    # -- conversations and messages
    async def conversation_id(self, ref: ConversationRef) -> int:
        # Not cached across turns: another process (or `memorybot forget`) may delete
        # it. The turn's lock statement read it already.
        task = asyncio.current_task()
        turn = self._turns.get(task) if task is not None else None
        if turn is not None and turn.key == ref.key and turn.conversation_id is not None:
            return turn.conversation_id
        async with self._conn() as conn:
            for _ in range(3):
                found = await conn.fetchval(self.q.conversation_by_key, ref.key)
                if found is not None:
                    return int(found)
                found = await conn.fetchval(
                    self.q.conversation_insert,
                    ref.key, ref.platform, ref.user_id, ref.place, utcnow(),
                )
                if found is not None:
                    return int(found)
                # Another process inserted it meanwhile: the next SELECT sees it.
        raise StorageError(f"conversation {ref.key!r} keeps disappearing; is it being forgotten?")

    async def _erased(self, conn: asyncpg.Connection, audit: AuditRecord) -> bool:
        """Inside a transaction: wait for a `forget` of the user in flight (and
        keep one from starting until commit), then whether it came after `since`."""
        # Its own statement: a statement's snapshot predates the lock it waits for.
        await conn.execute("SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0))",
                           _erase_key(audit.platform, audit.user_id))
        return await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM erasures WHERE platform = $1 AND user_id = $2"
            " AND erased_at >= $3)", audit.platform,
            queries.erasure_id(audit.platform, audit.user_id), audit.since)

    async def save_exchange(
        self, conversation_id: int, user_text: str, reply_text: str, audit: AuditRecord
    ) -> int:
        # On the turn's lock connection, the statement also ends the session lock
        # (held as a transaction lock until commit): the next turn waits for this
        # commit. A lock connection already lost: a pooled one (the reply can still
        # be stored; the loss is reported at the turn's end).
        key = audit.conversation
        turn = self._current_turn()
        lock_key = turn.key if turn is not None and turn.lock == "held" \
            and not _gone(turn.conn) else None
        args = (conversation_id, key, audit.platform, audit.user_id,
                key.rpartition("@")[2] if "@" in key else "dm",
                _erase_key(audit.platform, audit.user_id),
                queries.erasure_id(audit.platform, audit.user_id), audit.since,
                audit.timestamp, lock_key, user_text, reply_text,
                recall_index.tsvector_literal(recall_index.index_terms(user_text)),
                recall_index.tsvector_literal(recall_index.index_terms(reply_text)),
                *audit.values())
        if turn is not None and lock_key is not None:
            async with turn.busy:
                turn.lock = "unknown"  # until the answer says
                try:
                    row = await turn.conn.fetchrow(_SAVE_EXCHANGE, *args)
                except (asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                        asyncpg.exceptions.OperatorInterventionError,
                        asyncpg.exceptions.InternalClientError, ConnectionError):
                    # The lock session died (killed, lost) and its transaction with it:
                    # stored through the pool below.
                    row = None
                else:
                    turn.lock = "released" if row[1] else "lost"
            if row is not None:
                return int(row[0] or 0)
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_SAVE_EXCHANGE, *args[:9], None, *args[10:])
        return int(row[0] or 0)

    def _current_turn(self) -> _Turn | None:
        """The turn the calling task runs (holding its conversation's lock), if any."""
        task = asyncio.current_task()
        return self._turns.get(task) if task is not None else None

    async def turn_context(
        self, conversation_id: int, platform: str, user_id: str, limit: int,
        with_summary: bool,
    ) -> TurnContext:
        turn = self._current_turn()
        if turn is None:
            return await super().turn_context(conversation_id, platform, user_id, limit,
                                              with_summary)
        # The notes come along (the turn asks for them next): one round trip.
        rows = await self._fetch(_TURN_CONTEXT_AND_NOTES, conversation_id, with_summary,
                                 conversation_id, self.dialect.limit(limit), platform,
                                 user_id)
        turn.notes = (conversation_id, sorted(
            (Note(int(r[1]), r[3], r[2]) for r in rows if r[0] == 3), key=lambda n: n.id))
        return queries.turn_context(r for r in rows if r[0] != 3)

    async def notes(self, conversation_id: int) -> list[Note]:
        turn = self._current_turn()
        if turn is not None and turn.notes is not None and turn.notes[0] == conversation_id:
            found, turn.notes = turn.notes[1], None
            return found
        return await super().notes(conversation_id)

    async def recall_search(self, conversation_id: int, terms: list[str], before_id: int,
                            limit: int) -> list[tuple[int, float]]:
        turn = self._current_turn()
        if turn is None:
            return await super().recall_search(conversation_id, terms, before_id, limit)
        # The best hits' neighbours come along (the turn asks for them next).
        async with self._conn() as conn:
            hits, arounds = await recall_index.search_around(
                conn, conversation_id, terms, before_id, limit, AROUND_PREFETCH)
        turn.around = (conversation_id, before_id, frozenset(
            i for i, _ in hits[:AROUND_PREFETCH]), {a.hit.id: a for a in arounds})
        return hits

    async def recall_around(self, conversation_id: int, ids: list[int],
                            before_id: int) -> list[Around]:
        turn = self._current_turn()
        got = turn.around if turn is not None else None
        kept = recall_index.prefetched(got[2], got[3], ids) \
            if got is not None and got[:2] == (conversation_id, before_id) else None
        if kept is not None:
            return kept
        return await super().recall_around(conversation_id, ids, before_id)

    async def _resolve(self, conn: asyncpg.Connection, audit: AuditRecord) -> int:
        key = audit.conversation
        place = key.rpartition("@")[2] if "@" in key else "dm"
        found = await conn.fetchval(self.q.conversation_insert, key, audit.platform,
                                    audit.user_id, place, utcnow())
        if found is None:
            found = await conn.fetchval(self.q.conversation_by_key, key)
        return int(found)

    async def save_audit(self, audit: AuditRecord) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            if await self._erased(conn, audit):
                return 0
            return int(await conn.fetchval(self.q.audit_insert, *audit.values()))

    async def reset_conversation(self, conversation_id: int) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            # The row lock makes a summary being saved meanwhile finish first
            # (then it is deleted here) or wait and find the messages gone.
            await conn.execute(self.q.lock_conversation, conversation_id)
            # Recall terms and vectors go with their messages (ON DELETE CASCADE).
            status = await conn.execute(self.q.delete_messages, conversation_id)
            await conn.execute(self.q.delete_summary, conversation_id)
            await conn.execute(self.q.delete_notes, conversation_id)
        return _rowcount(status)

    # -- summaries
    async def save_summary(self, conversation_id: int, text: str, upto_id: int) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            # Wait for a /reset or forget in flight (they lock this row first).
            # SQLite serialises writers; here each statement's fresh snapshot
            # then sees their deletions, so the reset wins the same way.
            if await conn.fetchval(self.q.share_conversation, conversation_id) is None:
                return False
            status = await conn.execute(
                self.q.save_summary,
                conversation_id, text, upto_id, utcnow(), upto_id, conversation_id)
        return _rowcount(status) > 0

    # -- operators
    async def forget_user(self, platform: str, user_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            # Writes of this user's data in flight commit first (then are
            # deleted below); later ones wait, then see the erasure.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                               _erase_key(platform, user_id))
            # Lock the user's conversations first: a summary being saved
            # finishes or gives up.
            await conn.execute(self.q.lock_user_conversations, platform, user_id)
            for table, sql in queries.forget(self.dialect):
                counts[table] = _rowcount(await conn.execute(sql, platform, user_id))
            # Not counted: the keys stay those of SQLite, which keeps no such rows.
            await conn.execute(
                "DELETE FROM rate_events WHERE user_key = $1", f"{platform}:{user_id}"
            )
            await conn.execute(self.q.prune_erasures, queries.erasure_horizon())
            await conn.execute(self.q.record_erasure, platform,
                               queries.erasure_id(platform, user_id), utcnow_precise())
        return counts

    @contextlib.asynccontextmanager
    async def summary_lock(self, conversation_id: int) -> AsyncIterator[bool]:
        # A lock slot, not waited for: a summary may be skipped, a turn not.
        if self._lock_slots.locked():
            yield False
            return
        await self._lock_slots.acquire()
        key = f"summary:{conversation_id}"
        try:
            pool = self.pool
            conn = await pool.acquire(timeout=CONNECT_TIMEOUT)
            got = False
            try:
                # Advisory locks are per database: conversation ids of another
                # schema (another bot on the same database) must not collide.
                key = f"summary:{await conn.fetchval('SELECT current_schema()')}:{conversation_id}"
                got = bool(await conn.fetchval(
                    f"SELECT pg_try_advisory_lock({_LOCK_KEY})", key))
            except BaseException:
                await asyncio.shield(_release_lock_connection(pool, conn, key, locked=False))
                raise
            try:
                yield got
            finally:
                await asyncio.shield(_release_lock_connection(pool, conn, key, locked=got))
        finally:
            self._lock_slots.release()

    # -- cross-process coordination
    @contextlib.asynccontextmanager
    async def conversation_lock(self, key: str, wait: float) -> AsyncIterator[None]:
        pool = self.pool
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait)
        try:
            async with asyncio.timeout_at(deadline):
                await self._lock_slots.acquire()
        except TimeoutError:
            raise StorageError(
                f"conversation {key!r}: no database connection free for its lock within "
                f"{wait:g} s (all {self.pool_size - 1} lock connections of DB_POOL_SIZE="
                f"{self.pool_size} are held by turns in flight; raise DB_POOL_SIZE)"
            ) from None
        try:
            try:
                conn = await pool.acquire(timeout=max(0.001, deadline - loop.time()))
            except TimeoutError:
                raise StorageError(
                    f"conversation {key!r}: no database connection within {wait:g} s"
                ) from None
            try:
                found = await self._advisory_lock(conn, key, wait, deadline - loop.time())
            except BaseException:
                # Even if the server granted it as we were cancelled, the release
                # unlocks everything this session holds.
                await asyncio.shield(_release_lock_connection(pool, conn, key, locked=False))
                raise
            task = asyncio.current_task()
            turn = _Turn(conn, key, found)
            if task is not None:
                self._turns[task] = turn
            try:
                yield
            finally:
                if task is not None and self._turns.get(task) is turn:
                    del self._turns[task]
                # Shielded: a second cancellation must not leave the lock held.
                await asyncio.shield(self._unlock(pool, turn))
        finally:
            self._lock_slots.release()

    async def _unlock(self, pool: asyncpg.Pool, turn: _Turn) -> None:
        async with turn.busy:  # a call of the turn still on the connection ends first
            if turn.lock == "released":  # by the exchange's save, which committed
                with contextlib.suppress(Exception):
                    await pool.release(turn.conn)
                return
            if turn.lock == "lost":
                _lock_lost(turn.key, "the server no longer held it")
            # "unknown" (a save that failed): unlock whatever is still held, quietly,
            # unless the session itself is gone.
            await _release_lock_connection(
                pool, turn.conn, turn.key,
                locked=turn.lock == "held" or (turn.lock == "unknown" and _gone(turn.conn)))

    async def _advisory_lock(
        self, conn: asyncpg.Connection, key: str, wait: float, remaining: float
    ) -> int | None:
        """Take the lock; the conversation's id read once it is held (None: none yet)."""
        # 0 would mean "wait forever"; the server takes at most 2^31-1 ms.
        ms = min(max(1, int(remaining * 1000)), 2**31 - 1)
        try:
            # One round trip: lock_timeout bounds the wait (set_config runs first),
            # then the lock, then the id (its subquery runs after the lock is held;
            # a conversation forgotten meanwhile fails the turn's writes as it would
            # have any time during the turn). The unlock restores lock_timeout.
            # The client-side timeout is only a backstop for a server that hangs.
            row = await conn.fetchrow(
                "SELECT set_config('lock_timeout', $2, false),"
                f" pg_advisory_lock({_LOCK_KEY}),"
                " (SELECT id FROM conversations WHERE key = $1)",
                key, f"{ms}ms", timeout=ms / 1000 + 5)
            return None if row is None or row[2] is None else int(row[2])
        except (asyncpg.exceptions.LockNotAvailableError, TimeoutError):
            raise StorageError(
                f"conversation {key!r} is busy: another turn held its lock for more than "
                f"{wait:g} s"
            ) from None

    shared_rate_limit = True

    async def rate_hit(self, user_key: str, limit: int, window: int) -> float:
        """A moving window in `rate_events`, shared by every process."""
        if limit <= 0:
            return 0.0
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                # Count-then-insert of one user must not interleave across processes.
                await conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})", user_key)
                # The server's clock: processes on several hosts agree on it.
                now = float(await conn.fetchval(
                    "SELECT extract(epoch FROM clock_timestamp())::float8"))
                await conn.execute(
                    "DELETE FROM rate_events WHERE user_key = $1 AND at <= $2",
                    user_key, now - window,
                )
                times = [r[0] for r in await conn.fetch(
                    "SELECT at FROM rate_events WHERE user_key = $1 ORDER BY at", user_key)]
                if len(times) < limit:
                    await conn.execute(
                        "INSERT INTO rate_events (user_key, at) VALUES ($1, $2)", user_key, now
                    )
                    wait = 0.0
                else:
                    # Allowed again once enough of the oldest events have left.
                    wait = max(0.1, times[len(times) - limit] + window - now)
            self._hits_since_prune += 1
            if self._hits_since_prune >= RATE_PRUNE_EVERY:
                self._hits_since_prune = 0
                await self._prune_rate_events(conn, max(float(window), RATE_HORIZON))
        return wait

    async def _prune_rate_events(self, conn: asyncpg.Connection, horizon: float) -> None:
        """Delete every user's events older than `horizon` (users who went quiet)."""
        await conn.execute(
            "DELETE FROM rate_events WHERE at < extract(epoch FROM clock_timestamp()) - $1",
            horizon,
        )

    # -- copy-db
    async def import_rows(self, table: str, rows: list[dict[str, Any]]) -> None:
        cols = queries.import_columns(table, rows)
        if not rows:
            return
        kinds = COLUMNS[table]
        records = [tuple(_import_value(kinds[c], r[c]) for c in cols) for r in rows]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.copy_records_to_table(table, records=records, columns=cols)

    async def finish_import(self) -> None:
        """Move each id sequence past the largest copied id."""
        async with self.pool.acquire() as conn:
            for table in SERIAL_TABLES:
                await conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" COALESCE((SELECT max(id) FROM {table}), 0) + 1, false)"
                )


_MODEL_INFO_FIELDS = ("context_length", "learned_window", "token_factor", "cjk_factor")
