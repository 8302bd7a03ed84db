"""Which Discord messages the bot answers, and the text the model sees from them.

Pure functions over discord.py objects: no network, no core.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Awaitable, Callable

import discord

from bot.images import Downloader, Fetch, ImageRef, is_image_type
from bot.messages import Incoming

PLATFORM = "discord"
# The languages Discord names as the bot does (its locales zh-TW and zh-CN).
DISCORD_LOCALES = ("zh-TW", "zh-CN")
# User, role and channel mentions as Discord writes them in message content.
_MENTION = re.compile(r"<(@[!&]?|#)(\d{15,20})>")
# Only ordinary messages and replies carry something to answer (not joins, pins, …).
_CHAT_TYPES = (discord.MessageType.default, discord.MessageType.reply)


def is_addressed(message: discord.Message, me_id: int) -> bool:
    """Every DM; in a server channel or thread, a mention of the bot or a reply to it."""
    if message.author.id == me_id or message.author.bot or message.webhook_id is not None:
        return False
    if message.type not in _CHAT_TYPES:
        return False
    if place_of(message) is None:
        return True
    if any(user.id == me_id for user in message.mentions):
        return True
    # Typing @BotName in a server often picks the bot's own managed role.
    own_role = message.guild.self_role if message.guild is not None else None
    if own_role is not None and own_role in message.role_mentions:
        return True
    ref = message.reference
    replied = ref.resolved if ref is not None else None
    return isinstance(replied, discord.Message) and replied.author.id == me_id


def place_of(message: discord.Message) -> str | None:
    """The server id, or None in a DM."""
    if message.guild is not None:
        return str(message.guild.id)
    if isinstance(message.channel, discord.DMChannel | discord.GroupChannel):
        return None
    guild_id = getattr(message.channel, "guild_id", None)  # a channel not in the cache
    return str(guild_id) if guild_id is not None else None


def text_for_model(message: discord.Message, me_id: int) -> str:
    """The content without the bot's mention; other mentions as the names people see."""
    guild = message.guild
    users = {user.id: user.display_name for user in message.mentions}

    def name_of(match: re.Match[str]) -> str:
        kind, ident = match[1], int(match[2])
        if kind in ("@", "@!"):
            member = guild.get_member(ident) if guild is not None else None
            name = member.display_name if member is not None else users.get(ident)
            return f"@{name}" if name else match[0]
        if kind == "@&":
            role = guild.get_role(ident) if guild is not None else None
            return f"@{role.name}" if role is not None else match[0]
        channel = guild.get_channel_or_thread(ident) if guild is not None else None
        return f"#{channel.name}" if channel is not None else match[0]

    # The bot's own mention (or its managed role's) goes with the spaces around
    # it; other spacing (code!) stays.
    own_role = guild.self_role if guild is not None else None
    own = rf"<@!?{me_id}>" + (rf"|<@&{own_role.id}>" if own_role is not None else "")
    text = re.sub(rf"[ \t]*(?:{own})[ \t]*", " ", message.content)
    return _MENTION.sub(name_of, text).strip()


def _mime(attachment: discord.Attachment) -> str:
    # Discord names the type of nearly every upload; else the file name says.
    return attachment.content_type or mimetypes.guess_type(attachment.filename)[0] or ""


def images_of(message: discord.Message, downloader: Downloader) -> tuple[ImageRef, ...]:
    """The image attachments (content_type image/*), with the size Discord announces;
    downloaded from the attachment's URL with a cap, as Attachment.read() would uncapped."""

    def fetcher(url: str) -> Fetch:
        async def fetch(max_bytes: int) -> bytes:
            return await downloader.get(url, max_bytes)
        return fetch

    return tuple(ImageRef(a.size, _mime(a), fetcher(a.url)) for a in message.attachments
                 if is_image_type(_mime(a)))


def unsupported_kind(message: discord.Message) -> str:
    """What came that the bot can't read, when no picture came with it: "sticker",
    "voice", "video", "audio" or "file"; "" otherwise."""
    attachments = message.attachments
    if any(is_image_type(_mime(a)) for a in attachments):
        return ""
    if message.stickers:
        return "sticker"
    if not attachments:
        return ""
    first = attachments[0]
    if first.is_voice_message():
        return "voice"
    mime = _mime(first)
    return "video" if mime.startswith("video/") else "audio" if mime.startswith("audio/") \
        else "file"


def _admin_signal(allowed: bool) -> Callable[[], Awaitable[bool]]:
    async def place_admin() -> bool:
        return allowed
    return place_admin


def incoming_from_message(message: discord.Message, text: str, *,
                          images: tuple[ImageRef, ...] = (), unsupported: str = "") -> Incoming:
    # Manage Server: Discord's own mark of a server's admins (the core decides what it allows).
    author = message.author
    admin = isinstance(author, discord.Member) and author.guild_permissions.manage_guild
    return Incoming(
        platform=PLATFORM,
        user_id=str(message.author.id),
        display_name=message.author.display_name,
        chat_id=str(message.channel.id),
        place_id=place_of(message),
        text=text,
        raw=message,
        # A message carries no locale of its sender: the server's preferred one.
        language=from_discord(message.guild.preferred_locale)
        if message.guild is not None else None,
        images=images,
        unsupported=unsupported,
        place_admin=_admin_signal(admin),
    )


def from_discord(locale: object) -> str | None:
    """A Discord locale (`interaction.locale`, `guild.preferred_locale`) → a language.

    Discord's own zh-TW and zh-CN as they are; anything else → en; None if none.
    """
    if locale is None:
        return None
    value = str(getattr(locale, "value", locale)).strip()
    if not value:
        return None
    return value if value in DISCORD_LOCALES else "en"


def incoming_from_interaction(interaction: discord.Interaction, text: str) -> Incoming:
    """A slash command as the chat command the core implements (`/model NAME`)."""
    return Incoming(
        platform=PLATFORM,
        user_id=str(interaction.user.id),
        display_name=interaction.user.display_name,
        chat_id=str(interaction.channel_id),
        place_id=str(interaction.guild_id) if interaction.guild_id is not None else None,
        text=text,
        raw=interaction,
        language=from_discord(interaction.locale),  # the user's own client language
        place_admin=_admin_signal(interaction.guild_id is not None
                                  and interaction.permissions.manage_guild),
    )
