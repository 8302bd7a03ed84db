"""Memory beyond the window: rolling summaries, /memory, /reset, truncate."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Callable

import pytest

from bot import operator_commands
from bot.app import open_service
from bot.memory import SUMMARY_INSTRUCTIONS
from bot.records import AuditRecord
from bot.service import ChatService
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


async def test_two_hundred_messages_keep_the_first_fact_within_budget(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    # The README's promise: the name is still known 200 messages (100 exchanges) later.
    # A 512-token window folds the oldest messages into the summary many times over by
    # then, which is what the first fact must survive.
    model_server.reply = reply_or_summary
    settings = make_settings(CONTEXT_TOKENS=512, REPLY_TOKENS=128)
    budget = settings.prompt_budget
    async with open_service(settings) as svc:
        await ask(svc, "my name is Ana and I like tea")
        for i in range(99):
            reply = await ask(svc, f"tell me something about topic number {i}, please")
            await asyncio.wait_for(svc.memory.wait_idle(), 5)
        conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x")))
        summary = await svc.store.summary(conv)
        stored = await svc.store.count_messages(conv)
        memory = await ask(svc, "/memory")
        rows = await svc.store.audit_log(1000)
    assert "Your name is Ana" in reply  # through the summary, 99 exchanges later
    chats = [r for r in model_server.requests if not is_summary_call(r)]
    assert len(chats) == 100
    assert "my name is Ana" in chats[-1].messages[0]["content"]  # the one system message
    assert all(count_messages(r.messages) <= budget for r in chats)
    assert all(prompt_tokens(r.messages) <= budget * 1.15 for r in chats)
    assert summary is not None and count_tokens(summary.text) <= settings.summary_cap
    assert stored == 200  # the messages themselves are kept
    assert "200" in memory and "my name is Ana" in memory
    summaries = [r for r in rows if r["kind"] == "summary"]
    assert len(summaries) >= 20  # the fact went through many folds (47 today)
    assert all(r["status"] == "ok" for r in summaries)
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


# -- summaries and the model: budgets, order, slots, /reset (issues 11 and 17) -------------

async def prefill(svc: ChatService, texts: list[str], user: str = "1") -> tuple[int, str]:
    """Store exchanges as if they had been answered (the echo reply), oldest first."""
    ref = svc.conversation_ref(incoming("x", user=user))
    conv = await svc.store.conversation_id(ref)
    for t in texts:
        reply = f"You said: {t}"
        await svc.store.save_exchange(conv, t, reply, AuditRecord(
            platform="console", user_id=user, chat_id=f"dm-{user}", conversation=ref.key,
            user_input=t, model_response=reply, provider="ollama", model="llama3.2"))
    return conv, ref.key


def summary_calls(model_server: ModelServer) -> list[Recorded]:
    return [r for r in model_server.requests if is_summary_call(r)]


def within_window(rec: Recorded, window: int) -> bool:
    """The prompt, by the server's own count, plus the reply limit fit the window."""
    return rec.prompt_tokens + rec.options["num_predict"] <= window


async def eventually(predicate: Callable[[], bool], timeout: float = 5) -> None:  # noqa: ASYNC109
    """Wait for a state of the service that no event announces (bounded)."""
    async with asyncio.timeout(timeout):
        for _ in itertools.count():
            if predicate():
                return
            await asyncio.sleep(0.005)


async def test_summaries_fold_the_oldest_messages_first_within_the_window(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.reply = reply_or_summary
    settings = make_settings(CONTEXT_TOKENS=4096, REPLY_TOKENS=512)
    async with open_service(settings) as svc:
        # More than the 2,000 messages the summariser used to read, the fact in the oldest.
        conv, _ = await prefill(svc, ["my name is Ana"] + [f"filler {i}" for i in range(1000)])
        await ask(svc, "what do you know?")
        await asyncio.wait_for(svc.memory.wait_idle(), 20)
        summary = await svc.store.summary(conv)
        kept = await svc.store.recent_messages(conv, 5000, after_id=summary.upto_id if summary
                                               else 0)
    calls = summary_calls(model_server)
    assert calls and "User: my name is Ana" in calls[0].messages[-1]["content"]
    assert summary is not None and "my name is Ana" in summary.text
    assert all(within_window(r, 4096) for r in calls), [
        (r.prompt_tokens, r.options["num_predict"]) for r in calls]
    # Batches use the window: 1,000 exchanges in a handful of calls, not one call each.
    assert len(calls) <= 12
    assert max(r.prompt_tokens for r in calls) > (4096 - calls[0].options["num_predict"]) // 2
    # What stays unsummarised is the newest part, starting with a question.
    assert kept and kept[0].role == "user" and len(kept) < 400


async def test_summary_prompts_leave_room_for_the_summary_in_a_small_window(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.reply = reply_or_summary
    settings = make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60)
    async with open_service(settings) as svc:
        await prefill(svc, ["my name is Ana"] + [f"a longer filler message number {i} " * 4
                                                 for i in range(12)])
        await ask(svc, "hello")
        await asyncio.wait_for(svc.memory.wait_idle(), 10)
    calls = summary_calls(model_server)
    assert calls and all(within_window(r, 300) for r in calls)


async def test_no_summary_is_scheduled_when_there_is_nothing_to_fold(
    model_server: ModelServer, make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_server.reply = "ok"
    async with open_service(make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60)) as svc:
        scheduled: list[int] = []
        original = svc.memory.schedule
        monkeypatch.setattr(svc.memory, "schedule",
                            lambda conv, *a: scheduled.append(conv) or original(conv, *a))
        # A long first message fills the prompt, but there is no earlier exchange to fold.
        reply = await ask(svc, "word " * 170)
        await asyncio.wait_for(svc.memory.wait_idle(), 5)
        conv, _ = await prefill(svc, [])
        summary = await svc.store.summary(conv)
    assert reply == "ok" and scheduled == [] and summary is None
    assert summary_calls(model_server) == []


async def test_reset_during_a_summary_keeps_what_came_before_from_the_model(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    release = asyncio.Event()

    async def held(rec: Recorded) -> str:
        if is_summary_call(rec):
            await release.wait()
            return fake_summariser(rec)
        return echo_reply(rec)

    model_server.reply = held
    async with open_service(make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60)) as svc:
        conv, _ = await prefill(svc, [f"secret fact number {i} of many" for i in range(20)])
        await ask(svc, "one more")
        await model_server.wait_for_requests(2)  # the reply, then the first summary batch
        assert is_summary_call(model_server.requests[1])
        answer = await asyncio.wait_for(ask(svc, "/reset"), 5)
        seen = len(model_server.requests)
        release.set()
        await asyncio.wait_for(svc.memory.wait_idle(), 5)
        after = await ask(svc, "who am I?")
        summary = await svc.store.summary(conv)
        stored = await svc.store.count_messages(conv)
    assert answer.startswith("Done: I forgot this conversation (42 messages)")
    later = model_server.requests[seen:]
    assert [is_summary_call(r) for r in later] == [False]  # only the new question
    assert not any("secret fact" in str(r.messages) for r in later)
    assert after == "You said: who am I?"
    assert summary is None and stored == 2


async def test_a_summary_pass_cut_off_keeps_the_batches_it_folded(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    hold_second = asyncio.Event()

    async def second_held(rec: Recorded) -> str:
        if is_summary_call(rec) and len(summary_calls(model_server)) >= 2:
            await hold_second.wait()
        return reply_or_summary(rec)

    model_server.reply = second_held
    async with open_service(make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60)) as svc:
        conv, _ = await prefill(svc, ["my name is Ana"] + [f"filler message number {i}"
                                                           for i in range(20)])
        await ask(svc, "one more")
        await model_server.wait_for_requests(3)  # the reply, batch one, batch two (held)
        written = await svc.store.summary(conv)  # batch one is stored while two runs
        await svc.memory.cancel_all()  # what exit does
        kept = await svc.store.summary(conv)
    assert written is not None and "my name is Ana" in written.text
    assert kept == written and kept.upto_id > 0


async def test_memory_says_when_summaries_have_been_failing(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    settings = make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60, SUMMARY_MODEL="missing")
    async with open_service(settings) as svc:
        await prefill(svc, [f"filler message number {i}" for i in range(20)])
        await ask(svc, "one more")
        await asyncio.wait_for(svc.memory.wait_idle(), 5)
        memory = await ask(svc, "/memory")
        rows = await svc.store.audit_log(10)
    assert [r["status"] for r in rows if r["kind"] == "summary"] == ["error"]
    assert "none yet" not in memory
    assert "Summary: not written: the last attempt failed." in memory


async def test_summaries_wait_for_replies_and_one_slot_means_one_call(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    gates = {"A hold": asyncio.Event(), "B hold": asyncio.Event()}
    active = [0, 0]  # now, peak

    async def counted(rec: Recorded) -> str:
        active[0] += 1
        active[1] = max(active)
        try:
            gate = None if is_summary_call(rec) else gates.get(rec.last_user_message)
            if gate is not None:
                await gate.wait()
            return reply_or_summary(rec)
        finally:
            active[0] -= 1

    model_server.reply = counted
    async with open_service(make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60,
                                          LLM_CONCURRENCY=1)) as svc:
        conv, _ = await prefill(svc, ["my name is Ana"] + [f"filler message number {i}"
                                                           for i in range(20)], user="a")
        a = asyncio.create_task(ask(svc, "A hold", user="a"))
        await model_server.wait_for_requests(1)
        b = asyncio.create_task(ask(svc, "B hold", user="b"))
        await eventually(lambda: svc._slots.waiting() == 1)  # B waits for the one slot
        gates["A hold"].set()  # A ends and schedules its summary
        await model_server.wait_for_requests(2)
        assert model_server.requests[1].last_user_message == "B hold"
        await eventually(lambda: svc.memory.busy == 1 and svc._slots.waiting() == 1)
        assert len(model_server.requests) == 2  # the summary waits while B is answered
        gates["B hold"].set()
        replies = await asyncio.wait_for(asyncio.gather(a, b), 5)
        await asyncio.wait_for(svc.memory.wait_idle(), 10)
        summary = await svc.store.summary(conv)
    assert replies == ["You said: A hold", "You said: B hold"]
    kinds = ["summary" if is_summary_call(r) else r.last_user_message
             for r in model_server.requests]
    assert kinds[:2] == ["A hold", "B hold"] and set(kinds[2:]) == {"summary"}
    assert active[1] == 1  # never two calls at the model at once
    assert summary is not None and "my name is Ana" in summary.text


async def test_stats_report_summary_model_time_beside_reply_time(
    model_server: ModelServer, make_settings: SettingsFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    model_server.reply = reply_or_summary
    model_server.chunk_delay = 0.01  # model time that rounds to more than nothing
    settings = make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60)
    async with open_service(settings) as svc:
        await prefill(svc, ["my name is Ana"] + [f"filler message number {i}" for i in range(20)])
        await ask(svc, "one more")
        await asyncio.wait_for(svc.memory.wait_idle(), 10)
        shown = await ask(svc, "/stats")
        rows = await svc.store.audit_log(100)
    summaries = [r for r in rows if r["kind"] == "summary"]
    chats = [r for r in rows if r["kind"] == "chat" and r["status"] == "ok"]
    assert summaries and len(chats) == 22  # the prefilled exchanges count as replies too
    spent = sum(r["response_time"] for r in summaries)
    line = next(ln for ln in shown.splitlines()
                if ln.startswith("ollama/llama3.2 ") and "calls" in ln)
    assert line.endswith(f"{spent:.1f}s ({len(summaries)} calls)")
    capsys.readouterr()
    assert await operator_commands.stats(settings, as_json=True) == 0
    [figure] = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert figure["summary_calls"] == len(summaries)
    assert figure["summary_seconds"] == pytest.approx(spent)


async def test_a_failed_summary_is_one_log_line_and_an_error_record(
    model_server: ModelServer, make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60)
    async with open_service(settings) as svc:
        conv, key = await prefill(svc, ["my name is Ana"] + [f"a longer filler message {i} " * 4
                                                             for i in range(12)])
        model_server.fault = "http500"
        caplog.clear()
        assert svc.memory.schedule(conv, svc.conversation_ref(incoming("x")), "dm-1", "llama3.2")
        await asyncio.wait_for(svc.memory.wait_idle(), 10)
        summary = await svc.store.summary(conv)
    # The operator sees one line saying which conversation and why, no traceback.
    lines = [r for r in caplog.records if r.name.startswith("bot") and r.levelno >= 30]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert lines[0].getMessage().startswith(f"summary of {key} failed: ")
    assert "500" in lines[0].getMessage() and "\n" not in lines[0].getMessage()
    assert summary is None  # nothing was written
    assert svc.memory.failures == 1
    assert summary_calls(model_server)  # the call did reach the server
