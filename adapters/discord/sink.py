"""The renderer's MessageSink for a Discord channel, thread or DM.

Pings are suppressed by the client's allowed mentions (set once in the adapter), so
nothing here can forget them; `mention_author=False` keeps the reply itself silent too.
"""

from __future__ import annotations

import asyncio
import logging
import time

import discord

from bot.i18n import N_
from bot.render import NothingToShow
from bot.sanitize import is_blank

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # characters in one Discord message
APOLOGY = N_("Sorry, something went wrong while answering. Please try again.")


def _plain(text: str) -> str:
    """Markdown escaped so it shows literally, unless escaping pushes it over the limit."""
    escaped = discord.utils.escape_markdown(text)
    return escaped if len(escaped) <= MESSAGE_LIMIT else text


class ChannelSink:
    """Sends and edits the messages of one reply; the first one answers `reply_to`."""

    def __init__(self, channel: discord.abc.Messageable,
                 reply_to: discord.Message | None = None, *,
                 view: discord.ui.View | None = None, edit_interval: float = 0.0) -> None:
        self._channel = channel
        self._reply_to = reply_to
        self._sent_any = False
        self._view = view  # on the first message while the reply streams (a Stop button)
        self._first: discord.Message | None = None
        self._unview = False  # the view is to go with the first message's next edit
        self._interval = edit_interval
        self._last_change = float("-inf")

    async def send(self, text: str, *, formatted: bool) -> discord.Message:
        # Discord's Markdown is the model's Markdown, so formatted text goes as it is.
        content = text if formatted else _plain(text)
        if is_blank(content):
            raise NothingToShow  # Discord refuses an empty message
        extra = {"view": self._view} if self._view is not None and not self._sent_any else {}
        if self._reply_to is not None and not self._sent_any:
            reference = self._reply_to.to_reference(fail_if_not_exists=False)
            message = await self._channel.send(content, reference=reference,
                                               mention_author=False, **extra)
        else:
            message = await self._channel.send(content, **extra)
        if not self._sent_any:
            self._first = message
            # Released while this was on its way: the button it carried is still to go.
            self._unview = bool(extra) and self._view is None
        self._sent_any = True
        self._last_change = time.monotonic()
        return message

    async def edit(self, handle: discord.Message, text: str, *, formatted: bool) -> None:
        content = text if formatted else _plain(text)
        if is_blank(content):
            raise NothingToShow
        if self._unview and handle is self._first:
            await handle.edit(content=content, view=None)
            self._unview = False
        else:
            await handle.edit(content=content)
        self._last_change = time.monotonic()

    def release_view(self) -> None:
        """The reply is complete: its view (the Stop button) goes with the next edit."""
        if self._view is not None:
            self._view.stop()
            self._view = None
            self._unview = self._first is not None

    async def drop_view(self) -> None:
        """Take the Stop button off if the last edit did not (an edit interval later)."""
        self.release_view()
        if not self._unview or self._first is None:
            return
        self._unview = False
        await asyncio.sleep(max(0.0, self._last_change + self._interval - time.monotonic()))
        await self._first.edit(view=None)

    typing_interval = 9.0  # seconds: one indicator shows for about 10 s

    async def typing(self) -> None:
        await self._channel.typing()  # one indicator; Discord shows it for ~10 s

    async def apologise(self, text: str = APOLOGY) -> None:
        """The one short message a user gets when answering failed (`text`: APOLOGY in
        the user's language)."""
        try:
            await self.send(text, formatted=True)
        except Exception:  # the channel may be gone or closed to the bot: log, go on
            log.warning("could not tell the user that answering failed", exc_info=True)
