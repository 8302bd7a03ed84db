"""PostgreSQL faults: two summarisers of one conversation, a killed lock connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import asyncpg
import pytest

from bot.app import open_service
from bot.records import AuditRecord, ConversationRef
from storage import open_store
from storage.postgres_store import PostgresStore
from tests.conftest import SettingsFactory, incoming
from tests.fakes.model_server import ModelServer
from tests.pg import pg_url  # noqa: F401  (a fresh database per test)
from tests.test_faults import collect, hold_summaries, talk_until_a_summary_runs
from tests.test_memory import is_summary_call

REF = ConversationRef("console:1@dm", "console", "1", "dm")


@pytest.fixture
async def two_stores(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:  # noqa: F811
    one, two = open_store(pg_url, pool_size=3), open_store(pg_url, pool_size=3)
    assert isinstance(one, PostgresStore) and isinstance(two, PostgresStore)
    await one.open()
    await two.open()
    try:
        yield one, two
    finally:
        await one.close()
        await two.close()


async def test_one_summariser_per_conversation_across_processes(
    two_stores: tuple[PostgresStore, PostgresStore],
) -> None:
    one, two = two_stores
    conv = await one.conversation_id(REF)
    async with one.summary_lock(conv) as first:
        async with two.summary_lock(conv) as second:
            assert (first, second) == (True, False)  # the other process skips
        async with two.summary_lock(conv + 1) as other_conversation:
            assert other_conversation  # per conversation, not global
    async with two.summary_lock(conv) as after:
        assert after  # released with the pass


async def test_a_second_process_does_not_call_the_model_while_one_summarises(
    model_server: ModelServer, make_settings: SettingsFactory, pg_url: str,  # noqa: F811
) -> None:
    entered, release = hold_summaries(model_server)
    settings = make_settings(DATABASE_URL=pg_url, CONTEXT_TOKENS=300, REPLY_TOKENS=60)
    async with open_service(settings) as a, open_service(settings) as b:
        ref = a.conversation_ref(incoming("x"))
        await talk_until_a_summary_runs(a, entered)
        conv = await b.store.conversation_id(ref)
        calls = sum(map(is_summary_call, model_server.requests))
        # The other process's summariser finds the conversation taken and skips it.
        assert await b.memory.summarize(conv, ref, "c", settings.LLM_MODEL) is False
        assert sum(map(is_summary_call, model_server.requests)) == calls == 1
        release.set()
        async with asyncio.timeout(10):
            await a.memory.wait_idle()
        summary = await b.store.summary(conv)
    assert summary is not None and "my name is Ana" in summary.text


async def test_a_killed_lock_connection_does_not_turn_a_stored_reply_into_an_error(
    model_server: ModelServer, make_settings: SettingsFactory, pg_url: str,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(DATABASE_URL=pg_url)
    admin = await asyncpg.connect(pg_url)
    try:
        async with open_service(settings) as svc:
            model_server.gate = asyncio.Event()
            turn = asyncio.create_task(collect(await svc.handle(incoming("still there?"))))
            await model_server.wait_for_requests(1)
            # The session holding the conversation's advisory lock dies.
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l"
                " JOIN pg_database d ON d.oid = l.database WHERE d.datname = current_database()"
                " AND l.locktype = 'advisory' AND l.granted AND l.pid != pg_backend_pid()")
            assert killed == 1
            model_server.gate.set()
            with caplog.at_level(logging.WARNING):
                async with asyncio.timeout(10):
                    seen = await turn
            # The next turn takes the lock afresh.
            again = await collect(await svc.handle(incoming("and now?")))
        rows = await admin.fetch("SELECT content FROM messages ORDER BY id")
        audit = await admin.fetch("SELECT user_input, status FROM audit ORDER BY id")
    finally:
        await admin.close()
    assert seen == "You said: still there?"  # stored, so no error is shown
    assert again.startswith("You said: and now?")
    assert [r["content"] for r in rows][:2] == ["still there?", "You said: still there?"]
    assert [tuple(r) for r in audit] == [("still there?", "ok"), ("and now?", "ok")]
    lost = [r for r in caplog.records if "was lost" in r.getMessage()]
    assert len(lost) == 1 and "console:1@dm" in lost[0].getMessage()  # reported, once
    assert not [r for r in caplog.records if r.exc_info]  # and no traceback


async def test_forget_of_another_user_does_not_wait_for_this_one(
    two_stores: tuple[PostgresStore, PostgresStore],
) -> None:
    """The erasure lock is per user: a forget never blocks other users' writes."""
    one, two = two_stores
    conv = await one.conversation_id(REF)
    record = AuditRecord(platform="console", user_id="1", chat_id="c",
                         conversation=REF.key, user_input="q")
    async with asyncio.timeout(5):
        await asyncio.gather(two.forget_user("console", "2"),
                             one.save_exchange(conv, "q", "a", record))
    assert await one.count_messages(conv) == 2
