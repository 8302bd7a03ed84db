"""The pace of messages and edits per Telegram chat: a leaky bucket with a small burst.

Telegram asks for about one message a second per chat and tolerates short
bursts, so each chat gets a bucket (aiolimiter) that lets BURST calls through
at once and then one every STREAM_EDIT_INTERVAL: the first text of a new reply
goes out at once unless the chat is really busy (several replies streaming
into one group side by side share its bucket). The edits of one streaming reply
are spaced by STREAM_EDIT_INTERVAL in the renderer. (Flood control proper,
RetryAfter and the group and global rates, is AIORateLimiter's; it knows
nothing of edits per chat.)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

_PRUNE_AT = 4096  # chats remembered before the idle ones are forgotten
BURST = 3  # calls a quiet chat takes at once


@dataclass
class _Chat:
    bucket: AsyncLimiter
    idle_at: float  # when the bucket will have drained, so the chat can be forgotten


TYPING_SHOWS_FOR = 4.0  # Telegram shows "typing" for about 5 s after one chat action


class ChatPacer:
    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._chats: dict[int, _Chat] = {}
        self._typing_until: dict[int, float] = {}

    def claim_typing(self, chat_id: int) -> bool:
        """True if this chat needs a typing action now; one covers every reply
        waiting in the chat, so a burst of queued messages sends one, not one each."""
        now = self._clock()
        if self._typing_until.get(chat_id, float("-inf")) > now:
            return False
        if len(self._typing_until) >= _PRUNE_AT:
            self._typing_until = {c: t for c, t in self._typing_until.items() if t > now}
        self._typing_until[chat_id] = now + TYPING_SHOWS_FOR
        return True

    @contextlib.asynccontextmanager
    async def turn(self, chat_id: int) -> AsyncIterator[None]:
        """Take this chat's bucket for one call: `async with pacer.turn(chat): await call`."""
        if self._interval <= 0:
            yield
            return
        chat = self._chats.get(chat_id)
        if chat is None:
            self._prune()
            chat = self._chats[chat_id] = _Chat(
                AsyncLimiter(BURST, BURST * self._interval), float("-inf"))
        await chat.bucket.acquire()
        # Drained BURST intervals after the last call (a waiter keeps it later still).
        chat.idle_at = self._clock() + BURST * self._interval
        yield

    def _prune(self) -> None:
        if len(self._chats) >= _PRUNE_AT:
            now = self._clock()
            self._chats = {c: s for c, s in self._chats.items() if s.idle_at > now}
