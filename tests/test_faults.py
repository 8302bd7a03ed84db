"""Storage faults on both backends, and the helpers the PostgreSQL-only faults share.

Forget with work in flight, the first message after a forget, summaries that
never move back."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from bot import operator_commands
from bot.app import open_service
from bot.records import AuditRecord, ConversationRef
from bot.reply import Reply
from bot.service import ChatService
from bot.store import TABLES, Store
from storage import open_store
from tests.backends import db_url_both_backends  # noqa: F401  (SQLite and PostgreSQL)
from tests.conftest import SettingsFactory, ask, incoming
from tests.fakes.model_server import ModelServer, Recorded, echo_reply
from tests.test_memory import fake_summariser, is_summary_call

ME = "console:1"


async def collect(reply: Reply) -> str:
    out = []
    async with contextlib.aclosing(reply.deltas()) as deltas:
        async for delta in deltas:
            out.append(delta)
    return "".join(out)


def hold_summaries(model_server: ModelServer) -> tuple[asyncio.Event, asyncio.Event]:
    """(entered, release): a summary call sets `entered`, then waits for `release`;
    a reply echoes."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def held_summary(rec: Recorded) -> str:
        if is_summary_call(rec):
            entered.set()
            await release.wait()
            return fake_summariser(rec)
        return echo_reply(rec)

    model_server.reply = held_summary
    return entered, release


async def talk_until_a_summary_runs(svc: ChatService, entered: asyncio.Event) -> None:
    """A name, then filler until a summary call is under way (held at the model)."""
    await ask(svc, "my name is Ana")
    for i in range(50):
        await ask(svc, f"filler message number {i} " * 3)
        if svc.memory.busy:
            break
    async with asyncio.timeout(10):
        await entered.wait()


@contextlib.asynccontextmanager
async def other_process(url: str) -> Any:
    """A second store on the same database, as another process (the CLI) opens it."""
    store = open_store(url, pool_size=2)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def rows_of(store: Store, user_id: str) -> dict[str, list[dict[str, Any]]]:
    """Every row a user left, per table (messages and summaries by their conversation)."""
    found: dict[str, list[dict[str, Any]]] = {t: [] for t in TABLES}
    convs: set[int] = set()
    for table in TABLES:
        async for batch in store.export_rows(table):
            for r in batch:
                if r.get("user_id") == user_id or r.get("conversation_id") in convs:
                    found[table].append(r)
                    if table == "conversations":
                        convs.add(r["id"])
    return found


async def test_forget_while_a_reply_streams_leaves_nothing(
    model_server: ModelServer, make_settings: SettingsFactory, db_url: str
) -> None:
    settings = make_settings()
    async with open_service(settings) as svc:
        assert await ask(svc, "hello from two", user="2") == "You said: hello from two"
        assert await ask(svc, "my name is Ana") == "You said: my name is Ana"
        model_server.gate = asyncio.Event()
        turn = asyncio.create_task(collect(await svc.handle(incoming("my secret is 42"))))
        await model_server.wait_for_requests(3)  # the reply is held at the model
        # The operator's command, on its own connection (as another process).
        assert await operator_commands.forget(settings, ME) == 0
        model_server.gate.set()
        async with asyncio.timeout(10):
            seen = await turn
    assert seen.startswith("You said: my secret is 42")  # the user saw the reply in flight
    assert model_server.requests[-1].last_user_message == "my secret is 42"
    async with other_process(db_url) as store:
        left = await rows_of(store, "1")
        assert left == {t: [] for t in TABLES}
        assert await store.audit_log(100, ME) == []
        others = await rows_of(store, "2")  # another user's memory is untouched
    assert [m["content"] for m in others["messages"]] == ["hello from two",
                                                         "You said: hello from two"]


async def test_forget_while_a_summary_runs_leaves_nothing(
    model_server: ModelServer, make_settings: SettingsFactory, db_url: str
) -> None:
    entered, release = hold_summaries(model_server)
    settings = make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60)
    async with open_service(settings) as svc:
        await talk_until_a_summary_runs(svc, entered)
        assert await operator_commands.forget(settings, ME) == 0
        release.set()
        async with asyncio.timeout(10):
            await svc.memory.wait_idle()
    summary_calls = [r for r in model_server.requests if is_summary_call(r)]
    assert summary_calls and "my name is Ana" in summary_calls[0].last_user_message
    async with other_process(db_url) as store:
        assert await rows_of(store, "1") == {t: [] for t in TABLES}
        assert await store.audit_log(100, ME) == []  # no summary record with the transcript


async def test_first_message_after_a_forget_elsewhere_is_stored(
    make_settings: SettingsFactory, db_url: str
) -> None:
    """A turn that starts after the forget is stored, in a new conversation."""
    settings = make_settings()
    async with open_service(settings) as svc:
        assert await ask(svc, "before") == "You said: before"
        assert await operator_commands.forget(settings, ME) == 0
        # Another process erased it: this process's cached conversation id is stale.
        assert await ask(svc, "after") == "You said: after"
        assert await ask(svc, "and again") == "You said: and again"
    async with other_process(db_url) as store:
        left = await rows_of(store, "1")
    assert [m["content"] for m in left["messages"]] == [
        "after", "You said: after", "and again", "You said: and again"]
    assert [(a["user_input"], a["status"]) for a in left["audit"]] == [
        ("after", "ok"), ("and again", "ok")]
    assert len(left["conversations"]) == 1


async def test_forget_voids_records_of_turns_begun_before_it(db_url: str) -> None:
    """Store level, either backend: a write carrying a turn start before the
    erasure writes nothing; one begun after it is written."""
    ref = ConversationRef("telegram:7@dm", "telegram", "7", "dm")

    def record(text: str) -> AuditRecord:
        return AuditRecord(platform="telegram", user_id="7", chat_id="c",
                           conversation=ref.key, user_input=text)

    async with other_process(db_url) as bot, other_process(db_url) as cli:
        conv = await bot.conversation_id(ref)
        early = record("early")  # the turn began: its timestamp is taken now
        await cli.forget_user("telegram", "7")
        assert await bot.save_exchange(conv, "early", "reply", early) == 0
        assert await bot.save_audit(early) == 0
        late = record("late")
        assert await bot.save_exchange(conv, "late", "reply", late) > 0
        left = await rows_of(cli, "7")
        # The erasure itself keeps no readable trace of the user: a one-way hash.
        erasures = [tuple(r) for r in await cli._fetch("SELECT platform, user_id FROM erasures")]
    assert len(erasures) == 1 and erasures[0][0] == "telegram"
    assert erasures[0][1] != "7" and len(erasures[0][1]) == 64  # sha256 hex, not the id
    assert [m["content"] for m in left["messages"]] == ["late", "reply"]
    assert [a["user_input"] for a in left["audit"]] == ["late"]


async def test_a_summary_never_replaces_a_newer_one(db_url: str) -> None:
    ref = ConversationRef("telegram:8@dm", "telegram", "8", "dm")
    async with other_process(db_url) as one, other_process(db_url) as two:
        conv = await one.conversation_id(ref)
        for i in range(3):
            await one.save_exchange(conv, f"q{i}", f"a{i}", AuditRecord(
                platform="telegram", user_id="8", chat_id="c", conversation=ref.key,
                user_input=f"q{i}"))
        ids = [m.id for m in await one.recent_messages(conv, 10)]
        assert await one.save_summary(conv, "newer", ids[-1])
        # A slower summariser (the other process) finishes an older pass late.
        assert not await two.save_summary(conv, "older", ids[1])
        stored = await two.summary(conv)
        assert stored is not None and (stored.text, stored.upto_id) == ("newer", ids[-1])
        assert await two.save_summary(conv, "same, rewritten", ids[-1])

