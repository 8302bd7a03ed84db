"""PostgresStore against a real server: a fresh database per test (tests/pg.py).

Two PostgresStore instances on one database stand for two bot processes.
Waits are bounded; where a test needs another session to be blocked on a
lock, it polls pg_stat_activity for that state rather than sleeping.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import storage.postgres_store as pgs
from bot.operator_commands import copy_db
from bot.records import AUDIT_COLUMNS, AuditRecord, ConversationRef, StorageError, StoredMessage
from bot.store import TABLES, Store
from storage import open_store
from storage.dialect import POSTGRES
from storage.migrations import MIGRATIONS, MIGRATIONS_TABLE
from storage.postgres_store import PostgresStore
from storage.queries import POSTGRES_QUERIES, PRIMARY_KEYS
from storage.sqlite_store import SQLiteStore
from tests.pg import ServerUnreachable, drop_database, fresh_database
from tests.pg import pg_url as pg_url  # the fixture

REF = ConversationRef(key="telegram:1@dm", platform="telegram", user_id="1", place="dm")
OTHER = ConversationRef(key="discord:2@g9", platform="discord", user_id="2", place="g9")
BOUND = 5.0  # seconds any single wait in these tests may take


def audit(ref: ConversationRef = REF, **kw: Any) -> AuditRecord:
    values: dict[str, Any] = {
        "platform": ref.platform, "user_id": ref.user_id, "chat_id": "chat-" + ref.user_id,
        "conversation": ref.key, "user_input": "hi", "provider": "ollama", "model": "llama3.2",
    }
    values.update(kw)
    return AuditRecord(**values)


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(pg_url, pool_size=4)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def second(pg_url: str, store: PostgresStore) -> AsyncIterator[PostgresStore]:
    """Another "process" on the same database."""
    s = PostgresStore(pg_url, pool_size=4)
    await s.open()
    yield s
    await s.close()


async def within(aw: Awaitable[Any], seconds: float = BOUND) -> Any:
    async with asyncio.timeout(seconds):
        return await aw


async def wait_until_blocked(url: str, count: int = 1) -> None:
    """Until `count` sessions of the database wait on a lock (bounded)."""
    conn = await asyncpg.connect(url)
    try:
        async with asyncio.timeout(BOUND):
            while True:
                waiting = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'")
                if waiting >= count:
                    return
                await asyncio.sleep(0.01)  # polls a server state; no event to wait on
    finally:
        await conn.close()


async def advisory_locks_held(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND d.datname = current_database()"
        ))
    finally:
        await conn.close()


# -- migrations


async def test_migrations_applied_and_recorded(store: PostgresStore, pg_url: str) -> None:
    names = [n for n, _ in MIGRATIONS]
    assert await store.applied_migrations() == names
    assert names[:3] == ["001_initial", "002_summaries", "003_rate_events"]
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT name, applied_at FROM _migrations ORDER BY name")
        indexes = {r[0] for r in await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
    finally:
        await conn.close()
    assert [r["name"] for r in rows] == names
    assert all(r["applied_at"].endswith("Z") for r in rows)
    assert {"conversations_user", "messages_conversation_id", "audit_user",
            "rate_events_user"} <= indexes


async def test_reopen_is_a_no_op(store: PostgresStore, pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        before = await conn.fetch("SELECT name, applied_at FROM _migrations ORDER BY name")
        again = PostgresStore(pg_url, pool_size=2)
        await again.open()
        await again.close()
        after = await conn.fetch("SELECT name, applied_at FROM _migrations ORDER BY name")
    finally:
        await conn.close()
    assert before == after


async def test_old_database_is_upgraded_not_dropped(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(MIGRATIONS_TABLE)
        for statement in MIGRATIONS[0].statements(POSTGRES):
            await conn.execute(statement)
        await conn.execute("INSERT INTO _migrations VALUES ($1, 'then')", MIGRATIONS[0][0])
        await conn.execute(
            "INSERT INTO conversations VALUES (1, 'telegram:1@dm', 'telegram', '1', 'dm', 't');"
            "INSERT INTO messages VALUES (1, 1, 'user', 'my name is Ana', 't');"
            "INSERT INTO audit (timestamp, platform, user_id, chat_id, conversation, provider,"
            " model, user_input, model_response, status, error) VALUES"
            " ('t', 'telegram', '1', 'c', 'telegram:1@dm', 'ollama', 'm', 'hi', 'yo', 'ok', '')"
        )
    finally:
        await conn.close()
    s = PostgresStore(pg_url, pool_size=2)
    await s.open()
    try:
        assert await s.applied_migrations() == [n for n, _ in MIGRATIONS]
        assert await s.recent_messages(await s.conversation_id(REF), 10) == [
            StoredMessage(1, "user", "my name is Ana")]
        [row] = await s.audit_log(10)
        assert (row["kind"], row["summary_used"], row["model_response"]) == ("chat", False, "yo")
    finally:
        await s.close()

async def test_concurrent_open_applies_each_migration_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url, pool_size=2) for _ in range(4)]
    try:
        await within(asyncio.gather(*(s.open() for s in stores)))
        for s in stores:
            assert await s.applied_migrations() == [n for n, _ in MIGRATIONS]
        conn = await asyncpg.connect(pg_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM _migrations") == len(MIGRATIONS)
        finally:
            await conn.close()
    finally:
        for s in stores:
            await s.close()


# -- opening


async def test_open_refused_is_one_clear_line_without_password() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s = PostgresStore(f"postgresql://bot:hunter2secret@127.0.0.1:{port}/bot", pool_size=2)
    with pytest.raises(StorageError) as err:
        await within(s.open())
    msg = str(err.value)
    assert "\n" not in msg and "hunter2secret" not in msg
    assert f"postgresql://bot:***@127.0.0.1:{port}/bot" in msg
    assert "ConnectionRefusedError" in msg


@pytest.mark.parametrize("url", [
    "postgresql://bot:hunter2secret@127.0.0.1:notaport/bot",
    "postgresql://postgres:hunter2secret@127.0.0.1:5432/no_such_db_here",
    "postgresql://postgres@127.0.0.1:5432/no_such_db_here?password=hunter2secret",
])
async def test_open_bad_url_or_database(url: str) -> None:
    with pytest.raises(StorageError) as err:
        await within(open_store(url, pool_size=2).open())
    msg = str(err.value)
    assert msg.startswith("cannot use database postgresql://")
    assert "\n" not in msg and "hunter2secret" not in msg


async def test_pool_of_one_is_refused() -> None:
    # Refused before connecting: one connection could deadlock a lock holder.
    with pytest.raises(StorageError, match="at least 2"):
        await PostgresStore("postgresql://postgres@127.0.0.1/postgres", pool_size=1).open()


async def test_unreachable_test_server_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:1/postgres")
    with pytest.raises(ServerUnreachable, match=r"cannot be used.*pg_ctlcluster"):
        await within(fresh_database())


# -- conversations and messages


async def test_conversation_ids_are_shared_and_stable(
    store: PostgresStore, second: PostgresStore
) -> None:
    a, b = await asyncio.gather(store.conversation_id(REF), second.conversation_id(REF))
    assert a == b == await store.conversation_id(REF)
    assert await second.conversation_id(OTHER) != a


async def test_messages_recent_range_and_counts(store: PostgresStore) -> None:
    conv = await store.conversation_id(REF)
    other = await store.conversation_id(OTHER)
    for i in range(5):
        await store.save_exchange(conv, f"q{i} 你好", f"a{i} 😀👍🏽", audit())
    await store.save_exchange(other, "elsewhere", "reply", audit(OTHER))
    everything = await store.recent_messages(conv, 100)
    assert [m.content for m in everything] == [
        s for i in range(5) for s in (f"q{i} 你好", f"a{i} 😀👍🏽")]
    assert [m.role for m in everything[:2]] == ["user", "assistant"]
    ids = [m.id for m in everything]
    assert ids == sorted(ids)
    newest = await store.recent_messages(conv, 3)
    assert newest == everything[-3:]
    assert await store.recent_messages(conv, 100, after_id=ids[5]) == everything[6:]
    assert await store.recent_messages(conv, 2, after_id=ids[5]) == everything[-2:]
    assert await store.recent_messages(conv, 0) == []
    assert await store.messages_range(conv, ids[1], ids[4]) == everything[2:5]
    assert await store.count_messages(conv) == 10
    assert await store.count_messages(other) == 2
    assert await store.reset_conversation(conv) == 10
    assert await store.count_messages(conv) == 0
    assert await store.count_messages(other) == 2
    assert await store.reset_conversation(conv) == 0


async def test_save_exchange_is_atomic(store: PostgresStore) -> None:
    conv = await store.conversation_id(REF)
    with pytest.raises(asyncpg.DataError):  # the audit insert fails after both messages
        await store.save_exchange(conv, "q", "a", audit(prompt_tokens=2**63))
    assert await store.count_messages(conv) == 0
    assert await store.audit_log(10) == []
    audit_id = await store.save_exchange(conv, "q", "a", audit(prompt_tokens=12))
    assert await store.count_messages(conv) == 2
    assert [r["id"] for r in await store.audit_log(10)] == [audit_id]


# -- summaries


async def test_summary_written_only_while_its_messages_exist(store: PostgresStore) -> None:
    conv = await store.conversation_id(REF)
    assert await store.summary(conv) is None
    await store.save_exchange(conv, "q", "a", audit())
    upto = (await store.recent_messages(conv, 1))[0].id
    assert await store.save_summary(conv, "摘要 one", upto)
    first = await store.summary(conv)
    assert first is not None and (first.text, first.upto_id) == ("摘要 one", upto)
    assert await store.save_summary(conv, "two", upto)  # replaced whole
    second = await store.summary(conv)
    assert second is not None and second.text == "two"
    assert not await store.save_summary(conv, "other conversation's", upto + 1000)
    await store.reset_conversation(conv)
    assert await store.summary(conv) is None
    assert not await store.save_summary(conv, "after reset", upto)
    assert await store.summary(conv) is None


async def test_reset_in_flight_wins_over_summary(store: PostgresStore, pg_url: str) -> None:
    """A summary saved while a /reset is uncommitted waits, then is not written."""
    conv = await store.conversation_id(REF)
    await store.save_exchange(conv, "q", "a", audit())
    upto = (await store.recent_messages(conv, 1))[0].id
    resetting = await asyncpg.connect(pg_url)  # another process, mid-reset
    try:
        tx = resetting.transaction()
        await tx.start()
        await resetting.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conv)
        await resetting.execute("DELETE FROM messages WHERE conversation_id = $1", conv)
        await resetting.execute("DELETE FROM summaries WHERE conversation_id = $1", conv)
        saving = asyncio.create_task(store.save_summary(conv, "stale", upto))
        blocked = asyncio.create_task(wait_until_blocked(pg_url))
        done, _ = await asyncio.wait({saving, blocked}, return_when=asyncio.FIRST_COMPLETED)
        assert blocked in done, "save_summary did not wait for the reset in flight"
        await tx.commit()
        assert await within(saving) is False
    finally:
        await resetting.close()
    assert await store.summary(conv) is None


async def test_forget_in_flight_wins_over_summary(store: PostgresStore) -> None:
    conv = await store.conversation_id(REF)
    await store.save_exchange(conv, "q", "a", audit())
    upto = (await store.recent_messages(conv, 1))[0].id
    await store.forget_user(REF.platform, REF.user_id)
    assert not await store.save_summary(conv, "ghost", upto)


# -- settings and the audit log


async def test_user_model(store: PostgresStore) -> None:
    assert await store.user_model("telegram", "1") is None
    await store.set_user_model("telegram", "1", "llama3.2")
    await store.set_user_model("telegram", "2", "qwen")
    await store.set_user_model("telegram", "1", "mistral")
    assert await store.user_model("telegram", "1") == "mistral"
    assert await store.user_model("telegram", "2") == "qwen"
    assert await store.user_model("discord", "1") is None


async def test_audit_log_order_limit_filter(store: PostgresStore) -> None:
    conv = await store.conversation_id(REF)
    await store.save_audit(audit(user_input="one", status="rejected", error="rate limited"))
    await store.save_exchange(conv, "two", "réponse 🎉", audit(
        user_input="two", model_response="réponse 🎉", response_time=0.1 + 0.2,
        first_token_time=1 / 3, prompt_tokens=40, completion_tokens=7, history_messages=4,
        summary_used=True))
    await store.save_audit(audit(OTHER, user_input="three"))
    await store.save_audit(audit(user_input="four", kind="summary"))
    rows = await store.audit_log(10)
    assert [r["user_input"] for r in rows] == ["one", "two", "three", "four"]
    assert list(rows[0]) == ["id", *AUDIT_COLUMNS]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    two = rows[1]
    assert two["summary_used"] is True and rows[0]["summary_used"] is False
    assert (two["response_time"], two["first_token_time"]) == (0.1 + 0.2, 1 / 3)
    assert (two["prompt_tokens"], two["completion_tokens"], two["history_messages"]) == (40, 7, 4)
    assert rows[0]["response_time"] is None and rows[0]["prompt_tokens"] is None
    assert two["model_response"] == "réponse 🎉" and two["kind"] == "chat"
    assert [r["user_input"] for r in await store.audit_log(2)] == ["three", "four"]
    assert [r["user_input"] for r in await store.audit_log(10, "telegram:1")] == [
        "one", "two", "four"]
    assert [r["user_input"] for r in await store.audit_log(1, "telegram:1")] == ["four"]
    assert await store.audit_log(10, "telegram:nobody") == []
    assert await store.audit_log(0) == []
    json.dumps(rows, ensure_ascii=False)  # `memorybot logs --json` prints these
    stats = await store.audit_rows_for_stats()
    assert sorted(r["model"] for r in stats) == ["llama3.2", "llama3.2"]  # chats, not rejected
    assert set(stats[0]) == {"provider", "model", "status", "response_time",
                             "first_token_time", "prompt_tokens", "completion_tokens",
                             "est_prompt_tokens", "est_completion_tokens"}


async def test_forget_user(store: PostgresStore) -> None:
    conv = await store.conversation_id(REF)
    other = await store.conversation_id(OTHER)
    place = await store.conversation_id(ConversationRef("telegram:1@g5", "telegram", "1", "g5"))
    for c, ref in ((conv, REF), (other, OTHER), (place, REF)):
        await store.save_exchange(c, "q", "a", audit(ref))
    await store.save_summary(conv, "s", (await store.recent_messages(conv, 1))[0].id)
    await store.set_user_model("telegram", "1", "m")
    await store.set_user_model("discord", "2", "m")
    await store.set_conversation_persona(REF, "teacher")  # /persona: forgotten too
    await store.save_audit(audit(status="rejected"))
    await store.rate_hit("telegram:1", 10, 60)
    await store.rate_hit("discord:2", 10, 60)
    counts = await store.forget_user("telegram", "1")
    assert counts == {"notes": 0, "messages": 4, "summaries": 1, "conversations": 2,
                      "user_settings": 1, "audit": 3, "conversation_settings": 1}
    assert await store.audit_log(10, "telegram:1") == []
    assert await store.user_model("telegram", "1") is None
    assert await store.table_counts() == {"conversations": 1, "messages": 2, "summaries": 0,
                                          "user_settings": 1, "audit": 1,
                                          "model_info": 0, "conversation_settings": 0,
                                          "place_settings": 0, "notes": 0}
    async with store.pool.acquire() as conn:
        keys = [r[0] for r in await conn.fetch("SELECT user_key FROM rate_events")]
    assert keys == ["discord:2"]
    # The forgotten user starts over with a new conversation.
    assert await store.conversation_id(REF) not in (conv, place)


# -- the conversation lock


async def test_conversation_lock_excludes_another_process(
    store: PostgresStore, second: PostgresStore, pg_url: str
) -> None:
    entered: list[str] = []
    async with store.conversation_lock(REF.key, 5):
        started = time.monotonic()
        with pytest.raises(StorageError, match="busy"):
            async with second.conversation_lock(REF.key, 0.3):
                entered.append("too early")
        assert 0.25 < time.monotonic() - started < BOUND
        async with second.conversation_lock(OTHER.key, 0.3):  # other keys are free
            entered.append("other")

        async def waiter() -> None:
            async with second.conversation_lock(REF.key, BOUND):
                entered.append("after release")

        task = asyncio.create_task(waiter())
        await wait_until_blocked(pg_url)
        entered.append("releasing")
    await within(task)
    assert entered == ["other", "releasing", "after release"]
    assert await advisory_locks_held(pg_url) == 0


async def test_turns_across_processes_run_in_order_exactly_once(
    store: PostgresStore, second: PostgresStore
) -> None:
    """Load → (model) → persist under the lock: no turn sees a stale history."""
    conv = await store.conversation_id(REF)

    async def turn(s: Store) -> None:
        async with s.conversation_lock(REF.key, BOUND):
            seen = await s.count_messages(conv)
            await asyncio.sleep(0)  # the model call: let the other "process" run
            await s.save_exchange(conv, str(seen), "a", audit())

    await within(asyncio.gather(*(turn(s) for _ in range(6) for s in (store, second))))
    users = [m.content for m in await store.recent_messages(conv, 100) if m.role == "user"]
    assert users == [str(2 * i) for i in range(12)]


async def test_cancelled_waiter_leaves_no_lock(
    store: PostgresStore, second: PostgresStore, pg_url: str
) -> None:
    async def waiter() -> None:
        async with second.conversation_lock(REF.key, BOUND):
            raise AssertionError("a cancelled waiter must not enter")

    async with store.conversation_lock(REF.key, BOUND):
        task = asyncio.create_task(waiter())
        await wait_until_blocked(pg_url)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(task)
    async with second.conversation_lock(REF.key, 1):  # free at once
        pass
    assert await advisory_locks_held(pg_url) == 0
    assert second.pool.get_idle_size() == second.pool.get_size()


async def test_lock_released_when_the_turn_fails_or_is_cancelled(
    store: PostgresStore, second: PostgresStore, pg_url: str
) -> None:
    with pytest.raises(RuntimeError):
        async with store.conversation_lock(REF.key, 1):
            raise RuntimeError("model failed")
    holding = asyncio.Event()

    async def holder() -> None:
        async with store.conversation_lock(REF.key, 1):
            holding.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(holder())
    await within(holding.wait())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    async with second.conversation_lock(REF.key, 1):
        pass
    assert await advisory_locks_held(pg_url) == 0


async def test_lock_holder_never_starves_the_pool(pg_url: str) -> None:
    small = PostgresStore(pg_url, pool_size=2)  # one lock connection + one for queries
    await small.open()
    try:
        async with asyncio.timeout(BOUND), small.conversation_lock(REF.key, 1):
            conv = await small.conversation_id(REF)
            await small.save_exchange(conv, "q", "a", audit())
            assert len(await small.recent_messages(conv, 10)) == 2
            with pytest.raises(StorageError, match="DB_POOL_SIZE"):
                async with small.conversation_lock(OTHER.key, 0.2):
                    pass
        async with small.conversation_lock(OTHER.key, 1):
            pass
    finally:
        await small.close()


# -- the rate limit


async def test_rate_hit_counts_across_processes(
    store: PostgresStore, second: PostgresStore
) -> None:
    user = "telegram:7"
    assert [await s.rate_hit(user, 3, 60) for s in (store, second, store)] == [0, 0, 0]
    wait = await second.rate_hit(user, 3, 60)
    assert 55 < wait <= 60
    assert await store.rate_hit(user, 3, 60) > 0
    assert await store.rate_hit("telegram:8", 3, 60) == 0
    async with store.pool.acquire() as conn:  # refused hits are not recorded
        assert await conn.fetchval(
            "SELECT count(*) FROM rate_events WHERE user_key = $1", user) == 3


async def test_rate_burst_from_two_processes_admits_exactly_the_limit(
    store: PostgresStore, second: PostgresStore
) -> None:
    waits = await within(asyncio.gather(
        *(s.rate_hit("telegram:9", 5, 60) for _ in range(12) for s in (store, second))))
    assert sum(1 for w in waits if w == 0) == 5


async def test_rate_window_moves(store: PostgresStore) -> None:
    user = "telegram:7"
    async with store.pool.acquire() as conn:
        now = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
        await conn.executemany("INSERT INTO rate_events (user_key, at) VALUES ($1, $2)",
                               [(user, now - 58), (user, now - 30), (user, now - 10)])
        wait = await store.rate_hit(user, 3, 60)
        assert 1 < wait <= 2  # the oldest leaves the window in two seconds
        await conn.execute("UPDATE rate_events SET at = at - 3 WHERE at < $1", now - 57)
        assert await store.rate_hit(user, 3, 60) == 0  # it has left: allowed, and deleted
        assert await conn.fetchval(
            "SELECT count(*) FROM rate_events WHERE user_key = $1", user) == 3


async def test_old_rate_events_are_pruned(
    store: PostgresStore, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def plant() -> None:
        async with store.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO rate_events (user_key, at)"
                " VALUES ('gone:1', extract(epoch FROM clock_timestamp()) - 7200)")

    async def left() -> list[str]:
        async with store.pool.acquire() as conn:
            return [r[0] for r in await conn.fetch("SELECT user_key FROM rate_events")]

    await plant()
    reopened = PostgresStore(pg_url, pool_size=2)  # pruned at open
    await reopened.open()
    await reopened.close()
    assert await left() == []
    await plant()
    monkeypatch.setattr(pgs, "RATE_PRUNE_EVERY", 2)  # and every so many hits
    await store.rate_hit("telegram:1", 5, 60)
    assert "gone:1" in await left()
    await store.rate_hit("telegram:1", 5, 60)
    assert await left() == ["telegram:1", "telegram:1"]


# -- the recent-messages query plan


async def test_recent_messages_uses_the_index(store: PostgresStore) -> None:
    async with store.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO conversations (key, platform, user_id, place, created_at)"
            " SELECT 'k' || g, 'p', g::text, 'dm', 'x' FROM generate_series(1, 200) g;"
            "INSERT INTO messages (conversation_id, role, content, created_at)"
            " SELECT 1 + g % 200, 'user', repeat('m', 50), 'x' FROM generate_series(1, 20000) g;"
            "ANALYZE conversations; ANALYZE messages;"
        )
        plan = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) " + POSTGRES_QUERIES.recent_messages, 7, 0, 50)
    text = plan if isinstance(plan, str) else json.dumps(plan)
    assert '"Index Name": "messages_conversation_id"' in text, text
    assert '"Seq Scan"' not in text and '"Sort"' not in text, text


# -- copy-db


async def populate(store: Store) -> None:
    """Every table, every column kind: Unicode, None, floats, booleans, id gaps."""
    a = await store.conversation_id(REF)
    b = await store.conversation_id(OTHER)
    gone = await store.conversation_id(ConversationRef("telegram:1@g5", "telegram", "1", "g5"))
    for i in range(4):
        await store.save_exchange(a, f"q{i} 你好 «»", f"a{i} 😀\n```py\nx = {i}\n```", audit(
            response_time=i / 3, first_token_time=None if i % 2 else 0.1 * i,
            prompt_tokens=None if i == 0 else 100 * i, completion_tokens=i,
            history_messages=2 * i, summary_used=bool(i % 2)))
    await store.save_exchange(gone, "to be reset", "ok", audit())
    await store.reset_conversation(gone)  # leaves a gap in message ids
    await store.save_exchange(b, "Grüße", "¡hola! 🦀", audit(OTHER, model="qwen"))
    await store.save_audit(audit(status="rejected", error="rate limited", user_input="x" * 500))
    await store.save_audit(audit(kind="summary", model_response="摘要"))
    upto = (await store.recent_messages(a, 3))[0].id
    assert await store.save_summary(a, "Summary: 用户 likes 🦀", upto)
    for platform, user, model in (("telegram", "1", "llama3.2"), ("discord", "2", "qwen"),
                                  ("discord", "10", "mistral"), ("a", "z", "phi")):
        await store.set_user_model(platform, user, model)


async def dump(store: Store, batch: int = 2) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for table in TABLES:
        rows = [r async for chunk in store.export_rows(table, batch) for r in chunk]
        key = PRIMARY_KEYS[table]
        out[table] = sorted(rows, key=lambda r, key=key: tuple(r[c] for c in key))
    return out


async def copy(src: Store, dst: Store, batch: int = 2) -> None:
    for table in TABLES:
        async for rows in src.export_rows(table, batch):
            assert 0 < len(rows) <= batch
            await dst.import_rows(table, rows)
    await dst.finish_import()


async def test_export_import_between_two_postgres_databases(store: PostgresStore) -> None:
    await populate(store)
    dst_url = await fresh_database()
    dst = PostgresStore(dst_url, pool_size=2)
    try:
        await dst.open()
        await copy(store, dst)
        want = await dump(store)
        assert await dump(dst, batch=1000) == want
        assert await dst.table_counts() == await store.table_counts()
        assert all(type(r["summary_used"]) is int for r in want["audit"])  # as SQLite's
        # New rows continue after the copied ids.
        conv = await dst.conversation_id(ConversationRef("new:1@dm", "new", "1", "dm"))
        assert conv > max(r["id"] for r in want["conversations"])
        audit_id = await dst.save_exchange(conv, "q", "a", audit())
        assert audit_id > max(r["id"] for r in want["audit"])
        new_ids = [m.id for m in await dst.recent_messages(conv, 10)]
        assert min(new_ids) > max(r["id"] for r in want["messages"])
    finally:
        await dst.close()
        await drop_database(dst_url)


async def test_copy_sqlite_to_postgres_and_back(
    store: PostgresStore, tmp_path: Path
) -> None:
    lite = SQLiteStore(str(tmp_path / "src.db"))
    back = SQLiteStore(str(tmp_path / "back.db"))
    await lite.open()
    await back.open()
    try:
        await populate(lite)
        want = await dump(lite)
        await copy(lite, store)
        assert await dump(store) == want
        await copy(store, back)
        assert await dump(back) == want
        # The copy behaves like the original, not just looks like it.
        for s in (lite, store, back):
            conv = await s.conversation_id(REF)
            summary = await s.summary(conv)
            assert summary is not None
            assert [m.content for m in await s.recent_messages(conv, 10, summary.upto_id)] \
                == ["q3 你好 «»", "a3 😀\n```py\nx = 3\n```"]
    finally:
        await lite.close()
        await back.close()


async def test_copy_db_command_both_ways(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src_url = f"sqlite:///{tmp_path / 'src.db'}"
    back_url = f"sqlite:///{tmp_path / 'back.db'}"
    lite = SQLiteStore(str(tmp_path / "src.db"))
    await lite.open()
    await populate(lite)
    want = await dump(lite)
    await lite.close()
    assert await copy_db(src_url, pg_url) == 0
    assert await copy_db(pg_url, back_url) == 0
    out = capsys.readouterr().out
    assert "copy verified" in out and "words index rebuilt" in out
    back = SQLiteStore(str(tmp_path / "back.db"))
    await back.open()
    pg = PostgresStore(pg_url, pool_size=2)
    await pg.open()
    try:
        assert await dump(back) == want
        # The recall index is not copied but rebuilt: every copied message is findable.
        for s in (pg, back):
            assert await s.count_missing(None) == 0
            conv = await s.conversation_id(REF)
            hits = await s.recall_search(conv, ["q3"], 10**9, 5)
            assert [m.content for m in await s.messages_range(conv, hits[0][0] - 1,
                                                              hits[0][0])] == ["q3 你好 «»"]
    finally:
        await back.close()
        await pg.close()
    with pytest.raises(StorageError, match="not empty"):
        await copy_db(src_url, pg_url)


# -- the same behaviour as SQLite


async def transcript(store: Store) -> list[Any]:
    """Every return value of one scripted session, timestamps masked."""
    out: list[Any] = []
    ts = "2025-01-02T03:04:05.678Z"
    a = await store.conversation_id(REF)
    b = await store.conversation_id(OTHER)
    out += [a, b, await store.conversation_id(REF)]
    for i in range(3):
        out.append(await store.save_exchange(b, f"b{i}", f"rb{i} 🐍", audit(OTHER, timestamp=ts)))
    for i in range(4):
        out.append(await store.save_exchange(a, f"q{i} 你好", f"a{i}", audit(
            timestamp=ts, response_time=i / 7, summary_used=i == 2, prompt_tokens=i or None)))
    out.append(await store.save_audit(audit(timestamp=ts, status="rejected", error="x")))
    out.append(await store.save_audit(audit(OTHER, timestamp=ts, kind="summary")))
    out += [await store.recent_messages(a, 3), await store.recent_messages(a, 100, 9),
            await store.recent_messages(a, -1), await store.messages_range(a, 8, 11),
            await store.count_messages(a), await store.count_messages(b)]
    upto = (await store.recent_messages(b, 2))[0].id
    of_a = (await store.recent_messages(a, 1))[0].id
    out += [await store.save_summary(b, "sb", upto), await store.save_summary(b, "sb2", upto),
            await store.save_summary(b, "wrong conversation", of_a)]
    summary = await store.summary(b)
    out.append(summary and (summary.text, summary.upto_id))
    out += [await store.reset_conversation(b), await store.summary(b),
            await store.save_summary(b, "after reset", upto), await store.reset_conversation(b)]
    await store.set_user_model("telegram", "1", "m1")
    await store.set_user_model("telegram", "1", "m2")
    out += [await store.user_model("telegram", "1"), await store.user_model("telegram", "2")]
    for limit, user in ((100, None), (2, None), (-1, None), (0, None), (10, "telegram:1"),
                        (10, "discord:2"), (10, "telegram"), (10, "")):
        out.append(await store.audit_log(limit, user))
    stats = await store.audit_rows_for_stats()
    out.append(sorted(stats, key=lambda r: json.dumps(r, sort_keys=True)))
    out += [await store.table_counts(), await store.forget_user("telegram", "1"),
            await store.forget_user("telegram", "1"), await store.table_counts()]
    return out


async def test_same_behaviour_as_sqlite(store: PostgresStore, tmp_path: Path) -> None:
    lite = SQLiteStore(str(tmp_path / "bot.db"))
    await lite.open()
    try:
        want = await transcript(lite)
    finally:
        await lite.close()
    assert await transcript(store) == want


async def test_turn_context_in_one_query_matches_separate_reads(store: PostgresStore) -> None:
    from bot.store import Store

    conv = await store.conversation_id(REF)
    for i in range(6):
        await store.save_exchange(conv, f"q{i}", f"a{i}", audit())
    msgs = await store.recent_messages(conv, 100)
    await store.save_summary(conv, "User is Ana.", msgs[3].id)
    await store.set_user_model(REF.platform, REF.user_id, "qwen2.5")
    for with_summary in (True, False):
        for limit in (5, 100):
            one = await store.turn_context(conv, REF.platform, REF.user_id, limit, with_summary)
            three = await Store.turn_context(store, conv, REF.platform, REF.user_id, limit,
                                             with_summary)
            assert one == three
    ctx = await store.turn_context(conv, "nobody", "0", 5, True)
    assert ctx.model_choice is None and ctx.summary is not None


# -- round trips of a turn (the performance issue: ≤ 4 per chat exchange)


# Advisory locks in this test's database (the server is shared with other databases).
_ADVISORY_HERE = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                  "(SELECT oid FROM pg_database WHERE datname = current_database())")


class _CountedProtocol:
    """An asyncpg protocol whose requests that wait for the server are recorded."""

    TRIPS = frozenset({"query", "prepare", "bind_execute", "bind_execute_many", "bind",
                       "execute", "close_statement", "copy_in", "copy_out"})

    def __init__(self, protocol: Any, seen: list[str]) -> None:
        self._p, self._seen = protocol, seen

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._p, name)
        if name not in self.TRIPS:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else kwargs.get("state", kwargs.get("query", "?"))
            query = first if name == "query" else getattr(first, "query", first)
            self._seen.append(" ".join(str(query).split())[:60])
            return attr(*args, **kwargs)
        return counted


async def test_a_turn_counts_its_round_trips_and_leaves_no_session_state(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    class Counting(pgs._Connection):
        def __init__(self, protocol: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(protocol, *args, **kwargs)
            self._protocol = _CountedProtocol(protocol, seen)

    monkeypatch.setattr(pgs, "_Connection", Counting)
    s = PostgresStore(pg_url, pool_size=3)
    await s.open()
    try:
        first = await s.conversation_id(REF)  # the conversation exists (a returning user)
        for n in range(3):  # the first turn prepares its statements; later ones reuse them
            seen.clear()
            async with asyncio.timeout(BOUND), s.conversation_lock(REF.key, BOUND):
                conv = await s.conversation_id(REF)
                context = await s.turn_context(conv, "telegram", "1", 50, with_summary=False)
                notes = await s.notes(conv)  # read with the context
                hits = await s.recall_search(conv, ["q0"], 10**9, 50)
                near = await s.recall_around(conv, [h[0] for h in hits], 10**9)  # with it
                await s.save_exchange(conv, f"q{n}", f"a{n}", audit(user_input=f"q{n}"))
        # Issue 18's bar of 4: lock + id; context + notes; the recall search with its
        # hits' neighbours; the exchange's writes with the unlock.
        assert conv == first
        assert [m.content for m in context.history] == ["q0", "a0", "q1", "a1"]
        assert notes == [] and [a.hit.content for a in near] == ["q0"]
        assert near[0].after is not None and near[0].after.content == "a0"
        assert len(seen) == 4, seen
        assert seen[0].startswith("SELECT set_config('lock_timeout'"), seen
        assert seen[3].startswith("WITH g AS (SELECT conv, unlocked FROM memorybot_save_g"), seen
        assert not any("RESET" in q for q in seen), seen
    finally:
        await s.close()
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT role, content FROM messages ORDER BY id")
        assert [(r["role"], r["content"]) for r in rows][-2:] == [("user", "q2"),
                                                                  ("assistant", "a2")]
        assert await conn.fetchval("SELECT count(*) FROM audit") == 3
        # Each stored message is findable: its terms and its postings.
        assert await conn.fetchval("SELECT count(*) FROM recall_terms") == 6
        assert await conn.fetchval(
            "SELECT count(*) FROM recall_postings WHERE term IN ('q2', 'a2')") == 2
        # No reset on release, yet no advisory lock outlives its turn (the pool is closed,
        # so also none of a session that was not reset).
        assert await conn.fetchval(_ADVISORY_HERE) == 0
    finally:
        await conn.close()


async def test_lock_connection_restores_lock_timeout_for_the_next_borrower(
        pg_url: str) -> None:
    s = PostgresStore(pg_url, pool_size=2)  # one lock connection, reused by the next call
    await s.open()
    try:
        async with asyncio.timeout(BOUND):
            async with s.conversation_lock(REF.key, 3.0):
                async with s._conn() as conn:
                    held = await conn.fetchval("SHOW lock_timeout")
                    locks = await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                        "AND pid = pg_backend_pid()")
            async with s.pool.acquire() as a, s.pool.acquire() as b:
                after = {await a.fetchval("SHOW lock_timeout"),
                         await b.fetchval("SHOW lock_timeout")}
                left = await a.fetchval(_ADVISORY_HERE)
    finally:
        await s.close()
    # Inside the turn its own call ran on the lock connection, with the wait's bound.
    assert held != "0" and locks == 1
    assert after == {"0"} and left == 0


def _kill_from_a_thread(url: str, pid: int) -> None:
    """End a server session and wait for it to be gone, blocking the caller's loop."""
    async def kill() -> bool:
        conn = await asyncpg.connect(url)
        try:
            return bool(await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", pid))
        finally:
            await conn.close()

    done: list[bool] = []
    worker = threading.Thread(target=lambda: done.append(asyncio.run(kill())))
    worker.start()
    worker.join(BOUND)
    assert done == [True]


async def test_a_save_on_a_killed_lock_session_is_stored_through_the_pool(
        pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # The save would end the lock on its session; that session is gone (whether the
    # client has noticed yet or not): the exchange is stored once, through the pool,
    # and the lost lock reported once per turn.
    s = PostgresStore(pg_url, pool_size=3)
    await s.open()
    admin = await asyncpg.connect(pg_url)
    try:
        conv = await s.conversation_id(REF)
        with caplog.at_level("WARNING", logger="storage.postgres_store"):
            for n in range(3):
                async with asyncio.timeout(BOUND), s.conversation_lock(REF.key, BOUND):
                    turn = s._current_turn()
                    assert turn is not None
                    pid = turn.conn.get_server_pid()
                    if n == 0:  # the client has seen its socket close
                        assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)",
                                                    pid)
                    else:  # it has not: killed from a thread while this loop is blocked
                        _kill_from_a_thread(pg_url, pid)
                    assert await s.save_exchange(conv, f"q{n}", f"a{n}", audit()) > 0
        rows = await admin.fetch("SELECT content FROM messages ORDER BY id")
        assert [r["content"] for r in rows] == ["q0", "a0", "q1", "a1", "q2", "a2"]
        assert await admin.fetchval("SELECT count(*) FROM audit") == 3
        assert await admin.fetchval("SELECT count(*) FROM recall_postings") == 6
        lost = [r for r in caplog.records if "was lost" in r.getMessage()]
        assert len(lost) == 3
        assert await admin.fetchval(_ADVISORY_HERE) == 0
    finally:
        await admin.close()
        await s.close()
