"""The renderer through the real Discord sink, on the Discord emulator and the real core.

discord.py against the Discord API emulator, on the real core. What the user saw is the
emulator's messages; what crossed the wire is its recorded calls (issue 11, item 7 on
Discord)."""

from __future__ import annotations

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
