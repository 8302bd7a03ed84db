"""The Discord settings' parsed forms: the token and the shards this process runs.

(Their checks stay with the fields in bot.settings, so that a bad value is
refused when the settings load, before any adapter starts.)
"""

from __future__ import annotations

from bot.settings import Settings


def bot_token(settings: Settings) -> str:
    if settings.DISCORD_TOKEN is None:
        raise ValueError("the Discord adapter needs DISCORD_TOKEN")
    return settings.DISCORD_TOKEN.get_secret_value()


def shard_ids(settings: Settings) -> list[int] | None:
    """DISCORD_SHARD_IDS as numbers; None: every shard (discord.py decides)."""
    ids = [int(p.strip()) for p in settings.DISCORD_SHARD_IDS.split(",") if p.strip()]
    return ids or None
