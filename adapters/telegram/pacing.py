"""At most one message or edit per chat per STREAM_EDIT_INTERVAL.

The renderer paces the edits of one reply, but it lets the final edit come
at once, and in a group several people's replies stream into the same chat
side by side. Telegram asks for about one message a second per chat, so the
adapter keeps one schedule per chat that every sink of that chat takes turns
on. A turn starts `interval` after the previous call in that chat *returned*:
Telegram counts arrivals, and a call may arrive any time before it returns.
(Flood control proper, RetryAfter and the group and global rates, is
AIORateLimiter's; it knows nothing of edits per chat.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

_PRUNE_AT = 4096  # chats remembered before the idle ones are forgotten


@dataclass
class _Chat:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    free_at: float = float("-inf")


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
        """Hold this chat's turn for one call: `async with pacer.turn(chat): await call`."""
        if self._interval <= 0:
            yield
            return
        chat = self._chats.get(chat_id)
        if chat is None:
            self._prune()
            chat = self._chats[chat_id] = _Chat()
        async with chat.lock:
            wait = chat.free_at - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                yield
            finally:
                chat.free_at = self._clock() + self._interval

    def _prune(self) -> None:
        if len(self._chats) >= _PRUNE_AT:
            now = self._clock()
            self._chats = {c: s for c, s in self._chats.items()
                           if s.lock.locked() or s.free_at > now}
