"""The renderer through the real Telegram sink, on the Bot API emulator.

python-telegram-bot against the Bot API emulator, which answers as Telegram does
("message text is empty", "can't parse entities", "message is too long"). What the user
saw is the emulator's visible messages; what crossed the wire is its recorded calls;
what reached the database is the core's audit log, for the end-to-end cases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from telegram import Bot

from adapters.telegram import sink as telegram_sink
from adapters.telegram.menu import stop_keyboard
from adapters.telegram.pacing import ChatPacer
from adapters.telegram.sink import TelegramSink
from adapters.telegram.testing import bot_says, telegram_bot
from bot.render import StreamRenderer, utf16_len
from bot.sanitize import storable
from tests.conftest import SettingsFactory
from tests.fakes.model_server import ModelServer
from tests.fakes.telegram_api import TelegramApiEmulator, VisibleMessage

ALICE = 1001
LIMIT = 4096


@pytest.fixture
async def bot(tg: TelegramApiEmulator) -> AsyncIterator[Bot]:
    tg.user_says(ALICE, "hello")  # the chat exists
    async with Bot(tg.bot_token, base_url=tg.base_url) as client:
        yield client


async def stream(parts: list[str], gap: float = 0.02) -> AsyncIterator[str]:
    for part in parts:
        yield part
        await asyncio.sleep(gap)  # the model's pace, not synchronisation


async def render(bot: Bot, parts: list[str], gap: float = 0.02) -> list[str]:
    renderer = StreamRenderer(TelegramSink(bot, ALICE, pacer=ChatPacer(0)), limit=LIMIT,
                              measure=utf16_len, edit_interval=0)
    async with asyncio.timeout(20):
        return await renderer.run(stream(parts, gap))


def refused(tg: TelegramApiEmulator) -> list[str]:
    """Calls Telegram refused ("message is not modified" is an edit with nothing to do)."""
    return [f"{c.method}: {c.error}" for c in tg.calls()
            if c.status != 200 and "not modified" not in str(c.error)]


def entity_kinds(message: VisibleMessage) -> list[tuple[str, str]]:
    data = message.text.encode("utf-16-le")
    return [(e["type"], data[2 * e["offset"]:2 * (e["offset"] + e["length"])].decode("utf-16-le"))
            for e in message.entities]


# ----------------------------------------------------------------- item 6


@pytest.mark.parametrize(("parts", "text", "kinds"), [
    (["```python\n", "print(1)\n", "```\n\n", "Then **bold**."],
     "print(1)\n\nThen bold.", [("pre", "print(1)"), ("bold", "bold")]),
    (["# ", "Title\n\n", "**body**"], "Title\n\nbody", [("bold", "Title"), ("bold", "body")]),
    ([">", " quoted", "\n\nand **more**"], "quoted\n\nand more",
     [("blockquote", "quoted"), ("bold", "more")]),
])
async def test_a_reply_that_opens_with_markup_waits_for_visible_text_and_stays_formatted(
        tg: TelegramApiEmulator, bot: Bot, parts: list[str], text: str,
        kinds: list[tuple[str, str]]) -> None:
    await render(bot, parts)
    assert refused(tg) == []  # never an empty message, never a plain fallback
    [message] = tg.bot_messages(ALICE)
    assert message.text == text and entity_kinds(message) == kinds
    assert all(p["parse_mode"] == "HTML"
               for p in tg.params("sendMessage") + tg.params("editMessageText"))


async def test_a_refused_edit_falls_back_for_that_edit_only(
        tg: TelegramApiEmulator, bot: Bot) -> None:
    tg.fail_next("sendMessage", 400, "Bad Request: can't parse entities: test")
    await render(bot, ["**Hello**", " and ", "**more**"])
    sends = tg.calls("sendMessage")
    assert [c.status for c in sends] == [400, 200]
    assert sends[1].params.get("parse_mode") is None  # that one call went plain
    [message] = tg.bot_messages(ALICE)
    assert message.text == "Hello and more"  # later edits are formatted again
    assert entity_kinds(message) == [("bold", "Hello"), ("bold", "more")]


async def test_a_stop_button_released_while_an_edit_carries_it_still_goes(
        tg: TelegramApiEmulator, bot: Bot) -> None:
    # The reply ends (its button released) while an edit that carries the button is
    # on its way: the sink must still take it off afterwards, or it stays for good.
    sink = TelegramSink(bot, ALICE, reply_markup=stop_keyboard(ALICE, 1),
                        markup_waits_for_an_edit=True)
    first = await sink.send("word0", formatted=True)
    gate = tg.hold_next("editMessageText")
    editing = asyncio.create_task(sink.edit(first, "word0 word1", formatted=True))
    await tg.wait_for_call("editMessageText")
    sink.release_markup()
    gate.set()
    async with asyncio.timeout(5):
        await editing
        await sink.drop_markup()
    [message] = tg.bot_messages(ALICE)
    assert message.text == "word0 word1" and message.reply_markup is None
    assert len(tg.calls("editMessageReplyMarkup")) == 1


# ----------------------------------------------------------------- items 7 and 10


async def test_a_fence_line_longer_than_a_message_sends_a_few_full_messages(
        tg: TelegramApiEmulator, bot: Bot) -> None:
    reply = "```" + "x" * 5000 + "\nprint(1)\n```\nafter"
    shown = await render(bot, [reply[i:i + 500] for i in range(0, len(reply), 500)], gap=0)
    messages = tg.bot_messages(ALICE)
    assert 2 <= len(messages) <= 3 and len(shown) == len(messages)
    assert [c.error for c in tg.calls("sendMessage") if c.status != 200] == []
    assert all(utf16_len(m.text) <= LIMIT for m in messages)
    assert messages[-1].text.endswith("print(1)\nafter")


async def test_a_reply_that_cannot_be_formatted_is_sent_plain(
        tg: TelegramApiEmulator, bot: Bot, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(markdown: str) -> str:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(telegram_sink, "markdown_to_html", broken)
    await render(bot, ["[[[deep](mailto:)](mailto:)](mailto:) & <b>"])
    [message] = tg.bot_messages(ALICE)
    assert message.text == "[[[deep](mailto:)](mailto:)](mailto:) & <b>"
    assert [p.get("parse_mode") for p in tg.params("sendMessage")] == [None]


async def test_nested_links_show_their_text(tg: TelegramApiEmulator, bot: Bot) -> None:
    reply = "[" * 340 + "deep" + "](mailto:)" * 340
    await render(bot, [reply])
    [message] = tg.bot_messages(ALICE)
    assert "deep" in message.text and refused(tg) == []
    assert tg.params("sendMessage")[0]["parse_mode"] == "HTML"


# ----------------------------------------------------------------- item 11


async def test_a_lone_surrogate_or_nul_is_shown_cleaned(tg: TelegramApiEmulator, bot: Bot) -> None:
    parts = ["Hello \ud800 wor", "ld\x00 **done**"]
    shown = await render(bot, parts)
    [message] = tg.bot_messages(ALICE)
    assert message.text == "Hello \ufffd world done"
    assert shown == [storable("".join(parts))]
    assert "\x00" not in tg.params("editMessageText")[-1]["text"]


@pytest.fixture
def tg_settings(make_settings: SettingsFactory, tg: TelegramApiEmulator) -> SettingsFactory:
    def make(**overrides: Any) -> Any:
        return make_settings(TELEGRAM_TOKEN=tg.bot_token, TELEGRAM_BASE_URL=tg.base_url,
                             **overrides)
    return make


async def test_the_bot_shows_what_it_stores_for_a_broken_model_reply(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory, model_server: ModelServer) -> None:
    model_server.reply = "Answer \ud83d with a lone half\x00 of an emoji"
    async with telegram_bot(tg, tg_settings()) as running:
        tg.user_says(ALICE, "hi")
        [message] = await bot_says(tg, ALICE, ["Answer \ufffd with a lone half of an emoji"])
        rows = await running.service.store.audit_log(5)
    assert rows[-1]["status"] == "ok"
    assert rows[-1]["model_response"] == message.text
    assert tg.params("sendMessage")[-1]["parse_mode"] == "HTML"


async def test_a_zero_width_model_reply_is_an_empty_reply(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory, model_server: ModelServer) -> None:
    model_server.reply = "\u200b\u200d\u2060"
    async with telegram_bot(tg, tg_settings()) as running:
        tg.user_says(ALICE, "hi")
        # The invisible characters stay (they are what the model said); the note is seen.
        await bot_says(tg, ALICE, [
            "\u200b\u200d\u2060⚠️ The model returned an empty reply. Please try again."])
        rows = await running.service.store.audit_log(5)
    assert (rows[-1]["status"], rows[-1]["error"]) == ("error", "empty reply")
