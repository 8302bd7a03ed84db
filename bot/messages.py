"""The platform-neutral message an adapter hands to the core.

Like errbot's backends or opsdroid's connectors: adapters translate their
platform's objects into these, keep the raw object aside, and render the
Markdown the core streams back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bot.images import ImageRef


@dataclass(frozen=True, slots=True)
class Incoming:
    """One message a user sent to the bot."""

    platform: str  # "telegram", "discord", "console"
    user_id: str
    display_name: str
    chat_id: str  # where the reply goes: a DM chat, a channel, a group
    place_id: str | None  # the server / group; None in a direct message
    text: str  # what the model sees: mention of the bot already stripped
    raw: object = field(default=None, compare=False, repr=False)
    # The platform's own word on whether the sender runs this server or group
    # (Discord: Manage Server; Telegram: creator or administrator), asked only
    # when a command needs it (Telegram's costs a getChatMember call). None: no.
    place_admin: Callable[[], Awaitable[bool]] | None = field(
        default=None, compare=False, repr=False)
    # Pictures sent with the text (a photo, an image file or attachment), not downloaded yet.
    images: tuple[ImageRef, ...] = ()
    # What else came that the bot can't read ("sticker", "voice", "video", "file"); "": nothing.
    unsupported: str = ""

    @property
    def user_key(self) -> str:
        """`platform:user_id`, the form ALLOWED_USERS and `forget` use."""
        return f"{self.platform}:{self.user_id}"

    @property
    def is_direct(self) -> bool:
        return self.place_id is None

    async def is_place_admin(self) -> bool:
        """Whether the platform says the sender administers this server or group."""
        if self.place_id is None or self.place_admin is None:
            return False
        try:
            return bool(await self.place_admin())
        except Exception:  # a platform that can't say: not an admin
            return False


@dataclass(frozen=True, slots=True)
class ModelChoices:
    """What `/model` shows: the user's model and the ones they may pick."""

    current: str
    available: tuple[str, ...]
