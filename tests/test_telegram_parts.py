"""The Telegram adapter's small parts on their own: addressing, the /model buttons'
callback data, the per-chat pace, the file URL. Messages are built by the emulator,
so they have the real Bot API shapes (entities with UTF-16 offsets and all)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from telegram import Message

from adapters.telegram.adapter import file_url_for
from adapters.telegram.addressing import BotIdentity, addressed_text
from adapters.telegram.menu import (
    choices_keyboard,
    decode_choice,
    encode_choice,
    resolve_choice,
)
from adapters.telegram.pacing import BURST, ChatPacer
from bot.commands import Commands
from bot.reply import Choice, Choices
from bot.service import ChatService
from tests.fakes.telegram_api import TelegramApiEmulator

GROUP = -100777
KNOWN = Commands.of(ChatService).names  # the commands the core answers


@pytest.fixture
def tg() -> TelegramApiEmulator:
    return TelegramApiEmulator()  # not started: only its message shapes are used


def seen(tg: TelegramApiEmulator, text: str, **kw: Any) -> str | None:
    data = tg.user_says(kw.pop("user", 5), text, **kw)
    me = BotIdentity(tg.bot_id, tg.bot_username)
    return addressed_text(Message.de_json(data, None), me, KNOWN)


def in_group(**kw: Any) -> dict[str, Any]:
    return {"chat_id": GROUP, "chat_type": "supergroup", **kw}


def test_private_chat_answers_everything_with_text(tg: TelegramApiEmulator) -> None:
    assert seen(tg, "hello") == "hello"
    assert seen(tg, "/weather") == "/weather"  # the core says it doesn't know it
    # Media come through in private with their caption, or none: the core sees the
    # picture, or says it reads only text and pictures.
    assert seen(tg, "", sticker=True) == ""
    assert seen(tg, "", caption_photo=True) == ""
    assert seen(tg, "", voice=True) == ""
    assert seen(tg, "a caption", caption_photo=True) == "a caption"
    assert seen(tg, "hello", is_bot=True, user=99) is None


def test_group_needs_a_mention_a_reply_or_a_command(tg: TelegramApiEmulator) -> None:
    me = f"@{tg.bot_username}"
    assert seen(tg, "hello all", **in_group()) is None
    assert seen(tg, f"{me} hello", **in_group()) == "hello"
    assert seen(tg, f"Hey {me}, what now?", **in_group()) == "Hey what now?"
    assert seen(tg, f"what now {me}", **in_group()) == "what now"
    assert seen(tg, f"{me.upper()} shouting", **in_group()) == "shouting"
    assert seen(tg, "@someone_else hello", **in_group()) is None
    assert seen(tg, f"/reset@{tg.bot_username}", **in_group()) == "/reset"
    assert seen(tg, f"/model@{tg.bot_username} qwen2.5", **in_group()) == "/model qwen2.5"
    assert seen(tg, "/reset", **in_group()) == "/reset"  # ours, addressed to all bots
    assert seen(tg, "/reset@other_bot", **in_group()) is None
    assert seen(tg, "/weather", **in_group()) is None  # someone else's command
    assert seen(tg, f"look {me}", caption_photo=True, **in_group()) == "look"
    # Uncaptioned media in a group: only as a reply to the bot.
    assert seen(tg, "", caption_photo=True, **in_group()) is None
    assert seen(tg, "", sticker=True, **in_group()) is None
    mine = tg.post_as_bot(GROUP, "a question")
    assert seen(tg, "", caption_photo=True, reply_to=mine, **in_group()) == ""


def test_mentions_are_cut_by_utf16_offsets(tg: TelegramApiEmulator) -> None:
    me = f"@{tg.bot_username}"
    assert seen(tg, f"😀😀 {me} 我叫小明 🎉", **in_group()) == "😀😀 我叫小明 🎉"


def test_replies_count_only_when_they_reply_to_the_bot(tg: TelegramApiEmulator) -> None:
    tg.user_says(6, "hi", **in_group())
    theirs = tg.messages(GROUP)[-1]
    mine = tg.post_as_bot(GROUP, "an answer")
    assert seen(tg, "and then?", reply_to=mine, **in_group()) == "and then?"
    assert seen(tg, "and then?", reply_to=theirs, **in_group()) is None


def test_text_mention_of_the_bot_counts(tg: TelegramApiEmulator) -> None:
    data = tg.user_says(5, "Memory Bot tell me", **in_group())
    data["entities"] = [{"type": "text_mention", "offset": 0, "length": 10,
                         "user": tg.bot_user}]
    me = BotIdentity(tg.bot_id, tg.bot_username)
    assert addressed_text(Message.de_json(data, None), me, KNOWN) == "tell me"


def test_callback_data_names_a_model_safely() -> None:
    assert encode_choice(42, "llama3.2:latest") == "m:42:llama3.2:latest"
    press = decode_choice("m:42:llama3.2:latest")
    assert press is not None and press.owner_id == 42
    assert resolve_choice(press.key, ("qwen2.5", "llama3.2:latest")) == "llama3.2:latest"

    long_name = "hf.co/some-organisation/a-very-long-model-name-GGUF:Q4_K_M-imatrix"
    data = encode_choice(123456789, long_name)
    assert len(data.encode()) <= 64
    decoded = decode_choice(data)
    assert decoded is not None
    assert resolve_choice(decoded.key, ("x", long_name)) == long_name
    assert resolve_choice(decoded.key, ("x",)) is None  # stale: no longer offered

    for forged in ("", "m", "m::x", "m:abc:x", "x:1:llama3.2", "m:1:"):
        assert decode_choice(forged) is None, forged


def test_keyboard_marks_the_current_model() -> None:
    keyboard = choices_keyboard(7, Choices("model", (Choice("a", "a"), Choice("b", "b", True))))
    assert keyboard is not None
    rows = [[(b.text, b.callback_data) for b in row] for row in keyboard.inline_keyboard]
    assert rows == [[("a", "m:7:a")], [("✓ b", "m:7:b")]]
    assert choices_keyboard(7, Choices("model", ())) is None


async def test_pacer_lets_a_quiet_chat_burst_then_keeps_one_call_per_interval() -> None:
    interval = 0.5
    pacer = ChatPacer(interval)
    loop = asyncio.get_running_loop()
    starts: dict[int, list[float]] = {1: [], 2: []}

    async def call(chat: int) -> None:
        async with pacer.turn(chat):
            starts[chat].append(loop.time())

    t0 = loop.time()
    # A quick follow-up in a quiet chat goes out at once, not an interval later.
    async with asyncio.timeout(interval / 2):
        await asyncio.gather(*(call(1) for _ in range(BURST)))
    async with asyncio.timeout(5 * interval):
        await asyncio.gather(call(1), call(1), call(2))
    one = starts[1]
    assert len(one) == BURST + 2
    # A really busy chat: past the burst, one call per interval.
    assert one[BURST] - t0 >= interval * 0.9
    assert one[BURST + 1] - one[BURST] >= interval * 0.9
    assert starts[2][0] < one[BURST]  # another chat did not queue behind chat 1
    async with asyncio.timeout(0.01), ChatPacer(0).turn(1):
        pass


def test_file_url_follows_the_bot_api_url() -> None:
    assert file_url_for("http://127.0.0.1:8081/bot") == "http://127.0.0.1:8081/file/bot"
    assert file_url_for("https://tg.example/api/bot{token}/") == \
        "https://tg.example/api/file/bot{token}/"
    assert file_url_for("http://local:8081") == "http://local:8081/file/bot"


class CountingText(str):
    """A message text that counts how often it is encoded (UTF-16 slicing re-encodes it)."""

    encodes = 0

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        CountingText.encodes += 1
        return super().encode(*args, **kwargs)


@pytest.mark.parametrize("count", [10, 2000])
def test_mention_entities_are_sliced_from_one_encoding(tg: TelegramApiEmulator,
                                                       count: int) -> None:
    me = f"@{tg.bot_username}"
    body = " ".join(["@someone"] * count) + f" {me} 😀 hi"
    data = tg.user_says(5, body, **in_group())
    assert len(data["entities"]) == count + 1  # the emulator marked every mention
    data["text"] = CountingText(body)
    message = Message.de_json(data, None)
    assert isinstance(message.text, CountingText)
    CountingText.encodes = 0
    seen_text = addressed_text(message, BotIdentity(tg.bot_id, tg.bot_username), KNOWN)
    assert seen_text == " ".join(["@someone"] * count) + " 😀 hi"
    # Linear: one encoding to slice every entity and cut the mention out, however
    # many entities the Bot API sends (it was one per entity).
    assert CountingText.encodes == 1
