"""Every past schema version upgrades to the current one with no row lost, on both backends.

As simonw/llm's test_migrate.py: for each earlier step, a database made by the
migrations up to it (with rows in every table it has), opened by the store.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiosqlite
import asyncpg
import pytest

from bot.operator_commands import logs
from bot.records import AUDIT_COLUMNS, AuditRecord, ConversationRef
from bot.settings import load_settings
from bot.store import TABLES
from storage import open_store, postgres_store, queries, sqlite_store
from storage.audit_queries import AuditFilter
from storage.dialect import POSTGRES, SQLITE, Dialect
from storage.migrations import MIGRATIONS, Migration
from tests.backends import db_url_both_backends as db_url_both_backends

NAMES = [m.name for m in MIGRATIONS]
T = "2025-01-02T03:04:05.678Z"


class Raw:
    """A bare connection to the test database, in its dialect, for building old versions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect: Dialect = SQLITE if url.startswith("sqlite") else POSTGRES
        self._lite: aiosqlite.Connection | None = None
        self._pg: asyncpg.Connection | None = None

    async def migrate(self, upto: int) -> None:
        await self.migrate_steps(MIGRATIONS[:upto])

    async def migrate_steps(self, steps: list[Migration]) -> None:
        if self._lite is not None:
            await sqlite_store.migrate(self._lite, steps)
        else:
            assert self._pg is not None
            await postgres_store.migrate(self._pg, steps)

    async def execute(self, sql: str, *args: Any) -> None:
        sql = self.dialect.sql(sql)
        if self._lite is not None:
            await self._lite.execute(sql, args)
        else:
            assert self._pg is not None
            await self._pg.execute(sql, *args)

    async def rows(self, table: str) -> list[dict[str, Any]]:
        order = ", ".join(queries.PRIMARY_KEYS[table])
        sql = f"SELECT * FROM {table} ORDER BY {order}"
        if self._lite is not None:
            got: list[Any] = list(await self._lite.execute_fetchall(sql))
        else:
            assert self._pg is not None
            got = list(await self._pg.fetch(sql))
        return [queries.export_row(r) for r in got]

    async def tables(self) -> set[str]:
        if self._lite is not None:
            return {r[0] for r in await self._lite.execute_fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert self._pg is not None
        return {r[0] for r in await self._pg.fetch(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema()")}

    async def indexes(self, table: str) -> set[str]:
        if self._lite is not None:
            return {r[1] for r in await self._lite.execute_fetchall(
                f"PRAGMA index_list({table})")}
        assert self._pg is not None
        return {r[0] for r in await self._pg.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            " AND tablename = $1", table)}


@asynccontextmanager
async def raw(url: str) -> AsyncIterator[Raw]:
    conn = Raw(url)
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        sqlite_store._prepare_file(path)
        conn._lite = await aiosqlite.connect(path, isolation_level=None)
        conn._lite.row_factory = aiosqlite.Row
    else:
        conn._pg = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        if conn._lite is not None:
            await conn._lite.close()
        if conn._pg is not None:
            await conn._pg.close()


async def applied_on_open(url: str) -> list[str]:
    """The steps recorded once the store has opened (and migrated) the database."""
    store = open_store(url, pool_size=2)
    await store.open()
    try:
        return await store.applied_migrations()
    finally:
        await store.close()


async def fill(db: Raw, upto: int) -> None:
    """Rows in every table the schema has after step `upto`, as the bot of then wrote them."""
    has = set(NAMES[:upto])
    for user in ("1", "2"):
        await db.execute(
            "INSERT INTO conversations (key, platform, user_id, place, created_at)"
            " VALUES (?, ?, ?, ?, ?)", f"telegram:{user}@dm", "telegram", user, "dm", T)
    for conv, role, text in ((1, "user", "my name is Ana"), (1, "assistant", "Hi Ana"),
                             (2, "user", "ciao"), (2, "assistant", "ciao!"),
                             (1, "user", "I like tea"), (1, "assistant", "Noted")):
        await db.execute("INSERT INTO messages (conversation_id, role, content, created_at)"
                         " VALUES (?, ?, ?, ?)", conv, role, text, T)
    await db.execute("INSERT INTO user_settings (platform, user_id, model, updated_at)"
                     " VALUES (?, ?, ?, ?)", "telegram", "1", "qwen2.5", T)
    base = ("timestamp, platform, user_id, chat_id, conversation, provider, model, user_input,"
            " model_response, status, error, response_time, first_token_time, prompt_tokens,"
            " completion_tokens, history_messages")
    row = (T, "telegram", "1", "c1", "telegram:1@dm", "ollama", "qwen2.5", "hi", "hello",
           "ok", "", 1.25, 0.5, 30, 12, 4)
    await db.execute(f"INSERT INTO audit ({base}) VALUES ({', '.join('?' * 16)})", *row)
    if "002_summaries" in has:
        await db.execute("INSERT INTO summaries (conversation_id, text, upto_id, updated_at)"
                         " VALUES (?, ?, ?, ?)", 1, "User is Ana.", 2, T)
        await db.execute(
            f"INSERT INTO audit ({base}, kind, summary_used) VALUES"
            f" ({', '.join('?' * 18)})",
            *row[:8], "User is Ana.", "ok", "", 2.0, None, None, None, 2, "summary", True)
    if "006_model_info" in has:
        await db.execute("INSERT INTO model_info (model, context_length, learned_window,"
                         " token_factor, cjk_factor, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                         "qwen2.5", 32768, 4096, 1.1, 1.4, T)
    if "008_personas" in has:
        await db.execute("INSERT INTO conversation_settings (conversation_key, platform,"
                         " user_id, persona, updated_at) VALUES (?, ?, ?, ?, ?)",
                         "telegram:1@dm", "telegram", "1", "teacher", T)
        await db.execute("INSERT INTO place_settings (platform, place_id, persona, updated_at)"
                         " VALUES (?, ?, ?, ?)", "telegram", "-100", "coach", T)
    if "010_notes" in has:
        await db.execute("INSERT INTO notes (conversation_id, text, created_at)"
                         " VALUES (?, ?, ?)", 1, "I'm vegetarian", T)
    if "003_rate_events" in has and db.dialect is POSTGRES:
        await db.execute("INSERT INTO rate_events (user_key, at)"
                         " VALUES (?, extract(epoch FROM clock_timestamp()))", "telegram:1")


@pytest.mark.parametrize("upto", range(1, len(MIGRATIONS)), ids=NAMES[:-1])
async def test_each_past_version_upgrades_with_no_row_lost(db_url: str, upto: int) -> None:
    async with raw(db_url) as db:
        await db.migrate(upto)
        await fill(db, upto)
        before = {t: await db.rows(t) for t in sorted(await db.tables()) if t in TABLES}
        assert before["messages"] and before["audit"]  # the test has rows to lose

    store = open_store(db_url, pool_size=2)
    await store.open()
    try:
        assert await store.applied_migrations() == NAMES
        after = {t: [r async for batch in store.export_rows(t) for r in batch]
                 for t in TABLES}
        # Every row of then is there, every old value unchanged; new columns
        # hold their defaults.
        for table, rows in before.items():
            assert [{k: r[k] for k in rows[0]} for r in after[table]] == rows, table
        for r in after["audit"]:
            assert (r["recalled"], r["persona"], r["images"]) == (0, "", 0)
        assert {t: len(rows) for t, rows in after.items()} == await store.table_counts()

        # It works as a current database: reads of the old rows, new ids past them.
        ref = ConversationRef("telegram:1@dm", "telegram", "1", "dm")
        conv = await store.conversation_id(ref)
        assert conv == 1
        history = [m.content for m in await store.recent_messages(conv, 10)]
        assert history == ["my name is Ana", "Hi Ana", "I like tea", "Noted"]
        assert await store.user_model("telegram", "1") == "qwen2.5"
        summary = await store.summary(conv)
        assert (summary.text if summary else None) == (
            "User is Ana." if upto >= NAMES.index("002_summaries") + 1 else None)
        audit_id = await store.save_exchange(conv, "q", "a", AuditRecord(
            platform="telegram", user_id="1", chat_id="c1", conversation=ref.key,
            user_input="q", recalled=3, persona="pirate", images=1))
        assert audit_id > max(r["id"] for r in before["audit"])
        newest = (await store.recent_messages(conv, 1))[0].id
        assert newest > max(r["id"] for r in before["messages"])
        last = (await store.audit_log(1))[0]
        assert (last["recalled"], last["persona"], last["images"]) == (3, "pirate", 1)
        # The recall index: a new exchange is indexed as it is stored; the old rows
        # once reindexed (they were stored before the index existed).
        old_ids = [r["id"] for r in before["messages"]]
        if upto < NAMES.index("009_recall") + 1:
            assert await store.count_missing(None) == len(old_ids)
        assert [h[0] for h in await store.recall_search(conv, ["q"], 10**9, 5)] == [newest - 1]
        while (await store.index_unindexed(0, 2))[0]:
            pass
        assert await store.count_missing(None) == 0
        tea = [h[0] for h in await store.recall_search(conv, ["tea"], 10**9, 5)]
        assert tea == [r["id"] for r in before["messages"] if r["content"] == "I like tea"]
    finally:
        await store.close()

    assert await applied_on_open(db_url) == NAMES  # opening again applies nothing twice


async def test_schema_matches_the_copy_db_columns(db_url: str) -> None:
    """The columns copy-db moves are the columns the migrations made, in order."""
    store = open_store(db_url, pool_size=2)
    await store.open()
    await store.close()
    async with raw(db_url) as db:
        # A new table is copied by copy-db (TABLES, queries.COLUMNS) or named here.
        internal = {"_migrations", "sqlite_sequence", "rate_events", "erasures"}
        # The recall index is rebuilt from the messages, not copied (copy-db reindexes).
        recall = {t for t in await db.tables() if t.startswith("recall_")}
        assert recall >= {"recall_vectors"} and recall & {"recall_fts", "recall_terms"}
        assert await db.tables() - internal - recall == set(TABLES)
        await fill(db, len(MIGRATIONS))
        for table in TABLES:
            assert list((await db.rows(table))[0]) == list(queries.COLUMNS[table]), table
        assert list(queries.COLUMNS["audit"])[1:] == list(AUDIT_COLUMNS)
        # The audit log's reads: by time (retention) and by user, newest first.
        assert {"audit_timestamp", "audit_user"} <= await db.indexes("audit")


async def test_audit_fields_reach_logs_json(db_url: str, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings = load_settings(None, DATABASE_URL=db_url, DB_POOL_SIZE=6)
    store = open_store(db_url, pool_size=2)
    await store.open()
    try:
        await store.save_audit(AuditRecord(
            platform="discord", user_id="9", chat_id="c", conversation="discord:9@dm",
            user_input="look", recalled=2, persona="tutor", images=3))
    finally:
        await store.close()
    assert await logs(settings, 10, AuditFilter(), True) == 0
    (line,) = capsys.readouterr().out.splitlines()
    row = json.loads(line)
    assert (row["recalled"], row["persona"], row["images"]) == (2, "tutor", 3)
    assert list(row) == ["id", *AUDIT_COLUMNS]


def test_migration_names_are_unique_and_ordered() -> None:
    # The runner applies them in list order; recorded names are compared as text.
    assert NAMES == sorted(set(NAMES))
    assert NAMES[:4] == ["001_initial", "002_summaries", "003_rate_events",
                         "004_never_reuse_ids"]
    # A backend that needs nothing for a step still records it.
    assert MIGRATIONS[2].statements(SQLITE) == [] and MIGRATIONS[3].statements(POSTGRES) == []


async def test_step_that_fails_leaves_nothing(db_url: str) -> None:
    """A failing step leaves neither its changes nor its record (both backends' DDL is
    transactional), and the steps before it stay applied."""
    broken = Migration("999_broken", lambda d: [
        "ALTER TABLE audit ADD COLUMN half TEXT", "THIS IS NOT SQL"])
    async with raw(db_url) as db:
        with pytest.raises((sqlite3.OperationalError, asyncpg.PostgresSyntaxError)):
            await db.migrate_steps([*MIGRATIONS[:1], broken])
        first = await db.rows("audit")
        await db.execute("INSERT INTO audit (timestamp, platform, user_id, chat_id,"
                         " conversation, provider, model, user_input, model_response, status,"
                         " error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", *("x" * 11))
        (row,) = await db.rows("audit")
    assert first == [] and "half" not in row
    assert await applied_on_open(db_url) == NAMES


async def test_reopening_a_migrated_database_reads_no_table_in_full(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up must not grow with the history: no foreign-key sweep once migrated."""
    path = tmp_path / "bot.db"
    first = open_store(f"sqlite:///{path}")
    await first.open()
    ref = ConversationRef(key="telegram:1@dm", platform="telegram", user_id="1", place="dm")
    conv = await first.conversation_id(ref)
    await first.close()
    statements: list[str] = []
    connect = aiosqlite.connect

    def traced(*args: Any, **kwargs: Any) -> aiosqlite.Connection:
        conn = connect(*args, **kwargs)
        original = conn._connect

        async def with_trace() -> aiosqlite.Connection:
            await original()
            await conn.set_trace_callback(statements.append)
            return conn

        conn._connect = with_trace  # type: ignore[method-assign]
        return conn

    monkeypatch.setattr(sqlite_store.aiosqlite, "connect", traced)
    again = open_store(f"sqlite:///{path}")
    await again.open()
    try:
        assert await again.conversation_id(ref) == conv  # the same database, still usable
    finally:
        await again.close()
    assert any("migrations" in s for s in statements)  # the trace saw the migration pass
    assert not [s for s in statements if "foreign_key_check" in s]
