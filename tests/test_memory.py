"""Memory beyond the window: rolling summaries, /memory, /reset, truncate."""

from __future__ import annotations

import asyncio
import re

from bot.app import open_service
from bot.memory import SUMMARY_INSTRUCTIONS
from bot.tokens import count_messages, count_tokens
from tests.backends import db_url_both_backends  # noqa: F401  (SQLite and PostgreSQL)
from tests.conftest import SettingsFactory, ask, incoming
from tests.fakes.model_server import ModelServer, Recorded, echo_reply, prompt_tokens

SUMMARY_MARK = SUMMARY_INSTRUCTIONS.split(".")[0]


def is_summary_call(rec: Recorded) -> bool:
    return rec.messages[0]["content"].startswith(("You keep the memory", "Shorten this"))


def fake_summariser(rec: Recorded) -> str:
    """What a good model would write: keep the facts the user stated."""
    text = rec.messages[-1]["content"]
    facts = dict.fromkeys(re.findall(r"my name is \w+|I like \w+|我叫\w+", text))
    return "\n".join(f"The user said: {f}." for f in facts) or "Nothing notable."


def reply_or_summary(rec: Recorded) -> str:
    return fake_summariser(rec) if is_summary_call(rec) else echo_reply(rec)


async def test_two_hundred_exchanges_keep_the_first_fact_within_budget(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.reply = reply_or_summary
    settings = make_settings(CONTEXT_TOKENS=512, REPLY_TOKENS=128)
    budget = settings.prompt_budget
    async with open_service(settings) as svc:
        await ask(svc, "my name is Ana and I like tea")
        for i in range(199):
            reply = await ask(svc, f"tell me something about topic number {i}, please")
            await asyncio.wait_for(svc.memory.wait_idle(), 5)
        conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x")))
        summary = await svc.store.summary(conv)
        stored = await svc.store.count_messages(conv)
        memory = await ask(svc, "/memory")
        rows = await svc.store.audit_log(1000)
    assert "Your name is Ana" in reply  # through the summary, 199 exchanges later
    chats = [r for r in model_server.requests if not is_summary_call(r)]
    assert len(chats) == 200
    assert "my name is Ana" in chats[-1].messages[0]["content"]  # the one system message
    assert all(count_messages(r.messages) <= budget for r in chats)
    assert all(prompt_tokens(r.messages) <= budget * 1.15 for r in chats)
    assert summary is not None and count_tokens(summary.text) <= settings.summary_cap
    assert stored == 400  # the messages themselves are kept
    assert "400" in memory and "my name is Ana" in memory
    summaries = [r for r in rows if r["kind"] == "summary"]
    assert summaries and all(r["status"] == "ok" for r in summaries)
    assert all(r["prompt_tokens"] and r["completion_tokens"] for r in summaries)
    assert [r for r in rows if r["kind"] == "chat"][-1]["summary_used"] is True


async def test_slow_summary_does_not_delay_replies(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    release = asyncio.Event()

    async def slow(rec: Recorded) -> str:
        if is_summary_call(rec):
            await release.wait()
            return fake_summariser(rec)
        return echo_reply(rec)

    model_server.reply = slow
    async with open_service(make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60)) as svc:
        await ask(svc, "my name is Ana")
        i = 0
        while not svc.memory.busy:  # talk until a summary is under way
            await asyncio.wait_for(ask(svc, f"filler message number {i} " * 3), 5)
            i += 1
            assert i < 50
        # A summary is being written and held: replies still come at once.
        for j in range(3):
            assert (await asyncio.wait_for(ask(svc, f"still here {j}"), 5)).startswith("You")
        assert svc.memory.busy == 1  # at most one per conversation
        release.set()
        await asyncio.wait_for(svc.memory.wait_idle(), 5)
        conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x")))
        assert "my name is Ana" in (await svc.store.summary(conv)).text  # type: ignore[union-attr]


async def test_failing_summariser_leaves_replies_working(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    settings = make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60, SUMMARY_MODEL="missing")
    async with open_service(settings) as svc:
        for i in range(30):
            reply = await ask(svc, f"message {i} with some words in it")
            await asyncio.wait_for(svc.memory.wait_idle(), 5)
            assert reply == f"You said: message {i} with some words in it"
        rows = await svc.store.audit_log(200)
        conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x")))
        assert await svc.store.summary(conv) is None
    failed = [r for r in rows if r["kind"] == "summary"]
    assert failed and all(r["status"] == "error" and r["model"] == "missing" for r in failed)
    assert all(r["status"] == "ok" for r in rows if r["kind"] == "chat")


async def test_reset_clears_the_summary(model_server: ModelServer,
                                        make_settings: SettingsFactory) -> None:
    model_server.reply = reply_or_summary
    async with open_service(make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60)) as svc:
        await ask(svc, "my name is Ana")
        for i in range(20):
            await ask(svc, f"filler message number {i} " * 3)
            await asyncio.wait_for(svc.memory.wait_idle(), 5)
        assert "my name is Ana" in await ask(svc, "/memory")
        await ask(svc, "/reset")
        after = await ask(svc, "/memory")
        assert "Stored messages in this conversation: 0" in after
        assert "Ana" not in after and "none yet" in after
        assert "Ana" not in await ask(svc, "who am I?")


async def test_chinese_conversation_gets_a_chinese_summary_prompt(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.reply = reply_or_summary
    async with open_service(make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60)) as svc:
        await ask(svc, "我叫小明，我喜歡吃拉麵。")
        for i in range(20):
            await ask(svc, f"請告訴我第{i}個關於台灣夜市的小知識，謝謝你。")
            await asyncio.wait_for(svc.memory.wait_idle(), 5)
        reply = await ask(svc, "我叫什麼名字？")
    calls = [r for r in model_server.requests if is_summary_call(r)]
    assert calls and "中文" in calls[0].messages[0]["content"]
    assert "小明" in reply.split("You said:")[1]


async def test_truncate_strategy_never_summarises(model_server: ModelServer,
                                                  make_settings: SettingsFactory) -> None:
    async with open_service(make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60,
                                          MEMORY_STRATEGY="truncate")) as svc:
        await ask(svc, "my name is Ana")
        for i in range(20):
            await ask(svc, f"filler message number {i} " * 3)
        assert svc.memory.busy == 0
        reply = await ask(svc, "who am I?")
        memory = await ask(svc, "/memory")
    assert not any(is_summary_call(r) for r in model_server.requests)
    assert "Ana" not in reply  # dropped, as before summaries existed
    assert "dropped" in memory and "Stored messages in this conversation: 44" in memory
