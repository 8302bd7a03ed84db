"""The Bot API emulator answers like Telegram: checked with the real python-telegram-bot
`Bot` (and raw HTTP for the body encodings PTB does not use)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup
from telegram.constants import ParseMode
from telegram.error import BadRequest, InvalidToken, RetryAfter

from tests.fakes.telegram_api import TelegramApiEmulator

USER = 4242


@pytest.fixture
async def tg() -> AsyncIterator[TelegramApiEmulator]:
    async with TelegramApiEmulator() as emulator:
        emulator.user_says(USER, "hi")  # the chat exists once the user wrote
        yield emulator


@pytest.fixture
async def bot(tg: TelegramApiEmulator) -> AsyncIterator[Bot]:
    async with Bot(tg.bot_token, base_url=tg.base_url) as client:
        yield client


async def refused(call: asyncio.Future[object] | object) -> str:
    with pytest.raises(BadRequest) as raised:
        await call  # type: ignore[misc]
    return raised.value.message


async def test_html_is_parsed_into_what_the_user_sees(bot: Bot, tg: TelegramApiEmulator) -> None:
    sent = await bot.send_message(
        USER, '😀 <b>bold <i>both</i></b> &lt;tag&gt; &#38; <a href="https://x.org">link</a>'
              '<pre><code class="language-py">x &lt; 1</code></pre>', parse_mode=ParseMode.HTML)
    [message] = tg.bot_messages(USER)
    assert message.text == "😀 bold both <tag> & linkx < 1"
    assert message.entities == [
        {"type": "bold", "offset": 3, "length": 9}, {"type": "italic", "offset": 8, "length": 4},
        {"type": "text_link", "offset": 21, "length": 4, "url": "https://x.org"},
        {"type": "pre", "offset": 25, "length": 5, "language": "py"}]
    assert sent.text == message.text and sent.message_id == message.message_id == 2


@pytest.mark.parametrize(("markup", "detail"), [
    ("a <tag> b", 'unsupported start tag "tag" at byte offset 2'),
    ("<b>open", 'can\'t find end tag corresponding to start tag "b"'),
    ("<b><i>x</b></i>", 'unmatched end tag at byte offset 7, expected "</i>", found "</b>"'),
    ("x</b>", "unexpected end tag at byte offset 1"),
    ("a < b", 'unsupported start tag "" at byte offset 2'),
    ("R&D", 'unescaped "&" at byte offset 1; use &amp;'),
    ('<span class="x">s</span>', 'tag "span" must have class "tg-spoiler" at byte offset 0'),
])
async def test_bad_html_is_refused_like_telegram(bot: Bot, markup: str, detail: str) -> None:
    message = await refused(bot.send_message(USER, markup, parse_mode=ParseMode.HTML))
    assert message == f"Can't parse entities: {detail}"


async def test_length_and_emptiness_are_checked_after_parsing(bot: Bot) -> None:
    assert await refused(bot.send_message(USER, "")) == "Message text is empty"
    assert await refused(bot.send_message(USER, "<b> </b>", parse_mode="HTML")) == \
        "Message text is empty"
    await bot.send_message(USER, "<b>" + "x" * 4096 + "</b>", parse_mode=ParseMode.HTML)
    assert await refused(bot.send_message(USER, "x" * 4097)) == "Message is too long"
    assert await refused(bot.send_message(USER, "😀" * 2049)) == "Message is too long"


async def test_edits(bot: Bot, tg: TelegramApiEmulator) -> None:
    sent = await bot.send_message(USER, "one")
    await bot.edit_message_text("two", chat_id=USER, message_id=sent.message_id)
    assert (await refused(bot.edit_message_text("two", chat_id=USER,
                                                message_id=sent.message_id))
            ).startswith("Message is not modified: specified new message content")
    assert await refused(bot.edit_message_text("x", chat_id=USER, message_id=999)) == \
        "Message to edit not found"
    assert await refused(bot.edit_message_text("x", chat_id=USER, message_id=1)) == \
        "Message can't be edited"  # the user's own message
    [message] = tg.bot_messages(USER)
    assert [e.text for e in message.edits] == ["two"]


async def test_keyboards_and_callback_answers(bot: Bot, tg: TelegramApiEmulator) -> None:
    keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("A", callback_data="a")]])
    await bot.send_message(USER, "pick", reply_markup=keyboard)
    [message] = tg.bot_messages(USER)
    assert message.buttons == [{"text": "A", "callback_data": "a"}]
    too_long = InlineKeyboardMarkup([[InlineKeyboardButton("B", callback_data="b" * 65)]])
    assert await refused(bot.send_message(USER, "x", reply_markup=too_long)) == \
        "Button_data_invalid"
    query = tg.press_button(USER, message, "a")
    await bot.answer_callback_query(query, text="ok")
    assert tg.callback_answer(query) == {"callback_query_id": query, "text": "ok"}
    assert (await refused(bot.answer_callback_query(query))).startswith("Query is too old")


@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
async def test_errors_have_telegram_shapes(bot: Bot, tg: TelegramApiEmulator) -> None:
    tg.fail_next("sendMessage", 429, "Too Many Requests: retry after 1", retry_after=1)
    with pytest.raises(RetryAfter) as limited:
        await bot.send_message(USER, "x")
    assert limited.value._retry_after.total_seconds() == 1
    assert await refused(bot.send_message(31337, "x")) == "Chat not found"
    with pytest.raises(InvalidToken):
        await Bot("1:wrong", base_url=tg.base_url).get_me()
    assert tg.calls("getMe")[-1].status == 401


async def test_long_polling_wakes_when_an_update_arrives(bot: Bot,
                                                        tg: TelegramApiEmulator) -> None:
    first = await bot.get_updates(timeout=0)
    assert [u.message.text for u in first if u.message] == ["hi"]
    poll = asyncio.create_task(bot.get_updates(offset=first[-1].update_id + 1, timeout=30))
    await tg.wait_for(lambda: len(tg.calls("getUpdates")) == 2)
    assert tg.pending_updates == 0  # the offset confirmed "hi"
    tg.user_says(USER, "wake up")
    updates = await asyncio.wait_for(poll, 2)  # long before the 30 s timeout
    assert [u.message.text for u in updates if u.message] == ["wake up"]


async def test_json_form_and_query_bodies(tg: TelegramApiEmulator) -> None:
    url = f"{tg.base_url}{tg.bot_token}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/sendMessage", json={"chat_id": USER, "text": "j"}) as r:
            assert (await r.json())["result"]["text"] == "j"
        async with http.post(f"{url}/sendMessage", data={"chat_id": str(USER), "text": "f"}) as r:
            assert (await r.json())["result"]["text"] == "f"
        form = aiohttp.FormData({"chat_id": str(USER), "text": "m"})
        form.add_field("document", b"bytes", filename="a.txt")  # forces multipart
        async with http.post(f"{url}/sendMessage", data=form) as r:
            assert (await r.json())["result"]["text"] == "m"
        async with http.get(f"{url}/getMe") as r:
            assert (await r.json())["result"]["username"] == tg.bot_username
        async with http.get(f"{url}/noSuchMethod") as r:
            assert r.status == 404
    assert tg.bot_texts(USER) == ["j", "f", "m"]
