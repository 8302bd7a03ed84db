"""Strict per-conversation order, with memory bounded by turns in flight."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class ConversationOrder:
    """Turns of one key run one at a time, in the order they asked.

    Each turn waits for the one before it through a future; the map holds
    only keys with a turn waiting or running, so it does not grow with every
    user ever seen.
    """

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}

    def __len__(self) -> int:
        return len(self._tails)

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        prev = self._tails.get(key)
        mine: asyncio.Future[None] = loop.create_future()
        self._tails[key] = mine  # taken before any await: arrival order is kept
        try:
            if prev is not None and not prev.done():
                await asyncio.shield(prev)
            yield
        finally:
            if prev is not None and not prev.done():
                # Cancelled while waiting: the next turn must still wait for prev.
                prev.add_done_callback(lambda _: mine.done() or mine.set_result(None))
            else:
                mine.set_result(None)
            if self._tails.get(key) is mine:
                del self._tails[key]
