"""SQLite storage: migrations, pragmas, the history index, atomic exchanges."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from bot.records import ConversationRef
from bot.settings import SettingsError, load_settings
from storage.dialect import SQLITE
from storage.migrations import MIGRATIONS
from storage.queries import SQLITE_QUERIES
from storage.sqlite_store import SQLiteStore
from tests.conftest import SettingsFactory, ask
from tests.samples import REF, audit


async def test_old_database_is_upgraded_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at TEXT)")
    name, statements = MIGRATIONS[0]
    for stmt in statements(SQLITE):
        db.execute(stmt)
    db.execute("INSERT INTO _migrations VALUES (?, 'then')", (name,))
    db.execute("INSERT INTO conversations VALUES (1, 'telegram:1@dm', 'telegram', '1', 'dm', 't')")
    db.execute("INSERT INTO messages VALUES (1, 1, 'user', 'my name is Ana', 't')")
    db.execute("INSERT INTO audit (timestamp, platform, user_id, chat_id, conversation, provider,"
               " model, user_input, model_response, status, error) VALUES"
               " ('t', 'telegram', '1', 'c', 'telegram:1@dm', 'ollama', 'm', 'hi', 'yo', 'ok', '')")
    db.commit()
    db.close()

    store = SQLiteStore(str(path))
    await store.open()
    try:
        assert await store.applied_migrations() == [n for n, _ in MIGRATIONS]
        assert [m.content for m in await store.recent_messages(1, 10)] == ["my name is Ana"]
        (row,) = await store.audit_log(10)
        assert row["kind"] == "chat" and row["summary_used"] is False
    finally:
        await store.close()
    # Opening again applies nothing twice.
    store = SQLiteStore(str(path))
    await store.open()
    assert len(await store.applied_migrations()) == len(MIGRATIONS)
    await store.close()


async def test_pragmas_and_history_index(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "a.db"))
    await store.open()
    try:
        db = store.db
        assert (await (await db.execute("PRAGMA journal_mode")).fetchone())[0] == "wal"
        assert (await (await db.execute("PRAGMA foreign_keys")).fetchone())[0] == 1
        assert (await (await db.execute("PRAGMA busy_timeout")).fetchone())[0] >= 1000
        plan = await (await db.execute(
            "EXPLAIN QUERY PLAN SELECT id, role, content FROM messages WHERE conversation_id = ?"
            " AND id > ? ORDER BY id DESC LIMIT ?", (1, 0, 50))).fetchall()
        text = " ".join(str(tuple(r)) for r in plan)
        assert "messages_conversation_id" in text
        assert "TEMP B-TREE" not in text  # the index serves the order too
    finally:
        await store.close()


async def test_exchange_is_stored_whole_or_not_at_all(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "a.db"))
    await store.open()
    try:
        conv = await store.conversation_id(REF)
        with pytest.raises(sqlite3.IntegrityError):
            # The audit insert fails after both messages were inserted.
            await store.save_exchange(conv, "hi", "hello", audit(platform=None))
        assert await store.count_messages(conv) == 0
        assert await store.audit_log(10) == []
        await store.save_exchange(conv, "hi", "hello", audit())
        assert [m.role for m in await store.recent_messages(conv, 10)] == ["user", "assistant"]
    finally:
        await store.close()


async def test_recent_messages_newest_first_window(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "a.db"))
    await store.open()
    try:
        conv = await store.conversation_id(REF)
        for i in range(5):
            await store.save_exchange(conv, f"q{i}", f"a{i}", audit())
        got = await store.recent_messages(conv, 3)
        assert [m.content for m in got] == ["a3", "q4", "a4"]
        after = await store.recent_messages(conv, 100, after_id=got[0].id)
        assert [m.content for m in after] == ["q4", "a4"]
        span = await store.messages_range(conv, 0, got[0].id)
        assert len(span) == 8
    finally:
        await store.close()


async def test_summary_is_not_written_after_reset(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "a.db"))
    await store.open()
    try:
        conv = await store.conversation_id(REF)
        await store.save_exchange(conv, "q", "a", audit())
        last = (await store.recent_messages(conv, 1))[0].id
        assert await store.save_summary(conv, "User is Ana.", last)
        assert (await store.summary(conv)).text == "User is Ana."  # type: ignore[union-attr]
        assert await store.reset_conversation(conv) == 2
        assert await store.summary(conv) is None
        assert not await store.save_summary(conv, "stale", last)
        assert await store.summary(conv) is None
    finally:
        await store.close()


async def test_database_file_is_private_and_folder_created(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "bot.db"
    store = SQLiteStore(str(path))
    await store.open()
    await store.close()
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_ids_are_never_reused_after_reset_or_forget(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "a.db"))
    await store.open()
    try:
        conv = await store.conversation_id(REF)
        await store.save_exchange(conv, "q", "a", audit())
        old_last = (await store.recent_messages(conv, 1))[0].id
        await store.reset_conversation(conv)
        await store.save_exchange(conv, "q2", "a2", audit())
        assert (await store.recent_messages(conv, 2))[0].id > old_last
        # A summary of the conversation before /reset names a gone id: refused.
        assert not await store.save_summary(conv, "stale", old_last)
        await store.forget_user("telegram", "1")
        other = ConversationRef(key="telegram:2@dm", platform="telegram", user_id="2",
                                place="dm")
        assert await store.conversation_id(other) != conv
    finally:
        await store.close()


async def test_turn_context_is_one_query_served_by_the_index(tmp_path: Path) -> None:
    from bot.store import Store

    store = SQLiteStore(str(tmp_path / "a.db"))
    await store.open()
    try:
        conv = await store.conversation_id(REF)
        for i in range(6):
            await store.save_exchange(conv, f"q{i}", f"a{i}", audit())
        msgs = await store.recent_messages(conv, 100)
        await store.save_summary(conv, "User is Ana.", msgs[3].id)
        await store.set_user_model("telegram", "1", "qwen2.5")
        for with_summary in (True, False):
            one = await store.turn_context(conv, "telegram", "1", 5, with_summary)
            three = await Store.turn_context(store, conv, "telegram", "1", 5, with_summary)
            assert one == three
        ctx = await store.turn_context(conv, "telegram", "1", 5, True)
        assert ctx.model_choice == "qwen2.5" and ctx.summary is not None
        assert [m.content for m in ctx.history] == ["a3", "q4", "a4", "q5", "a5"]
        plan = await store.db.execute_fetchall(
            "EXPLAIN QUERY PLAN " + SQLITE_QUERIES.turn_context,
            (conv, True, conv, 5, "telegram", "1"))
        text = " ".join(str(tuple(r)) for r in plan)
        assert "messages_conversation_id" in text and "TEMP B-TREE" not in text
    finally:
        await store.close()


@pytest.mark.parametrize(("setting", "pragma"), [(None, 1), ("NORMAL", 1), ("FULL", 2)])
async def test_sqlite_synchronous_setting_reaches_the_database(
    make_settings: SettingsFactory, setting: str | None, pragma: int
) -> None:
    from bot.app import open_service

    settings = make_settings(**({"SQLITE_SYNCHRONOUS": setting} if setting else {}))
    async with open_service(settings) as service:
        assert await ask(service, "hi")  # the user is answered either way
        db = service.store.db  # type: ignore[attr-defined]
        # 1 is NORMAL, 2 is FULL.
        assert (await db.execute_fetchall("PRAGMA synchronous"))[0][0] == pragma
        assert (await db.execute_fetchall("SELECT count(*) FROM messages"))[0][0] == 2


def test_sqlite_synchronous_refuses_other_values() -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(None, SQLITE_SYNCHRONOUS="OFF")
    assert str(err.value).startswith("bad setting SQLITE_SYNCHRONOUS='OFF':")
    assert "NORMAL" in str(err.value) and "FULL" in str(err.value)


@pytest.mark.parametrize("url", [
    "postgresql+asyncpg://bot:hunter2secret@db.example:5432/bot",
    "mysql://bot:hunter2secret@db/bot",
    "postgres+psycopg://db/bot?password=hunter2secret&sslmode=require",
])
def test_bad_database_url_error_hides_the_password(url: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(None, DATABASE_URL=url)
    msg = str(err.value)
    assert msg.startswith("bad setting DATABASE_URL=") and "\n" not in msg
    assert "hunter2secret" not in msg and "***" in msg
    assert "allowed: sqlite:///" in msg  # still says what is wrong
