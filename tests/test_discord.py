"""The Discord adapter end to end: the real discord.py against the emulator, the real core.

Every test looks at what users saw (messages in the emulator, after edits) and at what
crossed the wire (REST bodies the emulator recorded, prompts the model stand-in got) or
reached the database. Nothing waits by sleeping: `wait_for` wakes on state changes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.http import Route

import adapters.discord.commands as discord_commands
from adapters.discord.adapter import DiscordAdapter
from adapters.discord.picks import choices_view
from adapters.discord.settings import shard_ids
from adapters.discord.sink import APOLOGY
from adapters.discord.testing import (
    ALICE,
    BOB,
    TOKEN,
    ServiceProxy,
    StartBot,
    contents,
    said,
)
from bot.app import open_service
from bot.messages import Incoming
from bot.reply import Choice, Choices
from bot.settings import SettingsError
from tests.conftest import SettingsFactory
from tests.fakes.discord_api import (
    BOT_ID,
    BOT_ROLE_ID,
    CALLBACK_DEFERRED,
    CALLBACK_DEFERRED_UPDATE,
    FLAG_EPHEMERAL,
    GUILD_ID,
    ROLE_ID,
    TEXT_CHANNEL_ID,
    THREAD_ID,
    DiscordEmulator,
    InteractionRecord,
    ShownMessage,
)
from tests.fakes.model_server import ModelServer, closed_port_url

OTHER_BOT = 2_100_000_000_000_000_003
WEBHOOK = 2_100_000_000_000_000_004
REPO = Path(__file__).resolve().parents[1]
# guilds | guild_messages | dm_messages | message_content
EXPECTED_INTENTS = (1 << 0) | (1 << 9) | (1 << 12) | (1 << 15)


@pytest.fixture(autouse=True)
def token_never_logged(caplog: pytest.LogCaptureFixture) -> Any:
    """Whatever a test does, no log line or logged error carries the token."""
    caplog.set_level(logging.DEBUG)
    yield
    formatter = logging.Formatter()
    phases = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    for record in phases:
        text = record.getMessage()
        if record.exc_info:
            text += formatter.formatException(record.exc_info)
        assert TOKEN not in text, f"token logged by {record.name}"


# -- DMs and memory -------------------------------------------------------------------------------


async def test_dm_memory_survives_a_restart(discord_api: DiscordEmulator, run_bot: StartBot,
                                            model_server: ModelServer) -> None:
    dm = discord_api.dm_channel(ALICE)
    first = await run_bot()
    await discord_api.user_says(ALICE, "Hello, my name is Alice", author_name="Alice")
    await said(discord_api, dm, "You said: Hello, my name is Alice")
    await first.stop()

    await run_bot()  # a new adapter and a new core on the same database
    await discord_api.user_says(ALICE, "What is my name?", author_name="Alice")
    await said(discord_api, dm, "You said: What is my name? Your name is Alice.")

    assert contents(discord_api, dm) == ["You said: Hello, my name is Alice",
                                         "You said: What is my name? Your name is Alice."]
    # The bot's own messages came back over the gateway and were not answered.
    assert [r.last_user_message for r in model_server.requests] == [
        "Hello, my name is Alice", "What is my name?"]
    history = [m["content"] for m in model_server.requests[1].messages]
    assert "Hello, my name is Alice" in history
    # In a DM the answer is a plain message, not a reply.
    assert all(m.message_reference is None for m in discord_api.bot_messages(dm))


async def test_two_users_are_kept_apart(discord_api: DiscordEmulator, run_bot: StartBot,
                                        model_server: ModelServer) -> None:
    await run_bot()
    await discord_api.user_says(ALICE, "my name is Alice")
    await said(discord_api, discord_api.dm_channel(ALICE), "You said: my name is Alice")
    await discord_api.user_says(BOB, "what is my name?")
    await said(discord_api, discord_api.dm_channel(BOB), "You said: what is my name?")

    (bob_prompt,) = [r for r in model_server.requests if r.last_user_message == "what is my name?"]
    assert not any("Alice" in str(m["content"]) for m in bob_prompt.messages)


async def test_chinese_text_end_to_end(discord_api: DiscordEmulator, run_bot: StartBot,
                                       model_server: ModelServer) -> None:
    await run_bot()
    dm = discord_api.dm_channel(ALICE)
    await discord_api.user_says(ALICE, "你好，我叫小明")
    await said(discord_api, dm, "You said: 你好，我叫小明")
    await discord_api.user_says(ALICE, "我的名字是什么？")
    await said(discord_api, dm, "You said: 我的名字是什么？ Your name is 小明.")
    assert model_server.requests[-1].last_user_message == "我的名字是什么？"
    assert discord_api.calls(f"POST /channels/{dm}/messages")[0].body["content"].startswith(
        "You said: 你好")


# -- where it answers -----------------------------------------------------------------------------


async def test_answers_mentions_and_replies_ignores_the_rest(
        discord_api: DiscordEmulator, run_bot: StartBot, model_server: ModelServer) -> None:
    await run_bot()
    general = TEXT_CHANNEL_ID
    # Ignored: no mention in a server, another bot, a webhook, nothing but the mention.
    # (A mention with only an image is answered: tests/test_images.py.)
    await discord_api.user_says(ALICE, "hello everyone", channel_id=general)
    await discord_api.user_says(OTHER_BOT, "hi bot", channel_id=general, mentions_bot=True,
                                is_bot=True)
    await discord_api.user_says(WEBHOOK, "hi bot", channel_id=general, mentions_bot=True,
                                webhook=True)
    await discord_api.user_says(ALICE, "", channel_id=general, mentions_bot=True)
    # Answered: a mention …
    question = await discord_api.user_says(ALICE, "question one", channel_id=general,
                                           mentions_bot=True)
    answer = await said(discord_api, general, "You said: question one")
    # … a reply to the bot (without the reply's ping), but not a reply to someone else …
    await discord_api.user_says(BOB, "not for the bot", channel_id=general,
                                reply_to=int(question["id"]))
    await discord_api.user_says(BOB, "follow up", channel_id=general, reply_to=answer.id)
    await said(discord_api, general, "You said: follow up")
    # … and a mention in a thread.
    await discord_api.user_says(ALICE, "in a thread", channel_id=THREAD_ID, mentions_bot=True)
    await said(discord_api, THREAD_ID, "You said: in a thread")

    assert [r.last_user_message for r in model_server.requests] == [
        "question one", "follow up", "in a thread"]
    assert contents(discord_api, general) == ["You said: question one", "You said: follow up"]
    # In a server the answer replies to the user's message, without pinging them.
    assert answer.replies_to == int(question["id"])
    (post,) = discord_api.calls(f"POST /channels/{general}/messages")[:1]
    assert int(post.body["message_reference"]["message_id"]) == int(question["id"])
    assert not post.body["allowed_mentions"].get("replied_user")
    assert answer.pinged == frozenset()


async def test_model_sees_names_not_mentions(discord_api: DiscordEmulator, run_bot: StartBot,
                                             model_server: ModelServer) -> None:
    discord_api.add_user(BOB, "Bob", nick="Bobby", guild_id=GUILD_ID)
    await run_bot()
    await discord_api.user_says(
        ALICE, f"hey <@{BOT_ID}> greet <@{BOB}> and <@&{ROLE_ID}> in <#{TEXT_CHANNEL_ID}>",
        channel_id=TEXT_CHANNEL_ID)
    expected = "hey greet @Bobby and @Mods in #general"
    await said(discord_api, TEXT_CHANNEL_ID, f"You said: {expected}")
    assert model_server.requests[-1].last_user_message == expected


async def test_mentioning_the_bots_own_role_addresses_it(
        discord_api: DiscordEmulator, run_bot: StartBot, model_server: ModelServer) -> None:
    """Typing @BotName in a server often inserts the bot's managed role, not its user."""
    await run_bot()
    await discord_api.user_says(ALICE, f"<@&{BOT_ROLE_ID}> what time is it?",
                                channel_id=TEXT_CHANNEL_ID)
    await said(discord_api, TEXT_CHANNEL_ID, "You said: what time is it?")
    await discord_api.user_says(ALICE, f"<@&{ROLE_ID}> not for the bot",
                                channel_id=TEXT_CHANNEL_ID)
    await discord_api.user_says(ALICE, f"<@{BOT_ID}> and this one is",
                                channel_id=TEXT_CHANNEL_ID)
    await said(discord_api, TEXT_CHANNEL_ID, "You said: and this one is")
    assert [m.content for m in discord_api.bot_messages(TEXT_CHANNEL_ID)] == [
        "You said: what time is it?", "You said: and this one is"]
    assert [r.last_user_message for r in model_server.requests] == [
        "what time is it?", "and this one is"]


async def test_replies_never_ping(discord_api: DiscordEmulator, run_bot: StartBot,
                                  model_server: ModelServer) -> None:
    await run_bot()
    loud = f"@everyone @here <@{BOB}> <@&{ROLE_ID}> listen to this long announcement now"
    model_server.reply = loud
    model_server.chunk_delay = 0.03  # streamed: the text arrives by edits too
    await discord_api.user_says(ALICE, "announce", channel_id=TEXT_CHANNEL_ID,
                                mentions_bot=True)
    shown = await said(discord_api, TEXT_CHANNEL_ID, loud)

    assert shown.pinged == frozenset()  # nobody was notified
    sent = discord_api.calls(f"POST /channels/{TEXT_CHANNEL_ID}/messages")
    edits = discord_api.calls(f"PATCH /channels/{TEXT_CHANNEL_ID}/messages/")
    assert edits, "the reply was expected to stream by edits"
    for call in sent + edits:
        allowed = call.body["allowed_mentions"]
        assert allowed["parse"] == []
        assert not allowed.get("users") and not allowed.get("roles")
        assert not allowed.get("replied_user")


# -- slash commands -------------------------------------------------------------------------------


async def test_model_command_autocomplete_and_per_user_switch(
        discord_api: DiscordEmulator, run_bot: StartBot, model_server: ModelServer) -> None:
    await run_bot()
    assert sorted(discord_api.commands_synced()) == ["forget", "help", "language", "memory",
                                                     "model", "persona", "remember", "reset",
                                                     "stats", "stop"]
    typed = await discord_api.autocomplete(ALICE, "model", "name", "qw")
    await discord_api.wait_for(lambda: typed.choices is not None)
    assert [c["value"] for c in typed.choices or []] == ["qwen2.5"]

    shown = await discord_api.slash(ALICE, "model")
    await discord_api.wait_for(lambda: shown.answered)
    assert "llama3.2" in shown.texts[0] and "qwen2.5" in shown.texts[0]

    picked = await discord_api.slash(ALICE, "model", {"name": "qwen2.5"})
    await discord_api.wait_for(lambda: picked.answered)
    assert picked.texts == ["Done: your model is now `qwen2.5`."]

    everything = await discord_api.autocomplete(ALICE, "model", "name", "")
    await discord_api.wait_for(lambda: everything.choices is not None)
    assert [c["value"] for c in everything.choices or []] == ["qwen2.5", "llama3.2"]

    # Answers about a user's own settings are theirs alone, and came within 3 seconds.
    for interaction in (typed, shown, picked, everything):
        ack = interaction.ack_after
        assert ack is not None and ack < 3.0
    for interaction in (shown, picked):
        assert all(m.ephemeral for m in interaction.messages)
        assert interaction.callbacks[0].data["flags"] & FLAG_EPHEMERAL

    # Alice's pick is hers: Bob still talks to the default model.
    await discord_api.user_says(ALICE, "hi from alice")
    await said(discord_api, discord_api.dm_channel(ALICE), "You said: hi from alice")
    await discord_api.user_says(BOB, "hi from bob")
    await said(discord_api, discord_api.dm_channel(BOB), "You said: hi from bob")
    models = {r.last_user_message: r.model for r in model_server.requests}
    assert models == {"hi from alice": "qwen2.5", "hi from bob": "llama3.2"}


async def test_reset_is_private_and_forgets(discord_api: DiscordEmulator, run_bot: StartBot,
                                            model_server: ModelServer) -> None:
    bot = await run_bot(DISCORD_DEV_GUILD=GUILD_ID)
    # Synced globally, and to the development server at once.
    assert sorted(discord_api.commands_synced(GUILD_ID)) == sorted(discord_api.commands_synced())
    assert len(discord_api.commands_synced(GUILD_ID)) == 10
    general = TEXT_CHANNEL_ID
    await discord_api.user_says(ALICE, "my name is Alice", channel_id=general, mentions_bot=True)
    await said(discord_api, general, "You said: my name is Alice")

    reset = await discord_api.slash(ALICE, "reset", channel_id=general)
    await discord_api.wait_for(lambda: reset.answered)
    assert reset.texts[0].startswith("Done: I forgot this conversation (2 messages)")
    assert reset.ack_after is not None and reset.ack_after < 3.0
    (answer,) = reset.messages
    assert answer.ephemeral and answer.visible_to == ALICE
    assert answer not in discord_api.seen_by(BOB, general)
    assert answer in discord_api.seen_by(ALICE, general)

    await discord_api.user_says(ALICE, "what is my name?", channel_id=general, mentions_bot=True)
    await said(discord_api, general, "You said: what is my name?")  # no name: forgotten
    rows = await bot.service.store.audit_log(10)
    assert [r["status"] for r in rows] == ["ok", "ok"]

    help_ = await discord_api.slash(BOB, "help", channel_id=general)
    await discord_api.wait_for(lambda: help_.answered)
    assert "/model" in help_.texts[0] and not help_.messages[0].ephemeral
    assert "/persona" in help_.texts[0] and "/stop" in help_.texts[0]
    assert help_.callbacks[0].data["allowed_mentions"] == {"parse": []}


async def test_slow_command_is_deferred_then_answered(
        discord_api: DiscordEmulator, run_bot: StartBot,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discord_commands, "ANSWER_WITHIN", 0.05)
    release = asyncio.Event()

    async def slow_storage(msg: Incoming) -> None:
        await release.wait()

    await run_bot(wrap=lambda svc: ServiceProxy(svc, before=slow_storage))
    memory = await discord_api.slash(ALICE, "memory")
    await discord_api.wait_for(lambda: memory.acknowledged)
    assert memory.callbacks[0].type == CALLBACK_DEFERRED
    assert memory.ack_after is not None and memory.ack_after < 3.0
    assert memory.messages[0].loading and memory.messages[0].ephemeral
    release.set()
    await discord_api.wait_for(lambda: memory.answered)
    assert memory.texts[0].startswith("Stored messages in this conversation: 0")
    assert not memory.messages[0].loading


async def test_long_command_answer_continues_in_followups(
        discord_api: DiscordEmulator, run_bot: StartBot) -> None:
    report = "\n".join(f"Remembered fact number {i}: something worth keeping." for i in range(90))
    assert len(report) > 4000

    def long_memory(msg: Incoming) -> str | None:
        return report if msg.text == "/memory" else None

    await run_bot(wrap=lambda svc: ServiceProxy(svc, canned=long_memory))
    memory = await discord_api.slash(ALICE, "memory", channel_id=TEXT_CHANNEL_ID)
    await discord_api.wait_for(lambda: len(memory.texts) >= 3 and memory.texts[-1].endswith(
        "number 89: something worth keeping."))
    assert all(len(t) <= 2000 for t in memory.texts)
    assert "\n".join(memory.texts).split("\n") == report.split("\n")
    assert all(m.ephemeral and m.visible_to == ALICE for m in memory.messages)
    assert len(discord_api.calls(f"POST /webhooks/{BOT_ID}/")) == len(memory.texts) - 1


async def test_who_may_not_use_the_bot_gets_nothing_in_a_server(
        discord_api: DiscordEmulator, run_bot: StartBot, model_server: ModelServer) -> None:
    await run_bot(ALLOWED_USERS=f"discord:{ALICE}")
    # The core answers an outsider with an empty stream in a server: nothing is sent …
    await discord_api.user_says(BOB, "let me in", channel_id=TEXT_CHANNEL_ID, mentions_bot=True)
    help_ = await discord_api.slash(BOB, "help", channel_id=TEXT_CHANNEL_ID)
    await discord_api.wait_for(lambda: help_.acknowledged and not help_.messages)
    assert help_.callbacks[0].type == CALLBACK_DEFERRED  # closed silently: deferred, deleted
    await discord_api.user_says(ALICE, "I am allowed", channel_id=TEXT_CHANNEL_ID,
                                mentions_bot=True)
    await said(discord_api, TEXT_CHANNEL_ID, "You said: I am allowed")
    assert contents(discord_api, TEXT_CHANNEL_ID) == ["You said: I am allowed"]
    # … and in a DM a short refusal.
    await discord_api.user_says(BOB, "let me in")
    await said(discord_api, discord_api.dm_channel(BOB), "Sorry, this bot is private.")
    assert [r.last_user_message for r in model_server.requests] == ["I am allowed"]


# -- streaming and length -------------------------------------------------------------------------


async def test_typing_then_stream_with_per_conversation_throttle(
        discord_api: DiscordEmulator, run_bot: StartBot, model_server: ModelServer) -> None:
    interval = 0.1
    await run_bot(STREAM_EDIT_INTERVAL=interval)
    reply = " ".join(f"word{i}" for i in range(40))
    model_server.reply = reply
    model_server.chunk_delay = 0.015  # about 0.6 s of streaming: six intervals
    model_server.gate = asyncio.Event()
    alice_dm, bob_dm = discord_api.dm_channel(ALICE), discord_api.dm_channel(BOB)
    await discord_api.user_says(ALICE, "go")
    await discord_api.user_says(BOB, "go")
    # While the model has not answered: the typing indicator, and no message yet.
    await discord_api.wait_for(lambda: discord_api.calls(f"POST /channels/{alice_dm}/typing")
                               and discord_api.calls(f"POST /channels/{bob_dm}/typing"))
    assert not discord_api.bot_messages(alice_dm) and not discord_api.bot_messages(bob_dm)
    model_server.gate.set()
    alice = await said(discord_api, alice_dm, reply)
    bob = await said(discord_api, bob_dm, reply)

    for msg in (alice, bob):
        # The first text appeared long before the whole reply, then grew by edits …
        assert len(msg.versions[0][1]) < len(reply) // 2
        assert len(msg.edit_times) >= 3
        times = [at for at, _ in msg.versions]
        # … never more often than the interval (small slack for the clock); the renderer
        # sends the final edit, with the whole text, as soon as the stream ends.
        gaps = [b - a for a, b in itertools.pairwise(times[:-1])]
        assert min(gaps) >= interval - 0.01, gaps
    # The throttle is per conversation: the two replies edited in between each other.
    both = sorted(alice.edit_times + bob.edit_times)
    assert min(b - a for a, b in itertools.pairwise(both)) < interval
    spans = [(m.versions[0][0], m.versions[-1][0]) for m in (alice, bob)]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]  # they overlapped


async def test_rate_limit_mid_stream_is_obeyed(discord_api: DiscordEmulator,
                                               run_bot: StartBot,
                                               model_server: ModelServer) -> None:
    await run_bot()
    reply = " ".join(f"token{i}" for i in range(30))
    model_server.reply = reply
    model_server.chunk_delay = 0.02
    dm = discord_api.dm_channel(ALICE)
    discord_api.fail_next(f"PATCH /channels/{dm}/messages/*", status=429, retry_after=0.3)
    await discord_api.user_says(ALICE, "stream please")
    shown = await said(discord_api, dm, reply)  # the final text arrived whole

    edits = discord_api.calls(f"PATCH /channels/{dm}/messages/{shown.id}")
    statuses = [c.status for c in edits]
    assert statuses.count(429) == 1 and statuses[-1] == 200
    limited = statuses.index(429)
    retry = edits[limited + 1]
    assert retry.at - edits[limited].at >= 0.3 - 0.01  # waited as told
    assert retry.body["content"] == edits[limited].body["content"]  # the same edit again
    assert len(discord_api.bot_messages(dm)) == 1


async def test_long_reply_is_split_whole(discord_api: DiscordEmulator, run_bot: StartBot,
                                         model_server: ModelServer) -> None:
    await run_bot(REPLY_TOKENS=6000, CONTEXT_TOKENS=16384)
    prose = " ".join(f"sentence{i} goes here." for i in range(80))
    code = "\n".join(f"    value_{i} = compute({i}, 'x' * {i})" for i in range(90))
    tail = "\n".join(f"Line {i} of the closing notes." for i in range(40))
    reply = f"{prose}\n\n```python\n{code}\n```\n\n{tail}"
    assert len(reply) > 5000
    model_server.reply = reply
    model_server.tokens_per_chunk = 200
    question = await discord_api.user_says(ALICE, "a long one", channel_id=TEXT_CHANNEL_ID,
                                           mentions_bot=True)
    await discord_api.wait_for(lambda: any(
        m.content.endswith("Line 39 of the closing notes.")
        for m in discord_api.bot_messages(TEXT_CHANNEL_ID)))

    shown = discord_api.bot_messages(TEXT_CHANNEL_ID)
    assert len(shown) >= 3 and all(len(m.content) <= 2000 for m in shown)
    # Each message is valid Markdown on its own: code blocks closed and reopened.
    for m in shown:
        fences = [ln for ln in m.content.splitlines() if ln.startswith("```")]
        assert len(fences) % 2 == 0, m.content
    assert any(m.content.startswith("```python\n") for m in shown[1:])

    # No text lost or duplicated: the lines, without the added fences, are the reply's.
    def lines(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("```")]

    assert [ln for m in shown for ln in lines(m.content)] == lines(reply)
    # Only the first message is the reply to the user; Discord refused nothing.
    assert shown[0].replies_to == int(question["id"])
    assert all(m.replies_to is None for m in shown[1:])
    sends = discord_api.calls(f"POST /channels/{TEXT_CHANNEL_ID}/messages")
    edits = discord_api.calls(f"PATCH /channels/{TEXT_CHANNEL_ID}/messages/")
    assert len(sends) == len(shown) and all(c.status == 200 for c in sends + edits)


# -- failures -------------------------------------------------------------------------------------


async def test_model_server_down_gives_one_short_message(
        discord_api: DiscordEmulator, run_bot: StartBot) -> None:
    bot = await run_bot(OLLAMA_HOST=await closed_port_url())
    dm = discord_api.dm_channel(ALICE)
    await discord_api.user_says(ALICE, "hello?")
    await discord_api.wait_for(lambda: len(discord_api.bot_messages(dm)) == 1)
    # Turns run in order: once the second is answered, the first is over and stored.
    await discord_api.user_says(ALICE, "anyone?")
    await discord_api.wait_for(lambda: len(discord_api.bot_messages(dm)) == 2)

    for text in contents(discord_api, dm):
        assert text.startswith("⚠️") and len(text) < 200
        for internal in ("127.0.0.1", "Traceback", "Exception", "Error:", "http"):
            assert internal not in text
    rows = await bot.service.store.audit_log(10)
    assert [r["status"] for r in rows] == ["error", "error"]


async def test_a_failure_in_one_message_does_not_stop_the_bot(
        discord_api: DiscordEmulator, run_bot: StartBot,
        caplog: pytest.LogCaptureFixture) -> None:
    async def fail_once(msg: Incoming) -> None:
        if msg.text == "break":
            raise RuntimeError("internal detail: sqlite file locked at /srv/secret.db")

    await run_bot(wrap=lambda svc: ServiceProxy(svc, before=fail_once))
    dm = discord_api.dm_channel(ALICE)
    await discord_api.user_says(ALICE, "break")
    await said(discord_api, dm, APOLOGY)
    await discord_api.user_says(ALICE, "still there?")
    await said(discord_api, dm, "You said: still there?")

    assert contents(discord_api, dm) == [APOLOGY, "You said: still there?"]
    assert "internal detail" in caplog.text  # the operator gets the detail …
    assert not any("secret.db" in c for c in contents(discord_api, dm))  # … the user doesn't


# -- connecting and stopping ----------------------------------------------------------------------


async def test_a_wrong_token_fails_without_showing_it(
        discord_api: DiscordEmulator, discord_settings: SettingsFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    wrong = "MTEwMDAwMDAwMDAwMDAwMDAwMQ.WRONG0.not-the-right-token-9876543210"
    settings = discord_settings(DISCORD_TOKEN=wrong)
    async with open_service(settings) as svc:
        with pytest.raises(discord.LoginFailure) as failure:
            await asyncio.wait_for(DiscordAdapter(settings).run(svc, asyncio.Event()), 10)
    assert wrong not in str(failure.value) and wrong not in caplog.text
    assert discord_api.calls("GET /users/@me")[0].status == 401
    # The endpoints discord.py keeps in class attributes are put back.
    assert Route.BASE == "https://discord.com/api/v10"


async def test_sharded_start_reaches_guilds_on_every_shard(run_bot: StartBot,
                                                           model_server: ModelServer) -> None:
    async with DiscordEmulator(token=TOKEN, recommended_shards=2, max_concurrency=2) as api:
        zero = api.add_guild("Zero", on_shard=(0, 2))
        one = api.add_guild("One", on_shard=(1, 2))
        bot = await run_bot(api=api, shards=2)

        assert api.calls("GET /gateway/bot")  # discord.py asked Discord how many shards
        assert sorted(i["shard"] for i in api.identifies) == [[0, 2], [1, 2]]
        assert {i["intents"] for i in api.identifies} == {EXPECTED_INTENTS}
        client = bot.adapter.client
        assert client is not None and set(client.shards) == {0, 1}
        for guild in (zero, one):
            channel = next(iter(guild.channels))
            await api.user_says(ALICE, f"hi {guild.name}", channel_id=channel, mentions_bot=True)
            await said(api, channel, f"You said: hi {guild.name}")
        await bot.stop()
        assert {s.close_code for s in api.closed_sessions} == {1000}


async def test_configured_shards_run_only_those(run_bot: StartBot) -> None:
    async with DiscordEmulator(token=TOKEN) as api:
        one = api.add_guild("One", on_shard=(1, 2))
        bot = await run_bot(api=api, DISCORD_SHARD_COUNT=2, DISCORD_SHARD_IDS="1")
        assert [i["shard"] for i in api.identifies] == [[1, 2]]
        assert not api.calls("GET /gateway/bot")  # the count was given
        channel = next(iter(one.channels))
        await api.user_says(ALICE, "hello shard one", channel_id=channel, mentions_bot=True)
        await said(api, channel, "You said: hello shard one")
        await bot.stop()  # before its emulator goes away


async def test_sigterm_finishes_in_flight_and_exits_0(
        discord_api: DiscordEmulator, model_server: ModelServer, db_url: str,
        make_settings: SettingsFactory, tmp_path: Path) -> None:
    GRACE = 0.3  # the held reply is cut after this: nothing else waits on it
    # Only what the bot needs: no settings, proxies or tokens from this machine leak in.
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update({
        "PYTHONPATH": str(REPO), "DISCORD_TOKEN": TOKEN,
        "DISCORD_API_BASE": discord_api.api_base, "OLLAMA_HOST": model_server.url,
        "DATABASE_URL": db_url, "SHUTDOWN_GRACE": str(GRACE), "STREAM_EDIT_INTERVAL": "0.2",
        "LLM_RETRIES": "0", "RATE_LIMIT_PER_MINUTE": "0", "LOG_LEVEL": "DEBUG",
    })
    # cwd: a directory without a .env, so only this environment counts.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    output = asyncio.create_task(proc.stdout.read())
    try:
        await discord_api.wait_ready(timeout=20)
        dm = discord_api.dm_channel(ALICE)
        await discord_api.user_says(ALICE, "hello from outside")
        await said(discord_api, dm, "You said: hello from outside")

        model_server.gate = asyncio.Event()  # the next reply is held in flight
        await discord_api.user_says(ALICE, "a slow question")
        await model_server.wait_for_requests(2)
        await discord_api.wait_for(lambda: discord_api.calls(f"POST /channels/{dm}/typing"))
        proc.send_signal(signal.SIGTERM)
        started = asyncio.get_running_loop().time()
        code = await asyncio.wait_for(proc.wait(), timeout=15)
        took = asyncio.get_running_loop().time() - started
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log_text = (await output).decode(errors="replace")

    assert code == 0, log_text[-3000:]
    assert took < GRACE + 5 + 3  # SHUTDOWN_GRACE, the drain margin, start-up slack
    assert TOKEN not in log_text
    assert discord_api.closed_sessions and discord_api.closed_sessions[-1].close_code == 1000
    # The held reply was cut short with a note, and recorded as cancelled.
    assert contents(discord_api, dm)[-1] == "The bot is restarting. Please send that again."
    async with open_service(make_settings()) as svc:
        rows = await svc.store.audit_log(10)
    assert [r["status"] for r in rows] == ["ok", "cancelled"]


# -- /stop's button and /persona ------------------------------------------------------------------

STORY = " ".join(f"word{i}" for i in range(400))
CAROL = 2_100_000_000_000_000_005


async def _streaming(api: DiscordEmulator, model_server: ModelServer, user: int,
                     channel_id: int) -> ShownMessage:
    model_server.reply = STORY
    model_server.chunk_delay = 0.03
    await api.user_says(user, "tell me a long story", channel_id=channel_id, mentions_bot=True)
    await api.wait_for(lambda: any(m.content.startswith("word0") and m.buttons
                                   for m in api.bot_messages(channel_id)))
    return next(m for m in api.bot_messages(channel_id)
                if m.content.startswith("word0") and m.buttons)


async def test_discord_stop_button_stops_the_stream_only_for_the_asker_or_an_admin(
        discord_api: DiscordEmulator, run_bot: StartBot, model_server: ModelServer) -> None:
    bot = await run_bot()
    answer = await _streaming(discord_api, model_server, ALICE, TEXT_CHANNEL_ID)
    [button] = answer.buttons
    assert button["label"] == "Stop" and button["custom_id"].startswith(f"stop:{ALICE}:")
    # Bob is no admin of the server: his press is refused, the stream goes on.
    bobs = await discord_api.press(BOB, answer, button["custom_id"])
    await discord_api.wait_for(lambda: bobs.answered)
    assert "Only the person who asked" in bobs.texts[0]
    assert all(m.ephemeral for m in bobs.messages)
    assert model_server.disconnects == 0 and answer.buttons
    alices = await discord_api.press(ALICE, answer, button["custom_id"])
    await model_server.wait_for_disconnects(1, timeout=1)
    await discord_api.wait_for(lambda: answer.content.endswith("⏹ stopped")
                               and not answer.buttons)
    assert alices.callbacks[0].type == 6 and (alices.ack_after or 9) < 3.0  # deferred update
    rows = [r for r in await bot.service.store.audit_log(10) if r["kind"] == "chat"]
    assert rows[-1]["status"] == "cancelled"
    assert answer.content == rows[-1]["model_response"] + "\n\n⏹ stopped"
    # The next prompt lacks the stopped exchange.
    model_server.reply = None
    model_server.chunk_delay = 0
    await discord_api.user_says(ALICE, "again", channel_id=TEXT_CHANNEL_ID,
                                mentions_bot=True)
    await discord_api.wait_for(lambda: any(m.content == "You said: again"
                                           for m in discord_api.bot_messages(TEXT_CHANNEL_ID)))
    prompt = model_server.requests[-1].messages
    assert not any("word0" in m["content"] or "long story" in m["content"] for m in prompt)
    # A server admin (Manage Server) may stop someone else's reply.
    answer = await _streaming(discord_api, model_server, BOB, TEXT_CHANNEL_ID)
    discord_api.admins.add((GUILD_ID, CAROL))
    await discord_api.press(CAROL, answer, answer.buttons[0]["custom_id"])
    await model_server.wait_for_disconnects(2, timeout=1)
    await discord_api.wait_for(lambda: answer.content.endswith("⏹ stopped"))


async def test_discord_persona_autocomplete_pick_and_admin_default(
        discord_api: DiscordEmulator, run_bot: StartBot, model_server: ModelServer,
        tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[teacher]\ndescription = "老師"\nsystem = "你是一位老師。"\n'
                    '[coach]\ndescription = "a coach"\nsystem = "Coach me."\n',
                    encoding="utf-8")
    bot = await run_bot(PERSONAS_FILE=str(path))
    typed = await discord_api.autocomplete(ALICE, "persona", "name", "co")
    await discord_api.wait_for(lambda: typed.choices is not None)
    assert typed.choices == [{"name": "coach: a coach", "value": "coach"}]
    picked = await discord_api.slash(ALICE, "persona", {"name": "teacher"})
    await discord_api.wait_for(lambda: picked.answered)
    assert picked.texts == ["Done: this conversation now uses the persona `teacher`."]
    await discord_api.user_says(ALICE, "hi")
    await said(discord_api, discord_api.dm_channel(ALICE), "You said: hi")
    assert model_server.requests[-1].messages[0]["content"] == "你是一位老師。"
    # The server's default: Bob (no Manage Server) may not set it, Carol may.
    refused = await discord_api.slash(BOB, "persona", {"name": "coach default"},
                                      channel_id=TEXT_CHANNEL_ID)
    await discord_api.wait_for(lambda: refused.answered)
    assert "admins" in refused.texts[0]
    discord_api.admins.add((GUILD_ID, CAROL))
    done = await discord_api.slash(CAROL, "persona", {"name": "coach default"},
                                   channel_id=TEXT_CHANNEL_ID)
    await discord_api.wait_for(lambda: done.answered)
    assert done.texts == ["Done: `coach` is now the default persona here."]
    assert await bot.service.store.personas_of("-", "discord", str(GUILD_ID)) == (None, "coach")
    await discord_api.user_says(BOB, "hello", channel_id=TEXT_CHANNEL_ID,
                                mentions_bot=True)
    await discord_api.wait_for(lambda: any(m.content == "You said: hello"
                                           for m in discord_api.bot_messages(TEXT_CHANNEL_ID)))
    assert model_server.requests[-1].messages[0]["content"] == "Coach me."


# -- picks: buttons and a select menu from the reply's choices ------------------------------------


def components_sent(interaction: InteractionRecord) -> list[dict[str, Any]]:
    """The components the bot put on its answer, as they crossed the wire."""
    return [c for row in interaction.callbacks[0].data.get("components") or []
            for c in row["components"]]


async def test_model_buttons_are_the_askers_and_a_press_switches_her_model(
        discord_api: DiscordEmulator, run_bot: StartBot, model_server: ModelServer) -> None:
    bot = await run_bot()
    shown = await discord_api.slash(ALICE, "model", channel_id=TEXT_CHANNEL_ID)
    await discord_api.wait_for(lambda: shown.answered)
    [menu] = shown.messages
    assert menu.ephemeral and menu.visible_to == ALICE
    assert [b["label"] for b in menu.buttons] == ["✓ llama3.2", "qwen2.5"]
    assert [c["custom_id"] for c in components_sent(shown)] == [
        f"pick:model:{ALICE}:llama3.2", f"pick:model:{ALICE}:qwen2.5"]
    assert shown.callbacks[0].data["flags"] & FLAG_EPHEMERAL
    listing = menu.content

    # Bob cannot see Alice's menu; a forged press of his is refused, privately.
    bobs = await discord_api.press(BOB, menu, f"pick:model:{ALICE}:qwen2.5")
    await discord_api.wait_for(lambda: bobs.answered)
    assert bobs.texts == ["This menu belongs to someone else. Send /model to pick yours."]
    assert all(m.ephemeral and m.visible_to == BOB for m in bobs.messages)
    assert menu.content == listing and len(menu.buttons) == 2
    store = bot.service.store
    assert await store.user_model("discord", str(ALICE)) is None
    assert await store.user_model("discord", str(BOB)) is None

    alices = await discord_api.press(ALICE, menu, f"pick:model:{ALICE}:qwen2.5")
    await discord_api.wait_for(lambda: not menu.buttons)
    # Answered first ("got it", the message unchanged), then the menu shows the pick.
    assert alices.callbacks[0].type == CALLBACK_DEFERRED_UPDATE
    assert alices.ack_after is not None and alices.ack_after < 3.0
    assert menu.content == "Done: your model is now `qwen2.5`."
    [edit] = discord_api.calls(f"PATCH /webhooks/{BOT_ID}/{alices.token}/messages/@original")
    assert edit.body["content"] == menu.content and edit.body["components"] == []
    assert await store.user_model("discord", str(ALICE)) == "qwen2.5"
    assert await store.user_model("discord", str(BOB)) is None

    # The same path as typing the argument: the next turn is on her model.
    await discord_api.user_says(ALICE, "which model?")
    await said(discord_api, discord_api.dm_channel(ALICE), "You said: which model?")
    assert model_server.requests[-1].model == "qwen2.5"
    again = await discord_api.slash(ALICE, "model")
    await discord_api.wait_for(lambda: again.answered)
    assert [b["label"] for b in again.messages[0].buttons] == ["llama3.2", "✓ qwen2.5"]


async def test_persona_select_menu_past_five_choices(
        discord_api: DiscordEmulator, run_bot: StartBot, model_server: ModelServer,
        tmp_path: Path) -> None:
    names = ["coach", "critic", "editor", "poet", "teacher", "tutor"]
    path = tmp_path / "personas.toml"
    path.write_text("".join(f'[{n}]\ndescription = "the {n}"\nsystem = "You are the {n}."\n'
                            for n in names), encoding="utf-8")
    bot = await run_bot(PERSONAS_FILE=str(path))
    shown = await discord_api.slash(ALICE, "persona")
    await discord_api.wait_for(lambda: shown.answered)
    [menu] = shown.messages
    assert menu.ephemeral and not menu.buttons
    [select] = menu.selects
    assert select["custom_id"] == f"pick:persona:{ALICE}"
    assert [(o["label"], o["value"]) for o in select["options"]] == [
        *((f"{n}: the {n}", n) for n in names), ("off (the default)", "off")]
    assert components_sent(shown)[0]["type"] == 3  # a string select on the wire

    # Bob's forged pick in Alice's menu is refused; hers sets her persona.
    bobs = await discord_api.choose(BOB, menu, select["custom_id"], ["poet"])
    await discord_api.wait_for(lambda: bobs.answered)
    assert "belongs to someone else" in bobs.texts[0] and bobs.messages[0].ephemeral
    # A persona gone since the menu was shown (the file was reloaded): told, not applied.
    path.write_text(path.read_text(encoding="utf-8").replace("[critic]", "[judge]"),
                    encoding="utf-8")
    assert await bot.service.personas.reload_async()
    stale = await discord_api.choose(ALICE, menu, select["custom_id"], ["critic"])
    await discord_api.wait_for(lambda: stale.answered)
    assert stale.callbacks[0].type == CALLBACK_DEFERRED_UPDATE
    assert stale.texts == ["That choice is no longer offered. Send /persona for the list."]
    assert stale.messages[0].ephemeral and menu.selects  # the menu stays as it was
    key = f"discord:{ALICE}@dm"
    assert await bot.service.store.personas_of(key, "discord", None) == (None, None)
    alices = await discord_api.choose(ALICE, menu, select["custom_id"], ["poet"])
    await discord_api.wait_for(lambda: not menu.selects)
    assert alices.callbacks[0].type == CALLBACK_DEFERRED_UPDATE
    assert menu.content == "Done: this conversation now uses the persona `poet`."
    assert await bot.service.store.personas_of(key, "discord", None) == ("poet", None)
    await discord_api.user_says(ALICE, "hello")
    await said(discord_api, discord_api.dm_channel(ALICE), "You said: hello")
    assert model_server.requests[-1].messages[0]["content"] == "You are the poet."
    # The menu now marks her pick as the current one.
    again = await discord_api.slash(ALICE, "persona")
    await discord_api.wait_for(lambda: again.answered)
    [options] = [s["options"] for s in again.messages[0].selects]
    assert [o["value"] for o in options if o["default"]] == ["poet"]


async def test_language_buttons_switch_the_bots_words(
        discord_api: DiscordEmulator, run_bot: StartBot) -> None:
    bot = await run_bot()
    shown = await discord_api.slash(ALICE, "language")
    await discord_api.wait_for(lambda: shown.answered)
    [menu] = shown.messages
    labels = [b["label"] for b in menu.buttons]
    assert labels == ["English", "繁體中文", "简体中文"]
    [tw] = [b for b in menu.buttons if b["label"] == "繁體中文"]
    await discord_api.press(ALICE, menu, tw["custom_id"])
    await discord_api.wait_for(lambda: not menu.buttons)
    assert menu.content == "好了，之後我會用繁體中文跟你說話。"
    assert await bot.service.store.user_language("discord", str(ALICE)) == "zh-TW"
    memory = await discord_api.slash(ALICE, "memory")
    await discord_api.wait_for(lambda: memory.answered)
    assert memory.texts[0].startswith("這段對話已儲存的訊息：0 則")


def test_a_menu_keeps_to_discords_limits_and_long_keys_still_resolve() -> None:
    long_key = "registry.example.org/models/" + "x" * 120 + ":latest"
    few = Choices("model", (Choice("llama3.2", "llama3.2", True), Choice(long_key, long_key)))
    buttons = choices_view(ALICE, few)
    assert buttons is not None
    ids = [c["custom_id"] for row in buttons.to_components() for c in row["components"]]
    assert all(len(i) <= 100 for i in ids) and ids[0] == f"pick:model:{ALICE}:llama3.2"
    assert few.resolve(ids[1].rsplit(":", 1)[1]) == few.options[1]  # the digest names it
    many = Choices("persona", tuple(Choice(f"p{i}", f"persona {i}") for i in range(40)))
    select = choices_view(ALICE, many)
    assert select is not None
    [[menu]] = [row["components"] for row in select.to_components()]
    assert menu["type"] == 3 and len(menu["options"]) == 25  # Discord's most
    assert choices_view(ALICE, Choices("persona", ())) is None


def test_bad_shard_settings_stop_the_adapter_before_it_starts(
        discord_settings: SettingsFactory) -> None:
    with pytest.raises(SettingsError) as bad:
        DiscordAdapter(discord_settings(DISCORD_SHARD_COUNT=2, DISCORD_SHARD_IDS="0,one"))
    assert str(bad.value) == ("DISCORD_SHARD_IDS=0,one: allowed: comma-separated shard "
                              "numbers like 0,1")
    with pytest.raises(SettingsError, match="DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT"):
        DiscordAdapter(discord_settings(DISCORD_SHARD_IDS="1"))
    assert shard_ids(discord_settings(DISCORD_SHARD_COUNT=2, DISCORD_SHARD_IDS=" 1 ,0")) == [1, 0]
    assert shard_ids(discord_settings()) is None  # every shard: discord.py decides
