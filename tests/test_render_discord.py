"""The renderer through the real Discord sink, on the Discord emulator and the real core.

discord.py against the Discord API emulator, on the real core. What the user saw is the
emulator's messages; what crossed the wire is its recorded calls (issue 11, item 7 on
Discord)."""

from __future__ import annotations

import asyncio

import discord

from adapters.discord.sink import ChannelSink
from adapters.discord.testing import ALICE, StartBot
from bot.render import fence_after
from tests.fakes.discord_api import TEXT_CHANNEL_ID, DiscordEmulator
from tests.fakes.model_server import ModelServer


async def test_a_fence_line_longer_than_a_message_is_split_under_the_limit(
        discord_api: DiscordEmulator, run_bot: StartBot,
        model_server: ModelServer) -> None:
    api, start = discord_api, run_bot
    await start(REPLY_TOKENS=6000, CONTEXT_TOKENS=16384)
    model_server.reply = "```" + "x" * 5000 + "\nprint(1)\n```\nafter"
    model_server.tokens_per_chunk = 500
    await api.user_says(ALICE, "a fence", channel_id=TEXT_CHANNEL_ID,
                        mentions_bot=True)
    await api.wait_for(lambda: any(
        m.content.endswith("print(1)\n```\nafter")
        for m in api.bot_messages(TEXT_CHANNEL_ID)))
    shown = api.bot_messages(TEXT_CHANNEL_ID)
    assert len(shown) == 3  # 5,013 characters: three messages, not one, nor hundreds
    assert all(len(m.content) <= 2000 for m in shown)
    assert all(fence_after(m.content, None) is None for m in shown)
    assert "".join(m.content for m in shown).count("x") == 5000
    sends = api.calls(f"POST /channels/{TEXT_CHANNEL_ID}/messages")
    edits = api.calls(f"PATCH /channels/{TEXT_CHANNEL_ID}/messages/")
    assert len(sends) == 3 and all(c.status == 200 for c in sends + edits)


async def test_a_stop_button_released_while_the_first_message_carries_it_still_goes(
        discord_api: DiscordEmulator, run_bot: StartBot) -> None:
    # The reply ends (its button released) while its first message, which carries the
    # button, is on its way: the next edit must take the button off.
    bot = await run_bot()
    assert bot.adapter.client is not None
    channel = bot.adapter.client.get_channel(TEXT_CHANNEL_ID)
    assert isinstance(channel, discord.TextChannel)
    view = discord.ui.View(timeout=None)
    view.add_item(discord.ui.Button(label="Stop", custom_id=f"stop:{ALICE}:1"))
    sink = ChannelSink(channel, view=view)
    route = f"POST /channels/{TEXT_CHANNEL_ID}/messages"
    gate = discord_api.hold_next(route)
    sending = asyncio.create_task(sink.send("word0", formatted=True))
    await discord_api.wait_for(lambda: discord_api.calls(route))
    sink.release_view()
    gate.set()
    async with asyncio.timeout(5):
        first = await sending
        await sink.edit(first, "word0 word1", formatted=True)
        await sink.drop_view()
    [shown] = discord_api.bot_messages(TEXT_CHANNEL_ID)
    assert shown.content == "word0 word1" and shown.buttons == []
    assert discord_api.calls(f"PATCH /channels/{TEXT_CHANNEL_ID}/messages/")[-1].body[
        "components"] == []
