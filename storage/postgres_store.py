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
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

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
from storage.postgres_migrations import MIGRATION_LOCK, MIGRATIONS, MIGRATIONS_TABLE

CONNECT_TIMEOUT = 10.0  # seconds to reach the server at open
COMMAND_TIMEOUT = 60.0  # default bound on one statement (the lock wait sets its own)
CLOSE_TIMEOUT = 10.0  # seconds close() waits for borrowed connections
UNLOCK_TIMEOUT = 5.0
RATE_HORIZON = 3600.0  # rate events older than this (and the window) are garbage
RATE_PRUNE_EVERY = 500  # hits between sweeps of every user's old rate events


# Every copied table's columns in table order, with the Python type they hold.
# copy-db column names become SQL identifiers, so they are checked against this.
COLUMNS: dict[str, dict[str, type]] = {
    "conversations": {"id": int, "key": str, "platform": str, "user_id": str, "place": str,
                      "created_at": str},
    "messages": {"id": int, "conversation_id": int, "role": str, "content": str,
                 "created_at": str},
    "summaries": {"conversation_id": int, "text": str, "upto_id": int, "updated_at": str},
    "user_settings": {"platform": str, "user_id": str, "model": str, "updated_at": str},
    "audit": {
        "id": int, "timestamp": str, "platform": str, "user_id": str, "chat_id": str,
        "conversation": str, "provider": str, "model": str, "user_input": str,
        "model_response": str, "status": str, "error": str, "response_time": float,
        "first_token_time": float, "prompt_tokens": int, "completion_tokens": int,
        "history_messages": int, "kind": str, "summary_used": bool,
    },
}
PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "conversations": ("id",),
    "messages": ("id",),
    "summaries": ("conversation_id",),
    "user_settings": ("platform", "user_id"),
    "audit": ("id",),
}
SERIAL_TABLES = ("conversations", "messages", "audit")  # their `id` is a BIGSERIAL


def _q(name: str) -> str:
    """A quoted identifier (several columns are named like SQL types)."""
    return '"' + name.replace('"', '""') + '"'


_AUDIT_INSERT = (
    f"INSERT INTO audit ({', '.join(_q(c) for c in AUDIT_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(AUDIT_COLUMNS) + 1))}) RETURNING id"
)
_AUDIT_SELECT = f"SELECT id, {', '.join(_q(c) for c in AUDIT_COLUMNS)} FROM audit"
# Served by messages_conversation_id (conversation_id, id), scanned backwards.
# The user's model pick, the summary, and the newest messages after it: one query.
_TURN_CONTEXT = """
WITH s AS (
    SELECT text, upto_id, updated_at FROM summaries
    WHERE conversation_id = $1 AND $2::boolean
)
(SELECT 0, id, role, content, NULL::text FROM messages
 WHERE conversation_id = $1 AND id > coalesce((SELECT upto_id FROM s), 0)
 ORDER BY id DESC LIMIT $3)
UNION ALL SELECT 1, upto_id, NULL, text, updated_at FROM s
UNION ALL SELECT 2, 0, NULL, model, NULL FROM user_settings WHERE platform = $4 AND user_id = $5
"""

RECENT_MESSAGES = (
    "SELECT id, role, content FROM messages WHERE conversation_id = $1 AND id > $2"
    " ORDER BY id DESC LIMIT $3"
)
_LOCK_KEY = "hashtextextended($1, 0)"  # 64-bit advisory lock key of a text



def _query(query: tuple[str, list[Any]]) -> list[Any]:
    """A built query as fetch()'s positional arguments."""
    return [query[0], *query[1]]


def _rowcount(status: str) -> int:
    """Rows affected, from a command tag such as 'DELETE 3' or 'INSERT 0 1'."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _limit(n: int) -> int | None:
    # SQLite reads a negative LIMIT as "no limit"; PostgreSQL rejects it.
    return None if n < 0 else n


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}{':***' if colon else ''}@{hostport}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


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


def _export_row(record: asyncpg.Record) -> dict[str, Any]:
    # Rows leave as SQLite's do (summary_used 0/1), so exports compare equal.
    return {k: int(v) if isinstance(v, bool) else v for k, v in record.items()}


def _import_value(kind: type, value: Any) -> Any:
    """SQLite's value as the column wants it; anything odd is left for asyncpg to refuse."""
    if kind is bool and value in (0, 1):
        return bool(value)  # SQLite stores summary_used as 0/1
    if kind is float and type(value) is int:
        return float(value)  # SQLite may hand back an integral REAL as int
    return value


async def _release_lock_connection(
    pool: asyncpg.Pool, conn: asyncpg.Connection, key: str, *, locked: bool
) -> None:
    """Unlock and give the connection back (to the pool it came from, even if closing)."""
    try:
        if locked and not conn.is_closed():
            await conn.execute(f"SELECT pg_advisory_unlock({_LOCK_KEY})", key,
                               timeout=UNLOCK_TIMEOUT)
    except Exception:
        # Ending the session is what surely frees a session lock.
        conn.terminate()
    finally:
        # release() also resets the session: pg_advisory_unlock_all(), RESET ALL.
        with contextlib.suppress(Exception):
            await pool.release(conn)


class PostgresStore(Store):
    """Memory, audit log and cross-process coordination in one PostgreSQL database."""

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
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"application_name": "memorybot",
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
                    await self._migrate(conn)
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

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        # The advisory lock makes a second process starting at once wait, then
        # find each step recorded (CREATE ... IF NOT EXISTS alone races in PG).
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(MIGRATIONS_TABLE)
        for step, (name, sql) in enumerate(MIGRATIONS, 1):
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                if not await conn.fetchval("SELECT 1 FROM _migrations WHERE name = $1", name):
                    await conn.execute(sql)  # no arguments: several statements are allowed
                    await conn.execute(
                        "INSERT INTO _migrations (name, applied_at) VALUES ($1, $2)",
                        name, utcnow())
            if self.on_migration is not None:
                self.on_migration(step, len(MIGRATIONS))

    async def applied_migrations(self) -> list[str]:
        rows = await self.pool.fetch("SELECT name FROM _migrations ORDER BY name")
        return [r["name"] for r in rows]

    # -- conversations and messages
    async def conversation_id(self, ref: ConversationRef) -> int:
        # Not cached: another process (or `memorybot forget`) may delete it.
        async with self.pool.acquire() as conn:
            for _ in range(3):
                found = await conn.fetchval("SELECT id FROM conversations WHERE key = $1", ref.key)
                if found is not None:
                    return int(found)
                found = await conn.fetchval(
                    "INSERT INTO conversations (key, platform, user_id, place, created_at)"
                    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING RETURNING id",
                    ref.key, ref.platform, ref.user_id, ref.place, utcnow(),
                )
                if found is not None:
                    return int(found)
                # Another process inserted it meanwhile: the next SELECT sees it.
        raise StorageError(f"conversation {ref.key!r} keeps disappearing; is it being forgotten?")

    async def turn_context(
        self, conversation_id: int, platform: str, user_id: str, limit: int,
        with_summary: bool,
    ) -> TurnContext:
        # One round trip instead of three (each would also take a connection
        # from the pool and reset it on the way back).
        rows = await self.pool.fetch(_TURN_CONTEXT, conversation_id, with_summary,
                                     _limit(limit), platform, user_id)
        choice: str | None = None
        summary: Summary | None = None
        history: list[StoredMessage] = []
        for kind, ident, role, content, updated in rows:
            if kind == 0:
                history.append(StoredMessage(int(ident), role, content))
            elif kind == 1:
                summary = Summary(content, int(ident), updated)
            else:
                choice = content
        history.reverse()
        return TurnContext(choice, summary, history)

    async def recent_messages(
        self, conversation_id: int, limit: int, after_id: int = 0
    ) -> list[StoredMessage]:
        rows = await self.pool.fetch(RECENT_MESSAGES, conversation_id, after_id, _limit(limit))
        return [StoredMessage(r[0], r[1], r[2]) for r in reversed(rows)]

    async def messages_range(
        self, conversation_id: int, after_id: int, upto_id: int
    ) -> list[StoredMessage]:
        rows = await self.pool.fetch(
            "SELECT id, role, content FROM messages WHERE conversation_id = $1"
            " AND id > $2 AND id <= $3 ORDER BY id",
            conversation_id, after_id, upto_id,
        )
        return [StoredMessage(r[0], r[1], r[2]) for r in rows]

    async def count_messages(self, conversation_id: int) -> int:
        return int(await self.pool.fetchval(
            "SELECT count(*) FROM messages WHERE conversation_id = $1", conversation_id
        ))

    async def save_exchange(
        self, conversation_id: int, user_text: str, reply_text: str, audit: AuditRecord
    ) -> int:
        now = audit.timestamp
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO messages (conversation_id, role, content, created_at)"
                " VALUES ($1, $2, $3, $4)",
                [(conversation_id, "user", user_text, now),
                 (conversation_id, "assistant", reply_text, now)],
            )
            return int(await conn.fetchval(_AUDIT_INSERT, *audit.values()))

    async def save_audit(self, audit: AuditRecord) -> int:
        return int(await self.pool.fetchval(_AUDIT_INSERT, *audit.values()))

    async def reset_conversation(self, conversation_id: int) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            # The row lock makes a summary being saved meanwhile finish first
            # (then it is deleted here) or wait and find the messages gone.
            await conn.execute(
                "SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conversation_id
            )
            status = await conn.execute(
                "DELETE FROM messages WHERE conversation_id = $1", conversation_id
            )
            await conn.execute("DELETE FROM summaries WHERE conversation_id = $1", conversation_id)
        return _rowcount(status)

    # -- summaries
    async def summary(self, conversation_id: int) -> Summary | None:
        row = await self.pool.fetchrow(
            "SELECT text, upto_id, updated_at FROM summaries WHERE conversation_id = $1",
            conversation_id,
        )
        return Summary(row[0], int(row[1]), row[2]) if row else None

    async def save_summary(self, conversation_id: int, text: str, upto_id: int) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            # Wait for a /reset or forget in flight (they lock this row first).
            # SQLite serialises writers; here each statement's fresh snapshot
            # then sees their deletions, so the reset wins the same way.
            if await conn.fetchval(
                "SELECT 1 FROM conversations WHERE id = $1 FOR SHARE", conversation_id
            ) is None:
                return False
            status = await conn.execute(
                "INSERT INTO summaries (conversation_id, text, upto_id, updated_at)"
                " SELECT $1::bigint, $2::text, $3::bigint, $4::text WHERE EXISTS"
                " (SELECT 1 FROM messages WHERE id = $3 AND conversation_id = $1)"
                " ON CONFLICT (conversation_id) DO UPDATE SET text = excluded.text,"
                " upto_id = excluded.upto_id, updated_at = excluded.updated_at",
                conversation_id, text, upto_id, utcnow(),
            )
        return _rowcount(status) > 0

    # -- per-user settings
    async def user_model(self, platform: str, user_id: str) -> str | None:
        value: str | None = await self.pool.fetchval(
            "SELECT model FROM user_settings WHERE platform = $1 AND user_id = $2",
            platform, user_id,
        )
        return value

    async def set_user_model(self, platform: str, user_id: str, model: str) -> None:
        await self.pool.execute(
            "INSERT INTO user_settings (platform, user_id, model, updated_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (platform, user_id)"
            " DO UPDATE SET model = excluded.model, updated_at = excluded.updated_at",
            platform, user_id, model, utcnow(),
        )

    # -- operators
    async def audit_log(self, limit: int, user: str | None = None) -> list[dict[str, Any]]:
        if user:
            platform, _, user_id = user.partition(":")
            rows = await self.pool.fetch(
                f"{_AUDIT_SELECT} WHERE platform = $1 AND user_id = $2 ORDER BY id DESC LIMIT $3",
                platform, user_id, _limit(limit),
            )
        else:
            rows = await self.pool.fetch(
                f"{_AUDIT_SELECT} ORDER BY id DESC LIMIT $1", _limit(limit)
            )
        return [dict(r.items()) for r in reversed(rows)]

    async def audit_rows_for_stats(self) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT provider, model, status, response_time, first_token_time, prompt_tokens,"
            " completion_tokens FROM audit WHERE kind = 'chat' AND status != 'rejected'"
        )
        return [dict(r.items()) for r in rows]

    async def audit_query(self, f: aq.AuditFilter, limit: int) -> list[dict[str, Any]]:
        sql, args = aq.audit_log("postgres", f, max(0, limit))
        return [dict(r.items()) for r in reversed(await self.pool.fetch(sql, *args))]

    async def audit_after(self, f: aq.AuditFilter, after_id: int,
                          limit: int) -> list[dict[str, Any]]:
        sql, args = aq.audit_after("postgres", f, after_id, limit)
        return [dict(r.items()) for r in await self.pool.fetch(sql, *args)]

    async def last_audit_id(self) -> int:
        sql, args = aq.last_audit_id("postgres")
        return int(await self.pool.fetchval(sql, *args))

    async def delete_audit_before(self, cutoff: str, batch: int) -> int:
        sql, args = aq.delete_older_than("postgres", cutoff, batch)
        return _rowcount(await self.pool.execute(sql, *args))

    async def audit_span(self) -> tuple[str | None, int]:
        sql, args = aq.oldest_timestamp("postgres")
        row = await self.pool.fetchrow(sql, *args)
        assert row is not None
        return row[0], int(row[1])

    async def audit_stats(self, since: str | None = None
                          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        groups = await self.pool.fetch(*_query(aq.stats("postgres", since)))
        histogram = await self.pool.fetch(*_query(aq.stats_histogram("postgres", since)))
        return [dict(r.items()) for r in groups], [dict(r.items()) for r in histogram]

    async def forget_user(self, platform: str, user_id: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            # Lock the user's conversations first (in id order, so two forgets
            # cannot deadlock): a summary being saved finishes or gives up.
            await conn.execute(
                "SELECT 1 FROM conversations WHERE platform = $1 AND user_id = $2"
                " ORDER BY id FOR UPDATE",
                platform, user_id,
            )
            where = ("conversation_id IN (SELECT id FROM conversations"
                     " WHERE platform = $1 AND user_id = $2)")
            for table in ("messages", "summaries"):
                status = await conn.execute(f"DELETE FROM {table} WHERE {where}", platform, user_id)
                counts[table] = _rowcount(status)
            for table in ("conversations", "user_settings", "audit"):
                status = await conn.execute(
                    f"DELETE FROM {table} WHERE platform = $1 AND user_id = $2", platform, user_id
                )
                counts[table] = _rowcount(status)
            # Not counted: the keys stay those of SQLite, which keeps no such rows.
            await conn.execute(
                "DELETE FROM rate_events WHERE user_key = $1", f"{platform}:{user_id}"
            )
        return counts

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
                await self._advisory_lock(conn, key, wait, deadline - loop.time())
            except BaseException:
                # Even if the server granted it as we were cancelled, release's
                # reset (pg_advisory_unlock_all) frees it.
                await asyncio.shield(_release_lock_connection(pool, conn, key, locked=False))
                raise
            try:
                yield
            finally:
                # Shielded: a second cancellation must not leave the lock held.
                await asyncio.shield(_release_lock_connection(pool, conn, key, locked=True))
        finally:
            self._lock_slots.release()

    async def _advisory_lock(
        self, conn: asyncpg.Connection, key: str, wait: float, remaining: float
    ) -> None:
        # 0 would mean "wait forever"; the server takes at most 2^31-1 ms.
        ms = min(max(1, int(remaining * 1000)), 2**31 - 1)
        try:
            # Session-level, for as long as this connection holds the lock (the
            # pool's reset on release restores the defaults). Keepalives: if
            # this host dies, the server ends the session and frees the lock in
            # about a minute and a half, not after the kernel's two hours.
            await conn.execute(
                "SELECT set_config('lock_timeout', $1, false),"
                " set_config('tcp_keepalives_idle', '60', false),"
                " set_config('tcp_keepalives_interval', '10', false),"
                " set_config('tcp_keepalives_count', '3', false)",
                f"{ms}ms",
            )
            # The client-side timeout is only a backstop for a server that hangs.
            await conn.execute(f"SELECT pg_advisory_lock({_LOCK_KEY})", key,
                               timeout=ms / 1000 + 5)
        except (asyncpg.exceptions.LockNotAvailableError, TimeoutError):
            raise StorageError(
                f"conversation {key!r} is busy: another turn held its lock for more than "
                f"{wait:g} s"
            ) from None

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
    async def table_counts(self) -> dict[str, int]:
        async with self.pool.acquire() as conn:
            return {t: int(await conn.fetchval(f"SELECT count(*) FROM {t}")) for t in TABLES}

    async def export_rows(
        self, table: str, batch: int = 1000
    ) -> AsyncIterator[list[dict[str, Any]]]:
        if table not in TABLES:
            raise StorageError(f"unknown table {table}")
        cols = ", ".join(_q(c) for c in COLUMNS[table])
        pk = PRIMARY_KEYS[table]
        order = ", ".join(_q(c) for c in pk)
        after = ", ".join(f"${i}" for i in range(2, len(pk) + 2))
        last: tuple[Any, ...] | None = None
        while True:
            # Keyset pagination: each batch is an index range scan, however deep.
            if last is None:
                rows = await self.pool.fetch(
                    f"SELECT {cols} FROM {table} ORDER BY {order} LIMIT $1", batch)
            else:
                rows = await self.pool.fetch(
                    f"SELECT {cols} FROM {table} WHERE ({order}) > ({after})"
                    f" ORDER BY {order} LIMIT $1",
                    batch, *last,
                )
            if not rows:
                return
            last = tuple(rows[-1][c] for c in pk)
            yield [_export_row(r) for r in rows]

    async def import_rows(self, table: str, rows: list[dict[str, Any]]) -> None:
        if table not in TABLES:
            raise StorageError(f"unknown table {table}")
        if not rows:
            return
        kinds = COLUMNS[table]
        cols = list(rows[0])
        unknown = [c for c in cols if c not in kinds]
        if unknown:
            raise StorageError(f"table {table} has no column(s) {', '.join(unknown)}")
        records = []
        for r in rows:
            if r.keys() != rows[0].keys():
                raise StorageError(f"rows of {table} differ in their columns")
            records.append(tuple(_import_value(kinds[c], r[c]) for c in cols))
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
