"""The Telegram adapter end to end, on the Bot API emulator, the real core and the model.

The real python-telegram-bot against the Bot API emulator, the real core on a
temp SQLite database, and the model stand-in.

Every test checks what the user saw (the emulator's visible messages), what crossed
the wire (the emulator's recorded calls, the prompts the model stand-in received) or
what reached the database. Waits are bounded and re-check on every state change.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from adapters.telegram.adapter import TelegramAdapter
from adapters.telegram.pacing import BURST
from adapters.telegram.testing import ALICE, BOB, GROUP, RunningBot, bot_says, telegram_bot
from bot.app import open_service
from bot.messages import Incoming
from bot.render import utf16_len
from bot.settings import SettingsError
from storage import open_store
from tests.conftest import SettingsFactory, free_port
from tests.fakes.model_server import ModelServer, closed_port_url
from tests.fakes.telegram_api import TelegramApiEmulator

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def bot(tg: TelegramApiEmulator, tg_settings: SettingsFactory) -> AsyncIterator[RunningBot]:
    async with telegram_bot(tg, tg_settings()) as running:
        yield running


def user_prompts(model_server: ModelServer) -> list[str]:
    """The last user message of every prompt the model received."""
    return [r.last_user_message for r in model_server.requests]


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


# ----------------------------------------------------------------------------- memory


async def test_private_chat_remembers_across_a_restart(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory, model_server: ModelServer) -> None:
    settings = tg_settings()
    async with telegram_bot(tg, settings):
        tg.user_says(ALICE, "Hi, my name is Alice", first_name="Alice")
        await bot_says(tg, ALICE, ["You said: Hi, my name is Alice"])
    assert tg.pending_updates == 0  # the stop confirmed what was fetched: no replay

    async with telegram_bot(tg, settings):  # a new adapter and service on the same DB
        tg.user_says(ALICE, "What is my name?")
        await bot_says(tg, ALICE, ["You said: Hi, my name is Alice",
                                   "You said: What is my name? Your name is Alice."])
    second = model_server.requests[-1]
    assert [m["content"] for m in second.messages if m["role"] == "user"] == [
        "Hi, my name is Alice", "What is my name?"]
    # A private chat is not quoted; the reply went to the right chat.
    assert all(p.get("reply_parameters") is None for p in tg.params("sendMessage"))


async def test_two_users_are_kept_apart(bot: RunningBot, tg: TelegramApiEmulator,
                                        model_server: ModelServer) -> None:
    tg.user_says(ALICE, "my name is Alice")
    tg.user_says(BOB, "my name is Bob")
    await bot_says(tg, ALICE, ["You said: my name is Alice"])
    await bot_says(tg, BOB, ["You said: my name is Bob"])
    tg.user_says(ALICE, "who am I?")
    tg.user_says(BOB, "who am I?")
    await bot_says(tg, ALICE, ["You said: my name is Alice",
                               "You said: who am I? Your name is Alice."])
    await bot_says(tg, BOB, ["You said: my name is Bob", "You said: who am I? Your name is Bob."])
    assert len(model_server.requests) == 4
    for request in model_server.requests:  # a prompt of one never carries the other's name
        prompt = " ".join(str(m["content"]) for m in request.messages)
        assert ("Alice" in prompt) != ("Bob" in prompt), prompt


async def test_chinese_end_to_end(bot: RunningBot, tg: TelegramApiEmulator,
                                  model_server: ModelServer) -> None:
    tg.user_says(ALICE, "我叫小明")
    await bot_says(tg, ALICE, ["You said: 我叫小明"])
    tg.user_says(ALICE, "我是谁？")
    await bot_says(tg, ALICE, ["You said: 我叫小明", "You said: 我是谁？ Your name is 小明."])
    assert model_server.requests[-1].last_user_message == "我是谁？"


# ----------------------------------------------------------------------------- groups


async def test_group_answers_only_what_is_addressed_to_it(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory, model_server: ModelServer) -> None:
    model_server.tokens_per_chunk = 10_000  # one chunk a reply: few calls per group minute
    model_server.vision_models = ["llama3.2"]  # the captioned photo goes to the model
    me = f"@{tg.bot_username}"
    group = {"chat_id": GROUP, "chat_type": "supergroup"}
    async with telegram_bot(tg, tg_settings()):
        # Ignored, each without a word: they all come before the first addressed one,
        # and the adapter decides to ignore without awaiting anything.
        tg.user_says(ALICE, "hello everyone", **group)
        tg.user_says(777, f"{me} I am another bot", is_bot=True, **group)
        tg.user_says(ALICE, f"{me} this is an edit", edited=True, **group)
        tg.user_says(ALICE, "", sticker=True, **group)
        tg.user_says(ALICE, "", caption_photo=True, **group)
        tg.user_says(ALICE, "/reset@other_bot", **group)
        tg.user_says(ALICE, "/weather in Paris", **group)  # not one of our commands
        tg.user_says(ALICE, f"{me}, my name is Dora", first_name="Dora", **group)
        [first] = await bot_says(tg, GROUP, ["You said: my name is Dora"])
        assert model_server.requests[0].last_user_message == "my name is Dora"  # no mention

        tg.user_says(ALICE, "what is my name?", reply_to=first, **group)
        tg.user_says(ALICE, f"look {me}", caption_photo=True, **group)
        await bot_says(tg, GROUP, ["You said: my name is Dora",
                                   "You said: what is my name? Your name is Dora.",
                                   "You said: look Your name is Dora."])
        # Each person has their own memory in the group.
        tg.user_says(BOB, f"{me} what is my name?", **group)
        await tg.wait_for(lambda: len(tg.bot_messages(GROUP)) == 4)
        assert tg.bot_texts(GROUP)[3] == "You said: what is my name?"

        tg.user_says(ALICE, f"/reset@{tg.bot_username}", **group)
        await tg.wait_for(lambda: len(tg.bot_messages(GROUP)) == 5)
        assert tg.bot_texts(GROUP)[4].startswith("Done: I forgot this conversation")
        tg.user_says(ALICE, f"{me} what is my name?", **group)
        await tg.wait_for(lambda: len(tg.bot_messages(GROUP)) == 6)
        assert tg.bot_texts(GROUP)[5] == "You said: what is my name?"

    assert user_prompts(model_server) == [
        "my name is Dora", "what is my name?", "look", "what is my name?", "what is my name?"]
    # Group replies quote the message they answer.
    users = [m for m in tg.messages(GROUP) if not m.from_bot]
    replied = [m.reply_to.message_id for m in tg.bot_messages(GROUP) if m.reply_to]
    assert len(replied) == 6 and set(replied) <= {m.message_id for m in users}


async def test_photo_caption_in_private_chat(bot: RunningBot, tg: TelegramApiEmulator,
                                            model_server: ModelServer) -> None:
    # More in tests/test_images.py: a sticker gets one short answer; a photo and its
    # caption go to a model that sees images.
    model_server.vision_models = ["llama3.2"]
    tg.user_says(ALICE, "", sticker=True)
    await bot_says(tg, ALICE, ["I can only read text and pictures."])
    tg.user_says(ALICE, "a cat on a mat", caption_photo=True)
    await bot_says(tg, ALICE, ["I can only read text and pictures.", "You said: a cat on a mat"])
    assert len(model_server.requests[-1].images) == 1


# ----------------------------------------------------------------------------- commands


async def test_commands_are_registered_on_start(bot: RunningBot, tg: TelegramApiEmulator) -> None:
    registered = [c["command"] for c in tg.commands()]
    assert registered == ["start", "help", "reset", "model", "memory", "remember", "forget",
                          "stats", "language", "persona", "stop"]
    methods = [c.method for c in tg.calls()]
    assert methods.index("setMyCommands") < methods.index("getUpdates")
    [polling] = tg.params("getUpdates")[:1]
    assert polling["allowed_updates"] == ["message", "callback_query"]


async def test_reset_forgets_the_conversation(bot: RunningBot, tg: TelegramApiEmulator,
                                              model_server: ModelServer) -> None:
    tg.user_says(ALICE, "my name is Alice")
    await bot_says(tg, ALICE, ["You said: my name is Alice"])
    tg.user_says(ALICE, "/reset")
    await tg.wait_for(lambda: len(tg.bot_messages(ALICE)) == 2)
    assert tg.bot_texts(ALICE)[1].startswith("Done: I forgot this conversation")
    tg.user_says(ALICE, "who am I?")
    await tg.wait_for(lambda: len(tg.bot_messages(ALICE)) == 3)
    assert tg.bot_texts(ALICE)[2] == "You said: who am I?"
    assert [m["role"] for m in model_server.requests[-1].messages] == ["system", "user"]


def model_for(model_server: ModelServer, text: str) -> str:
    """The model that answered the prompt ending in `text`."""
    [request] = [r for r in model_server.requests if r.last_user_message == text]
    return request.model


async def test_model_by_argument_and_by_button_is_per_user(
        bot: RunningBot, tg: TelegramApiEmulator, model_server: ModelServer) -> None:
    tg.user_says(ALICE, "/model qwen2.5")
    await bot_says(tg, ALICE, ["Done: your model is now qwen2.5."])
    tg.user_says(ALICE, "hi from Alice")
    tg.user_says(BOB, "hi from Bob")
    await bot_says(tg, ALICE, ["Done: your model is now qwen2.5.", "You said: hi from Alice"])
    await bot_says(tg, BOB, ["You said: hi from Bob"])
    assert model_for(model_server, "hi from Alice") == "qwen2.5"
    assert model_for(model_server, "hi from Bob") == "llama3.2"  # Alice's switch isn't Bob's

    tg.user_says(BOB, "/model")
    shown = await bot_says(tg, BOB, ["You said: hi from Bob", "Your model: llama3.2\nYou may "
                                     "pick:\n• llama3.2: window 4,096 tokens, 3.2B, Q4_K_M\n"
                                     "• qwen2.5: window 4,096 tokens, 3.2B, Q4_K_M\n"
                                     "Pick one with /model NAME"])
    menu = shown[1]
    assert [(b["text"], b["callback_data"]) for b in menu.buttons] == [
        ("✓ llama3.2", f"m:{BOB}:llama3.2"), ("qwen2.5", f"m:{BOB}:qwen2.5")]
    press = tg.press_button(BOB, menu, f"m:{BOB}:qwen2.5")
    await tg.wait_for(lambda: tg.callback_answer(press) is not None)
    assert tg.callback_answer(press)["text"] == "Model: qwen2.5"
    assert menu.text == "Done: your model is now qwen2.5." and menu.reply_markup is None

    tg.user_says(ALICE, "/model llama3.2")
    await tg.wait_for(lambda: len(tg.bot_messages(ALICE)) == 3)
    tg.user_says(ALICE, "Alice again")
    tg.user_says(BOB, "Bob again")
    await tg.wait_for(lambda: len(tg.bot_messages(ALICE)) == 4 and len(tg.bot_messages(BOB)) == 3)
    assert model_for(model_server, "Alice again") == "llama3.2"
    assert model_for(model_server, "Bob again") == "qwen2.5"


async def test_forged_and_stale_buttons_are_answered_not_obeyed(
        bot: RunningBot, tg: TelegramApiEmulator) -> None:
    group = {"chat_id": GROUP, "chat_type": "group"}
    tg.user_says(ALICE, f"/model@{tg.bot_username}", **group)
    await tg.wait_for(lambda: len(tg.bot_messages(GROUP)) == 1)
    [menu] = tg.bot_messages(GROUP)
    assert len(menu.buttons) == 2
    presses = {
        "someone else's menu": tg.press_button(BOB, menu, f"m:{ALICE}:qwen2.5"),
        "a model not offered": tg.press_button(ALICE, menu, f"m:{ALICE}:gpt-99"),
        "data it never made": tg.press_button(ALICE, menu, "rm -rf /"),
        "no data at all": tg.press_button(ALICE, menu, ""),
    }
    await tg.wait_for(lambda: all(tg.callback_answer(q) for q in presses.values()))
    answers = {why: tg.callback_answer(q)["text"] for why, q in presses.items()}
    assert "belongs to someone else" in answers["someone else's menu"]
    assert "no longer offered" in answers["a model not offered"]
    assert "no longer works" in answers["data it never made"]
    assert "no longer works" in answers["no data at all"]
    assert not menu.edits and len(menu.buttons) == 2  # the menu was left as it was
    for user in (ALICE, BOB):
        msg = Incoming("telegram", str(user), "x", str(GROUP), str(GROUP), "/model")
        assert (await bot.service.model_choices(msg)).current == "llama3.2"

    # The same valid press twice: the second edit changes nothing ("not modified").
    first = tg.press_button(ALICE, menu, f"m:{ALICE}:qwen2.5")
    await tg.wait_for(lambda: tg.callback_answer(first) is not None)
    again = tg.press_button(ALICE, menu, f"m:{ALICE}:qwen2.5")
    await tg.wait_for(lambda: tg.callback_answer(again) is not None)
    assert tg.callback_answer(again)["text"] == "Model: qwen2.5"
    assert [c.error for c in tg.calls("editMessageText")][-1].startswith(
        "Bad Request: message is not modified")
    assert tg.bot_texts(GROUP) == ["Done: your model is now qwen2.5."]
    msg = Incoming("telegram", str(ALICE), "x", str(GROUP), str(GROUP), "/model")
    assert (await bot.service.model_choices(msg)).current == "qwen2.5"


# ----------------------------------------------------------------------------- streaming


async def test_typing_shows_until_the_first_token(bot: RunningBot, tg: TelegramApiEmulator,
                                                  model_server: ModelServer) -> None:
    model_server.gate = asyncio.Event()
    tg.user_says(ALICE, "hello")
    await tg.wait_for_call("sendChatAction")
    assert tg.params("sendChatAction")[0] == {"chat_id": ALICE, "action": "typing"}
    assert tg.bot_messages(ALICE) == []
    model_server.gate.set()
    await bot_says(tg, ALICE, ["You said: hello"])


async def test_edits_respect_the_interval(tg: TelegramApiEmulator, tg_settings: SettingsFactory,
                                          model_server: ModelServer) -> None:
    interval = 0.1
    model_server.reply = " ".join(f"word{i}" for i in range(40))
    model_server.chunk_delay = 0.01  # about 0.4 s of streaming: four intervals
    async with telegram_bot(tg, tg_settings(STREAM_EDIT_INTERVAL=interval)):
        tg.user_says(ALICE, "talk to me")
        [message] = await bot_says(tg, ALICE, [model_server.reply])
    assert len(message.edits) >= 3  # it streamed, in steps
    times = message.changed_at
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= interval - 0.01, gaps


async def test_two_replies_in_one_group_share_the_pace(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory, model_server: ModelServer) -> None:
    interval = 0.3
    # Times are the emulator's, when a call arrived: a loaded machine delays a call
    # between the pacer's grant and its arrival, by up to `jitter` here.
    jitter = 0.1
    model_server.reply = " ".join(f"part{i}" for i in range(12))
    model_server.chunk_delay = 0.05
    group = {"chat_id": GROUP, "chat_type": "group"}
    async with telegram_bot(tg, tg_settings(STREAM_EDIT_INTERVAL=interval)):
        tg.user_says(ALICE, f"@{tg.bot_username} talk", **group)
        tg.user_says(BOB, f"@{tg.bot_username} talk too", **group)
        messages = await bot_says(tg, GROUP, [model_server.reply] * 2, timeout=10)
    times = sorted(c.at for c in tg.calls() if c.method in ("sendMessage", "editMessageText")
                   and c.params.get("chat_id") == GROUP)
    assert len(times) >= 4
    # One bucket for the chat: past a burst of BURST calls, one call per interval.
    for i, j in itertools.combinations(range(len(times)), 2):
        assert times[j] - times[i] >= (j - i + 1 - BURST) * interval - jitter, (i, j, times)
    for message in messages:  # and each reply's own edits keep the interval
        gaps = [b - a for a, b in itertools.pairwise(message.changed_at)]
        assert all(g >= interval - jitter for g in gaps), gaps


async def test_long_reply_is_split_whole_and_code_blocks_stay_closed(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory, model_server: ModelServer) -> None:
    prose = [f"Paragraph {i:02d}: " + " ".join(f"w{i}x{j}" for j in range(45))
             for i in range(26)]
    code = [f"value_{n:03d} = compute({n}) + offset  # step {n}" for n in range(130)]
    reply = "\n\n".join(prose[:8]) + "\n\n```python\n" + "\n".join(code) + "\n```\n\n" \
        + "\n\n".join(prose[8:])
    assert len(reply) > 10_000
    model_server.reply = reply
    model_server.tokens_per_chunk = 60
    settings = tg_settings(CONTEXT_TOKENS=32_000, REPLY_TOKENS=16_000)
    async with telegram_bot(tg, settings):
        tg.user_says(ALICE, "write a lot")
        expected = squash(reply.replace("```python", "").replace("```", ""))
        await tg.wait_for(lambda: squash("".join(tg.bot_texts(ALICE))) == expected, 15,
                          "the whole reply")
    messages = tg.bot_messages(ALICE)
    assert len(messages) >= 3
    assert all(utf16_len(m.text) <= 4096 for m in messages)
    # Every code line is shown inside a pre block, also across the split.
    for m in messages:
        pres = [e for e in m.entities if e["type"] == "pre"]
        for line in re.finditer(r"value_\d{3} = .*", m.text):
            start = utf16_len(m.text[:line.start()])
            assert any(e["offset"] <= start < e["offset"] + e["length"] for e in pres), line
            assert all(e.get("language") == "python" for e in pres)
    assert sum(bool(re.search("value_", m.text)) for m in messages) >= 2  # it did split
    assert not [c for c in tg.calls() if c.status != 200 and c.method != "getUpdates"]


async def test_unbalanced_markdown_arrives_whole(bot: RunningBot, tg: TelegramApiEmulator,
                                                 model_server: ModelServer) -> None:
    model_server.reply = "**bold and `code and <tag> & stuff"
    tg.user_says(ALICE, "format something")
    await bot_says(tg, ALICE, [model_server.reply])
    last = tg.params("sendMessage")[-1] if not tg.calls("editMessageText") \
        else tg.params("editMessageText")[-1]
    assert last["parse_mode"] == "HTML"
    assert "&lt;tag&gt; &amp; stuff" in last["text"]


async def test_refused_formatting_is_resent_plain(bot: RunningBot, tg: TelegramApiEmulator,
                                                  model_server: ModelServer) -> None:
    model_server.reply = "Some **bold** text"
    model_server.tokens_per_chunk = 100
    tg.fail_next("sendMessage", 400,
                 'Bad Request: can\'t parse entities: Unsupported start tag "x" at byte offset 5')
    tg.user_says(ALICE, "format something")
    [message] = await bot_says(tg, ALICE, ["Some **bold** text"])
    sends = tg.calls("sendMessage")
    assert [c.status for c in sends] == [400, 200]
    assert sends[0].params["parse_mode"] == "HTML" and "parse_mode" not in sends[1].params
    assert message.entities == []


# PTB's own RetryAfter constructor warns about its future retry_after type.
@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
async def test_flood_control_mid_stream_still_delivers(
        bot: RunningBot, tg: TelegramApiEmulator, model_server: ModelServer) -> None:
    model_server.reply = " ".join(f"token{i}" for i in range(20))
    model_server.chunk_delay = 0.03
    tg.fail_next("editMessageText", 429, "Too Many Requests: retry after 1", retry_after=1)
    tg.user_says(ALICE, "stream please")
    await bot_says(tg, ALICE, [model_server.reply], timeout=8)
    edits = tg.calls("editMessageText")
    limited = next(c for c in edits if c.status == 429)
    after = [c for c in edits if c.at > limited.at]
    assert after and after[0].at - limited.at >= 1.0  # waited retry_after, then retried
    assert all(c.status == 200 for c in after)


async def test_not_modified_is_not_an_error(bot: RunningBot, tg: TelegramApiEmulator,
                                            model_server: ModelServer,
                                            caplog: pytest.LogCaptureFixture) -> None:
    # Telegram trims trailing whitespace, so the edits adding it change nothing.
    model_server.reply = "Done. \n\n \t"
    model_server.chunk_delay = 0.15
    tg.user_says(ALICE, "finish")
    await tg.wait_for(lambda: any((c.error or "").startswith("Bad Request: message is not "
                                                             "modified")
                                  for c in tg.calls("editMessageText")), 5)
    await bot_says(tg, ALICE, ["Done."])
    model_server.reply = None
    tg.user_says(ALICE, "next")  # still answering
    await bot_says(tg, ALICE, ["Done.", "You said: next"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name.startswith(("adapters", "bot.render"))]


# ----------------------------------------------------------------------------- failures


async def test_model_server_down_gives_one_short_message(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory, model_server: ModelServer) -> None:
    model_server.fault = "http500"
    async with telegram_bot(tg, tg_settings()):
        tg.user_says(ALICE, "are you there?")
        await tg.wait_for(lambda: len(tg.bot_messages(ALICE)) == 1)
    [message] = tg.bot_messages(ALICE)  # and nothing more once the reply was over
    assert len(message.text) < 200
    for internal in ("500", "Traceback", "http", "127.0.0.1", "Error:"):
        assert internal not in message.text


async def test_model_server_unreachable(tg: TelegramApiEmulator,
                                        tg_settings: SettingsFactory) -> None:
    settings = tg_settings(OLLAMA_HOST=await closed_port_url())
    async with telegram_bot(tg, settings):
        tg.user_says(ALICE, "anyone?")
        await tg.wait_for(lambda: len(tg.bot_messages(ALICE)) == 1)
    [message] = tg.bot_messages(ALICE)
    assert len(message.text) < 200 and "refused" not in message.text.lower()
    assert "127.0.0.1" not in message.text


async def test_a_failing_update_costs_one_apology_and_nothing_else(
        bot: RunningBot, tg: TelegramApiEmulator, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    handle = bot.service.handle

    async def broken(msg: Incoming) -> Any:
        if msg.text == "/model":
            raise RuntimeError("disk /srv/secret/db exploded")
        return await handle(msg)

    monkeypatch.setattr(bot.service, "handle", broken)
    tg.user_says(ALICE, "/model")
    # What the user reads, word for word (not the constant compared with itself).
    apology = "Sorry, something went wrong while answering. Please try again."
    [sent] = await bot_says(tg, ALICE, [apology])
    assert sent.edits == []  # one message, no more
    tg.user_says(ALICE, "hello again")
    await bot_says(tg, ALICE, [apology, "You said: hello again"])
    assert tg.params("sendMessage")[0]["text"] == apology  # what crossed the wire
    assert "exploded" not in tg.transcript(ALICE)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("exploded" in r.getMessage() or "exploded" in (r.exc_text or "")
               for r in errors)


# ----------------------------------------------------------------------------- secrets


async def test_the_token_never_reaches_the_logs(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with telegram_bot(tg, tg_settings()):
        tg.user_says(ALICE, "hello")
        await bot_says(tg, ALICE, ["You said: hello"])
    assert tg.bot_token not in caplog.text
    assert not [r for r in caplog.records if tg.bot_token in r.getMessage()]
    assert "<redacted>" in caplog.text  # PTB logged its URL, and it was redacted


async def test_a_wrong_token_is_one_clear_error_without_the_token(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "7000001:AAWrongTokenWrongTokenWrongToken_99"
    settings = tg_settings(TELEGRAM_TOKEN=wrong)
    async with open_service(settings) as service:
        with pytest.raises(SettingsError) as raised:
            await TelegramAdapter(settings).run(service, asyncio.Event())
    assert "refused" in str(raised.value) and wrong not in str(raised.value)
    assert wrong not in caplog.text
    assert tg.calls("getMe")[0].status == 401


async def test_an_unreachable_bot_api_is_one_clear_error(tg_settings: SettingsFactory) -> None:
    settings = tg_settings(TELEGRAM_BASE_URL=await closed_port_url() + "/bot")
    adapter = TelegramAdapter(settings)
    async with open_service(settings) as service:
        with pytest.raises(ConnectionError) as raised:
            await adapter.run(service, asyncio.Event())
    assert str(raised.value).startswith("cannot reach the Telegram Bot API at 127.0.0.1:")
    # Its HTTP sessions are closed, not left to "Unclosed client session" at exit.
    sessions = [r._session for r in adapter._requests]
    assert len(sessions) == 2 and all(s is None or s.closed for s in sessions)
    assert settings.TELEGRAM_TOKEN is not None
    assert settings.TELEGRAM_TOKEN.get_secret_value() not in str(raised.value)


# ----------------------------------------------------------------------------- webhook



def test_webhook_needs_a_secret(tg_settings: SettingsFactory) -> None:
    settings = tg_settings(TELEGRAM_WEBHOOK_URL="https://bot.example.org/tg")
    with pytest.raises(SettingsError) as raised:
        TelegramAdapter(settings)
    assert "TELEGRAM_WEBHOOK_SECRET is required" in str(raised.value)
    assert "\n" not in str(raised.value)


async def test_python_m_bot_refuses_a_webhook_without_a_secret(db_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEGRAM_")}
    env |= {"TELEGRAM_TOKEN": "1:AAnotUsedBecauseItStopsFirst", "DATABASE_URL": db_url,
            "TELEGRAM_WEBHOOK_URL": "https://bot.example.org/tg"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    lines = [line for line in stderr.decode().splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1 and "TELEGRAM_WEBHOOK_SECRET is required" in lines[0], lines


async def test_webhook_refuses_requests_without_the_secret(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/tg-hook"
    secret = "hook_secret-42"
    settings = tg_settings(TELEGRAM_WEBHOOK_URL=url, TELEGRAM_WEBHOOK_PORT=port,
                           TELEGRAM_WEBHOOK_SECRET=secret)
    forged = {"update_id": 1, "message": {
        "message_id": 1, "date": 1, "text": "forged hello",
        "chat": {"id": BOB, "type": "private", "first_name": "Bob"},
        "from": {"id": BOB, "is_bot": False, "first_name": "Bob"}}}
    async with telegram_bot(tg, settings), aiohttp.ClientSession() as http:
        [hook] = tg.params("setWebhook")
        assert hook["url"] == url and hook["secret_token"] == secret
        tg.user_says(ALICE, "through the hook")  # the emulator posts it with the secret
        await bot_says(tg, ALICE, ["You said: through the hook"])
        for headers in ({}, {"X-Telegram-Bot-Api-Secret-Token": "wrong"}):
            async with http.post(url, json=forged, headers=headers) as resp:
                assert resp.status == 403
        tg.user_says(ALICE, "and again")
        await bot_says(tg, ALICE, ["You said: through the hook", "You said: and again"])
    assert tg.webhook_deliveries[-1][1] == 200
    assert user_prompts(model_server) == ["through the hook", "and again"]
    assert tg.bot_messages(BOB) == [] and not tg.calls("getUpdates")


# ----------------------------------------------------------------------------- shutdown


async def test_a_reply_in_flight_finishes_within_the_grace(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory, model_server: ModelServer) -> None:
    model_server.first_token_delay = 0.3
    async with telegram_bot(tg, tg_settings(SHUTDOWN_GRACE=3.0)):
        tg.user_says(ALICE, "quick one")
        await model_server.wait_for_requests(1)
    # Stopped mid-reply, and still the whole answer arrived.
    assert tg.bot_texts(ALICE) == ["You said: quick one"]


async def test_a_reply_still_running_after_the_grace_is_cancelled(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory, model_server: ModelServer,
        monkeypatch: pytest.MonkeyPatch, db_url: str) -> None:
    import adapters.telegram.adapter as telegram_adapter

    monkeypatch.setattr(telegram_adapter, "DRAIN_EXTRA", 0.2)
    model_server.gate = asyncio.Event()  # the reply never starts
    settings = tg_settings(SHUTDOWN_GRACE=0.3)
    async with open_service(settings) as service:
        stop = asyncio.Event()
        task = asyncio.create_task(TelegramAdapter(settings).run(service, stop))
        await tg.wait_for_call("getUpdates")
        tg.user_says(ALICE, "never answered")
        await model_server.wait_for_requests(1)
        stop.set()  # and no service.shutdown: the adapter alone must bound its stop
        await asyncio.wait_for(task, 5)
        rows = await service.store.audit_log(5, f"telegram:{ALICE}")
    assert [(r["status"], r["user_input"]) for r in rows] == [("cancelled", "never answered")]


# ----------------------------------------------------------------------------- the process


async def test_sigterm_stops_python_m_bot_cleanly(
        tg: TelegramApiEmulator, model_server: ModelServer, db_url: str) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TELEGRAM_", "DISCORD_", "OPENAI_", "LLM_"))}
    env |= {"TELEGRAM_TOKEN": tg.bot_token, "TELEGRAM_BASE_URL": tg.base_url,
            "OLLAMA_HOST": model_server.url, "DATABASE_URL": db_url,
            "SHUTDOWN_GRACE": "0.3", "STREAM_EDIT_INTERVAL": "0.05", "LOG_LEVEL": "DEBUG",
            "RATE_LIMIT_PER_MINUTE": "0", "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    output = asyncio.gather(proc.stdout.read(), proc.stderr.read())  # type: ignore[union-attr]
    try:
        await tg.wait_for(lambda: bool(tg.calls("getUpdates")) or proc.returncode is not None,
                          15, "python -m bot to start polling")
        tg.user_says(ALICE, "hello there")
        await bot_says(tg, ALICE, ["You said: hello there"], timeout=10)

        model_server.gate = asyncio.Event()  # the next reply is held before its first token
        tg.user_says(ALICE, "a second question")
        await model_server.wait_for_requests(2)
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stdout, stderr = (part.decode(errors="replace") for part in await output)
    assert code == 0, stderr[-3000:]
    assert tg.bot_token not in stdout + stderr
    assert "telegram: answering as" in stderr  # it logged, so the check above means something
    # The held reply was ended by the shutdown and recorded as such.
    store = open_store(db_url)
    await store.open()
    try:
        statuses = [row["status"] for row in await store.audit_log(10, f"telegram:{ALICE}")]
    finally:
        await store.close()
    assert statuses == ["ok", "cancelled"]
    assert len(tg.bot_messages(ALICE)) == 2  # the user was told, not left hanging


# ----------------------------------------------------------------------------- /memory


async def test_memory_shows_the_summary_and_reset_clears_it(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory, model_server: ModelServer) -> None:
    from tests.test_memory import reply_or_summary

    model_server.reply = reply_or_summary
    settings = tg_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=60)
    async with telegram_bot(tg, settings) as running:
        tg.user_says(ALICE, "my name is Alice")
        await tg.wait_for(lambda: len(tg.bot_texts(ALICE)) == 1)
        for i in range(12):
            tg.user_says(ALICE, f"filler message number {i} " * 3)
            await tg.wait_for(lambda n=i + 2: len(tg.bot_texts(ALICE)) == n)
            await asyncio.wait_for(running.service.memory.wait_idle(), 5)
        tg.user_says(ALICE, "/memory")
        await tg.wait_for(lambda: len(tg.bot_texts(ALICE)) == 14)
        report = tg.bot_texts(ALICE)[-1]
        tg.user_says(ALICE, "/reset")
        await tg.wait_for(lambda: len(tg.bot_texts(ALICE)) == 15)
        tg.user_says(ALICE, "/memory")
        await tg.wait_for(lambda: len(tg.bot_texts(ALICE)) == 16)
        after = tg.bot_texts(ALICE)[-1]
    assert "Stored messages in this conversation: 26" in report
    assert "my name is Alice" in report  # the summary, as the user sees it
    assert "forgot" in tg.bot_texts(ALICE)[-2]
    assert "Stored messages in this conversation: 0" in after and "Alice" not in after
