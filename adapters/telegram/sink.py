"""The renderer's MessageSink for one Telegram chat.

Formatted text goes out as HTML (adapters.telegram.format); when Telegram
refuses it (or it can't be converted) the sink raises FormattingRejected and the
renderer sends the same text plain. HTML that would show nothing (a reply that
so far is only an opening code fence) is never sent: the sink raises
NothingToShow and the renderer waits for more text. "Message is not modified"
is not an error: the edit had nothing to change. Flood control (RetryAfter)
is handled below this, by the application's AIORateLimiter, which waits and
retries; the pace of sends and edits in one chat is the shared ChatPacer's.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
import time

from telegram import Bot, InlineKeyboardMarkup, LinkPreviewOptions, ReplyParameters
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest

from adapters.telegram.format import markdown_to_html
from adapters.telegram.pacing import ChatPacer
from bot.render import FormattingRejected, NothingToShow
from bot.sanitize import is_blank

log = logging.getLogger(__name__)

# Descriptions of a 400 that mean "this formatting won't do", not "this message won't do".
_FORMATTING_ERRORS = ("can't parse entities", "message is too long")
_EMPTY = "message text is empty"
_TAG = re.compile(r"<[^>]*>")  # the converter escapes every < of the text: these are tags
_NO_PREVIEW = LinkPreviewOptions(is_disabled=True)


def is_not_modified(exc: BadRequest) -> bool:
    return "message is not modified" in exc.message.lower()


def rejects_formatting(exc: BadRequest) -> bool:
    """A 400 the same text sent plain would not get (the renderer then retries plain)."""
    return any(e in exc.message.lower() for e in _FORMATTING_ERRORS)


class TelegramSink:
    """Sends and edits the messages of one reply in one chat (or forum topic)."""

    def __init__(self, bot: Bot, chat_id: int, *, pacer: ChatPacer | None = None,
                 thread_id: int | None = None, reply_to: int | None = None,
                 reply_markup: InlineKeyboardMarkup | None = None,
                 markup_waits_for_an_edit: bool = False,
                 edit_interval: float = 0.0) -> None:
        self._bot = bot
        self._chat_id = chat_id
        self._pacer = pacer or ChatPacer(0)
        self._thread_id = thread_id
        self._reply_to = reply_to  # quoted by the first message only
        self._markup = reply_markup  # kept on the first message, through its edits
        self._first: int | None = None
        self._interval = edit_interval
        self._last_change = float("-inf")  # when a message of this reply last changed
        self._unbutton = False  # the keyboard is to go with the first message's next edit
        # A Stop button rides on the first edit, not the first message: a reply
        # complete by then never shows one, and costs no edit to take it away
        # (a quick follow-up in the chat then finds the chat's pace unspent).
        self._deferred = markup_waits_for_an_edit
        self._shown = False  # the keyboard is on the first message now

    async def send(self, text: str, *, formatted: bool) -> int:
        body, mode = self._body(text, formatted)
        reply = None
        if self._reply_to is not None and self._first is None:
            reply = ReplyParameters(self._reply_to, allow_sending_without_reply=True)
        first = self._first is None
        markup = self._markup if first and not self._deferred else None
        try:
            async with self._pacer.turn(self._chat_id):
                sent = await self._bot.send_message(
                    self._chat_id, body, parse_mode=mode, message_thread_id=self._thread_id,
                    reply_parameters=reply, link_preview_options=_NO_PREVIEW,
                    reply_markup=markup)
        except BadRequest as exc:
            _translate(exc, formatted)
            raise
        if first:
            self._first = sent.message_id
            self._carried(markup)
        self._last_change = time.monotonic()
        return sent.message_id

    async def edit(self, handle: int, text: str, *, formatted: bool) -> None:
        body, mode = self._body(text, formatted)
        markup = self._markup if handle == self._first else None
        try:
            async with self._pacer.turn(self._chat_id):
                await self._bot.edit_message_text(
                    body, chat_id=self._chat_id, message_id=handle, parse_mode=mode,
                    link_preview_options=_NO_PREVIEW, reply_markup=markup)
        except BadRequest as exc:
            if is_not_modified(exc):
                return
            _translate(exc, formatted)
            raise
        self._last_change = time.monotonic()
        if handle == self._first:
            self._carried(markup)

    def _carried(self, markup: InlineKeyboardMarkup | None) -> None:
        """The first message now shows `markup`, the keyboard the call carried (it may
        have been released while the call was on its way: then it is still to go)."""
        self._shown = markup is not None
        self._unbutton = self._shown and self._markup is None

    def release_markup(self) -> None:
        """The reply is complete: its keyboard (a Stop button) goes with the next edit."""
        if self._markup is not None:
            self._markup = None
            self._unbutton = self._shown

    async def drop_markup(self) -> None:
        """Take the keyboard off the first message if the last edit did not already
        (a Stop button once the reply ended), an edit interval after the last change."""
        self.release_markup()
        if not self._unbutton or self._first is None:
            return
        self._unbutton = False
        # Pacing, as the renderer's edits: platforms count edits per message.
        await asyncio.sleep(max(0.0, self._last_change + self._interval - time.monotonic()))
        try:
            async with self._pacer.turn(self._chat_id):
                await self._bot.edit_message_reply_markup(self._chat_id, self._first,
                                                          reply_markup=None)
        except BadRequest as exc:
            if not is_not_modified(exc):
                raise
        self._shown = False

    async def typing(self) -> None:
        if not self._pacer.claim_typing(self._chat_id):
            return
        await self._bot.send_chat_action(self._chat_id, ChatAction.TYPING,
                                         message_thread_id=self._thread_id)

    @staticmethod
    def _body(text: str, formatted: bool) -> tuple[str, str | None]:
        if not formatted:
            if is_blank(text):
                raise NothingToShow
            return text, None
        try:
            body = markdown_to_html(text)
        except Exception as exc:  # a reply that can't be formatted is still shown, plain
            log.warning("could not format a reply; sending it plain", exc_info=True)
            raise FormattingRejected(repr(exc)) from exc
        if is_blank(html.unescape(_TAG.sub("", body))):
            raise NothingToShow
        return body, ParseMode.HTML


def _translate(exc: BadRequest, formatted: bool) -> None:
    """Raise the renderer's signal for a 400 it can act on; return for any other."""
    if _EMPTY in exc.message.lower():
        raise NothingToShow(exc.message) from exc
    if formatted and rejects_formatting(exc):
        raise FormattingRejected(exc.message) from exc
