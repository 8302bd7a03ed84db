"""adapters.telegram.request.AiohttpRequest: PTB's calls over aiohttp, as they cross the wire."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup
from telegram.constants import ParseMode

from adapters.telegram.request import AiohttpRequest
from tests.fakes.telegram_api import TelegramApiEmulator

USER = 4343


@pytest.fixture
async def tg() -> AsyncIterator[TelegramApiEmulator]:
    async with TelegramApiEmulator() as emulator:
        emulator.user_says(USER, "hi")
        yield emulator


@pytest.fixture
async def bot(tg: TelegramApiEmulator) -> AsyncIterator[Bot]:
    async with Bot(tg.bot_token, base_url=tg.base_url, request=AiohttpRequest(),
                   get_updates_request=AiohttpRequest()) as client:
        yield client


async def test_calls_without_files_go_as_one_json_body(bot: Bot, tg: TelegramApiEmulator) -> None:
    stop = InlineKeyboardMarkup([[InlineKeyboardButton("⏹ Stop", callback_data="stop:1")]])
    sent = await bot.send_message(USER, "<b>hello</b>", parse_mode=ParseMode.HTML,
                                  reply_markup=stop)
    await bot.edit_message_text("hello <i>there</i>", chat_id=USER,
                                message_id=sent.message_id, parse_mode=ParseMode.HTML)
    [shown] = tg.bot_messages(USER)
    assert shown.text == "hello there"
    calls = [c for c in tg.calls() if c.method in ("sendMessage", "editMessageText")]
    assert [c.content_type for c in calls] == ["application/json"] * 2
    # The keyboard crossed as a nested object, and Telegram showed it.
    assert calls[0].params["reply_markup"] == {
        "inline_keyboard": [[{"text": "⏹ Stop", "callback_data": "stop:1"}]]}


async def test_text_orjson_refuses_still_goes(bot: Bot, tg: TelegramApiEmulator) -> None:
    # A lone surrogate (half an emoji): orjson refuses it, the stdlib escapes it.
    await bot.send_message(USER, "half \ud83d")
    [call] = tg.calls("sendMessage")
    assert call.status == 200 and call.content_type == "application/json"
    assert call.params["text"] == "half \ud83d"


async def test_calls_with_files_go_multipart(bot: Bot, tg: TelegramApiEmulator) -> None:
    # setWebhook with a self-signed certificate: the one upload the bot could make.
    assert await bot.set_webhook("https://bot.example/hook", certificate=b"-----CERT-----",
                                 secret_token="s3cret")
    [call] = tg.calls("setWebhook")
    assert call.content_type == "multipart/form-data"
    assert call.params["url"] == "https://bot.example/hook"
    assert call.params["certificate"] == "<file>"
