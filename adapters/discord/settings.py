"""The Discord settings' parsing and checks: the token and the shards this process runs.

They run when the adapter is made (`DiscordAdapter(settings)`), before anything
starts, so a bad value stops `python -m bot` with one line, as a bad setting does.
"""

from __future__ import annotations

from bot.settings import Settings, SettingsError


def bot_token(settings: Settings) -> str:
    if settings.DISCORD_TOKEN is None:
        raise ValueError("the Discord adapter needs DISCORD_TOKEN")
    return settings.DISCORD_TOKEN.get_secret_value()


def shard_ids(settings: Settings) -> list[int] | None:
    """DISCORD_SHARD_IDS as numbers; None: every shard (discord.py decides)."""
    parts = [p.strip() for p in settings.DISCORD_SHARD_IDS.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise SettingsError(f"DISCORD_SHARD_IDS={settings.DISCORD_SHARD_IDS}: allowed: "
                            "comma-separated shard numbers like 0,1")
    if parts and settings.DISCORD_SHARD_COUNT is None:
        raise SettingsError("DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT")
    return [int(p) for p in parts] or None
