"""Strict per-conversation order, with memory bounded by turns in flight."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator


class ConversationOrder:
    """Turns of one key run one at a time, in the order they asked.

    One `asyncio.Lock` per key: its waiters queue first in, first out, and a
    waiter cancelled in the queue simply leaves it, so the turns behind it keep
    waiting for the one that holds the lock. The map holds each lock weakly:
    a lock lives only while some turn holds it or waits for it, so memory is
    bounded by turns in flight, not by every user ever seen.
    """

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary())

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()  # before any await: arrival order kept
        async with lock:
            yield
