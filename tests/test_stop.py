"""/stop and the Stop buttons: the model's call closes, the text so far stays, marked.

The model's connection closes, the text so far stays, marked, the exchange is audited
`cancelled` and is not history; only the asker (or an admin) may stop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from adapters.telegram.testing import ALICE, BOB, GROUP, telegram_bot
from bot.app import open_service
from bot.reply import Outcome
from bot.service import ChatService
from tests.conftest import SettingsFactory, ask, incoming
from tests.fakes.model_server import ModelServer
from tests.fakes.telegram_api import TelegramApiEmulator, VisibleMessage

STORY = " ".join(f"word{i}" for i in range(400))  # ~800 tokens: long enough to stop
MARK = "⏹ stopped"
PROVIDERS = ["ollama", "openai"]
CAROL = 1003


def slow(model_server: ModelServer) -> None:
    model_server.reply = STORY
    model_server.tokens_per_chunk = 1
    model_server.chunk_delay = 0.03


async def last_audit(svc: ChatService, user: str) -> dict[str, Any]:
    rows = [r for r in await svc.store.audit_log(20, user) if r["kind"] == "chat"]
    return rows[-1]


# ---------------------------------------------------------------------------- the core


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_stop_mid_stream_closes_the_call_and_keeps_the_text_out_of_history(
        provider: str, model_server: ModelServer, make_settings: SettingsFactory) -> None:
    slow(model_server)
    async with open_service(make_settings(LLM_PROVIDER=provider)) as svc:
        reply = await svc.handle(incoming("tell me a long story"))
        shown: list[str] = []
        async with contextlib.aclosing(reply.deltas()) as deltas:
            async for delta in deltas:
                shown.append(delta)
                if len(shown) == 5:
                    assert svc.answers_in(incoming("/stop")) == [reply]
                    assert await ask(svc, "/stop") == f"{MARK}."
                    stopped_at = asyncio.get_running_loop().time()
        took = asyncio.get_running_loop().time() - stopped_at
        assert took < 1.0
        await model_server.wait_for_disconnects(1, timeout=1)
        text = "".join(shown)
        assert text.endswith("\n\n" + MARK) and text.startswith("word0 word1")
        assert reply.outcome is Outcome.CANCELLED
        row = await last_audit(svc, "console:1")
        assert row["status"] == "cancelled" and row["error"] == "stopped by the user"
        assert row["model_response"] == text.removesuffix("\n\n" + MARK)
        model_server.reply = None  # echo
        model_server.chunk_delay = 0
        await ask(svc, "next")
        conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x")))
        assert await svc.store.count_messages(conv) == 2  # "next" and its answer only
    prompt = model_server.requests[-1].messages
    assert [m["content"] for m in prompt[1:]] == ["next"]


async def test_stop_cuts_a_model_that_is_still_thinking(
        model_server: ModelServer, make_settings: SettingsFactory) -> None:
    model_server.gate = asyncio.Event()  # the model produces nothing until opened
    async with open_service(make_settings()) as svc:
        reply = await svc.handle(incoming("think hard"))
        reading = asyncio.create_task(reply.text())
        await model_server.wait_for_requests(1)
        assert await ask(svc, "/stop") == f"{MARK}."
        async with asyncio.timeout(1):
            assert await reading == MARK
        await model_server.wait_for_disconnects(1, timeout=1)
        row = await last_audit(svc, "console:1")
    assert (row["status"], row["model_response"]) == ("cancelled", "")


async def test_stop_with_nothing_running_says_so(service: ChatService) -> None:
    assert await ask(service, "/stop") == "Nothing to stop: no reply is in progress here."


async def test_another_users_stop_changes_nothing(
        model_server: ModelServer, make_settings: SettingsFactory) -> None:
    model_server.reply = "short answer here"
    model_server.gate = asyncio.Event()
    async with open_service(make_settings()) as svc:
        reply = await svc.handle(incoming("hello", user="1", place="g", platform="telegram"))
        reading = asyncio.create_task(reply.text())
        await model_server.wait_for_requests(1)
        bob = incoming("/stop", user="2", place="g", platform="telegram")
        assert "Nothing to stop" in await (await svc.handle(bob)).text()
        refused = await svc.stop_answer(bob, reply.id)  # his press on the button
        assert "Only the person who asked" in await refused.text()
        model_server.gate.set()
        async with asyncio.timeout(5):
            assert await reading == "short answer here"
        row = await last_audit(svc, "telegram:1")
    assert row["status"] == "ok" and model_server.disconnects == 0


# ---------------------------------------------------------------------------- Telegram


@contextlib.asynccontextmanager
async def streaming(tg: TelegramApiEmulator, chat: int, user: int,
                    **where: Any) -> AsyncIterator[VisibleMessage]:
    """`user` asks for the story; yields the bot's answer once it shows text and,
    from its first edit on, the Stop button."""
    ask = f"@{tg.bot_username} tell me a long story" if where else "tell me a long story"
    tg.user_says(user, ask, **where)

    def answer() -> VisibleMessage | None:
        return next((m for m in tg.bot_messages(chat)
                     if m.text.startswith("word0") and m.reply_markup), None)

    await tg.wait_for(lambda: answer() is not None, 10, "the answer to start, with its button")
    shown = answer()
    assert shown is not None
    first = next(c for c in tg.calls("sendMessage") if c.params["chat_id"] == chat)
    assert first.params.get("reply_markup") is None  # the button came with an edit
    yield shown


async def check_stopped(svc: ChatService, tg: TelegramApiEmulator, model_server: ModelServer,
                        answer: VisibleMessage, user_key: str) -> None:
    await model_server.wait_for_disconnects(1, timeout=1)  # within a second of the stop
    await tg.wait_for(lambda: answer.text.endswith(MARK) and answer.reply_markup is None,
                      10, "the stopped mark and the button gone")
    row = await last_audit(svc, user_key)
    assert row["status"] == "cancelled"
    assert answer.text == row["model_response"] + "\n\n" + MARK


async def test_a_reply_complete_by_its_first_message_shows_no_stop_button(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    # One call per quick reply: no button put on and taken off again, so a
    # follow-up right after it finds the chat's pace unspent.
    async with telegram_bot(tg, tg_settings(STREAM_EDIT_INTERVAL="1.0")):
        for question in ("hello", "and again"):
            tg.user_says(ALICE, question)
            await tg.wait_for(lambda q=question: f"You said: {q}" in tg.bot_texts(ALICE), 10)
        assert [m.reply_markup for m in tg.bot_messages(ALICE)] == [None, None]
        assert not tg.calls("editMessageReplyMarkup") and not tg.calls("editMessageText")
        assert all(p.get("reply_markup") is None for p in tg.params("sendMessage"))


@pytest.mark.parametrize("how", ["command", "button"])
async def test_telegram_stop_by_command_and_by_button(
        how: str, tg: TelegramApiEmulator, tg_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    slow(model_server)
    async with telegram_bot(tg, tg_settings()) as bot:
        async with streaming(tg, ALICE, ALICE) as answer:
            [[button]] = answer.reply_markup["inline_keyboard"]  # type: ignore[index]
            assert button["text"] == "⏹ Stop"
            assert button["callback_data"].startswith(f"x:{ALICE}:")
            if how == "command":
                tg.user_says(ALICE, "/stop")
            else:
                press = tg.press_button(ALICE, answer, button["callback_data"])
        await check_stopped(bot.service, tg, model_server, answer, f"telegram:{ALICE}")
        if how == "command":
            await tg.wait_for(lambda: f"{MARK}." in tg.bot_texts(ALICE))
        else:
            assert tg.callback_answer(press) == {"callback_query_id": press, "text": "Stopping…"}
        stopped = answer.text
        model_server.reply = None
        model_server.chunk_delay = 0
        tg.user_says(ALICE, "what did you say?")
        await tg.wait_for(lambda: "You said: what did you say?" in tg.bot_texts(ALICE))
    prompt = model_server.requests[-1].messages
    assert not any("word0" in m["content"] or "long story" in m["content"] for m in prompt)
    assert "word0" in stopped


async def test_telegram_group_stop_by_another_member_changes_nothing_an_admin_may(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    slow(model_server)
    group = {"chat_id": GROUP, "chat_type": "supergroup"}
    async with telegram_bot(tg, tg_settings()) as bot:
        async with streaming(tg, GROUP, ALICE, **group) as answer:
            data = answer.buttons[0]["callback_data"]
            tg.user_says(BOB, "/stop", **group)
            await tg.wait_for(lambda: any("Nothing to stop" in t for t in tg.bot_texts(GROUP)))
            bob = tg.press_button(BOB, answer, data)
            await tg.wait_for(lambda: tg.callback_answer(bob) is not None)
            assert "Only the person who asked" in tg.callback_answer(bob)["text"]
            assert tg.callback_answer(bob)["show_alert"] is True
            assert model_server.disconnects == 0 and answer.reply_markup is not None
            tg.set_admin(GROUP, CAROL)
            carol = tg.press_button(CAROL, answer, data)
        await check_stopped(bot.service, tg, model_server, answer, f"telegram:{ALICE}")
        assert tg.callback_answer(carol)["text"] == f"{MARK}."
        assert [p["user_id"] for p in tg.params("getChatMember")] == [BOB, CAROL]


async def test_telegram_group_admin_sets_the_default_persona(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory,
        model_server: ModelServer, tmp_path: Any) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[coach]\ndescription = "a coach"\nsystem = "Coach me."\n',
                    encoding="utf-8")
    group = {"chat_id": GROUP, "chat_type": "supergroup"}
    async with telegram_bot(tg, tg_settings(PERSONAS_FILE=str(path))) as bot:
        tg.user_says(BOB, "/persona coach default", **group)
        await tg.wait_for(lambda: any("admins" in t for t in tg.bot_texts(GROUP)))
        tg.set_admin(GROUP, ALICE, "creator")
        tg.user_says(ALICE, "/persona coach default", **group)
        await tg.wait_for(lambda: any("default persona here" in t for t in tg.bot_texts(GROUP)))
        assert await bot.service.store.personas_of("-", "telegram", str(GROUP)) == (None, "coach")
        tg.user_says(BOB, f"@{tg.bot_username} hello", **group)
        await tg.wait_for(lambda: any("You said: hello" in t for t in tg.bot_texts(GROUP)))
        tg.user_says(BOB, "/persona", chat_id=None)  # his DM: the list with buttons
        await tg.wait_for(lambda: bool(tg.bot_messages(BOB)))
        [listing] = tg.bot_messages(BOB)
    assert model_server.requests[-1].messages[0]["content"] == "Coach me."
    assert [b["text"] for b in listing.buttons] == ["coach: a coach", "off (the default)"]
    assert [b["callback_data"] for b in listing.buttons] == [f"p:{BOB}:coach", f"p:{BOB}:off"]
