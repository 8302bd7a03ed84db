"""Which Telegram messages are for the bot, and what text the core should see.

Private chats: every message with text, and every photo, sticker, voice note
or file (captioned or not: the core sees the picture or says what it can't
read). Groups: only a message that mentions @botname, replies to one of the
bot's messages, or is a command addressed to it (`/reset@botname`, or a bare
`/reset` when `reset` is one of our commands); media without a caption count
there only as a reply to the bot. Bots and service messages are never
answered. The bot's own mention is removed from the text.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from telegram import Message, MessageEntity
from telegram.constants import ChatType

from adapters.telegram.media import has_media

_HOLE = "\x00"  # marks where a mention was cut out
_AROUND_HOLE = re.compile(rf"[ \t]*{_HOLE}[,:;]?[ \t]*")


@dataclass(frozen=True, slots=True)
class BotIdentity:
    id: int
    username: str


def addressed_text(message: Message, me: BotIdentity, commands: Collection[str]) -> str | None:
    """The text for the core ("" for uncaptioned media), or None when the bot should
    stay silent."""
    sender = message.from_user
    if sender is None or sender.is_bot:
        return None
    if message.text is not None:
        text, entities = message.text, message.entities
    elif message.caption is not None:
        text, entities = message.caption, message.caption_entities
    else:
        text, entities = "", ()
    if not text.strip():
        if not has_media(message):
            return None  # a service message, or nothing but spaces
        # A sticker or a bare photo: every one in private, in a group a reply to the bot.
        private = message.chat.type == ChatType.PRIVATE
        return "" if private or _replies_to(message, me) else None
    # One UTF-16 encoding for every entity: linear in text and entities, however
    # many a (self-hosted) Bot API sends. (python-telegram-bot's parse_entities
    # encodes the whole text again for each entity, which is what made this quadratic.)
    utf16 = text.encode("utf-16-le", "surrogatepass")

    def parse(entity: MessageEntity) -> str:
        span = utf16[2 * entity.offset:2 * (entity.offset + entity.length)]
        return span.decode("utf-16-le", "surrogatepass")

    private = message.chat.type == ChatType.PRIVATE
    username = me.username.lower()
    cuts: list[tuple[int, int]] = []  # UTF-16 spans to remove
    addressed = private

    first = entities[0] if entities else None
    if first is not None and first.type == MessageEntity.BOT_COMMAND and first.offset == 0:
        token = parse(first)
        name, _, target = token[1:].partition("@")
        if target and target.lower() != username:
            return None  # a command for another bot
        if target:
            cuts.append((1 + _utf16_len(name), first.length))  # keep "/name", drop "@bot"
            addressed = True
        elif name.lower() in commands:
            addressed = True
    for entity in entities:
        mention = (entity.type == MessageEntity.MENTION
                   and parse(entity).lower() == f"@{username}")
        text_mention = (entity.type == MessageEntity.TEXT_MENTION and entity.user is not None
                        and entity.user.id == me.id)
        if mention or text_mention:
            cuts.append((entity.offset, entity.offset + entity.length))
            addressed = True
    if not addressed and _replies_to(message, me):
        addressed = True
    if not addressed:
        return None
    return _without(text, utf16, cuts)


def _replies_to(message: Message, me: BotIdentity) -> bool:
    replied = message.reply_to_message
    if replied is None or replied.from_user is None or replied.from_user.id != me.id:
        return False
    # In a forum topic every message "replies" to the topic's first message.
    return replied.forum_topic_created is None


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _without(text: str, data: bytes, cuts: list[tuple[int, int]]) -> str:
    """Text (`data`: its UTF-16) with the spans cut out and the spacing around them tidied."""
    if not cuts:
        return text.strip()
    out, pos = [], 0
    hole = _HOLE.encode("utf-16-le")
    for start, end in sorted(cuts):
        if start < pos:
            continue  # overlapping entities: already cut
        out += [data[2 * pos:2 * start], hole]
        pos = end
    out.append(data[2 * pos:])
    joined = b"".join(out).decode("utf-16-le", "surrogatepass")
    # "/reset@bot now" → "/reset now": a cut inside a word leaves no space
    joined = re.sub(rf"(?<=\S){_HOLE}(?=\s|$)", "", joined)
    return _AROUND_HOLE.sub(" ", joined).strip()
