"""Model call slots shared by replies and background work, replies first."""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import AsyncIterator


class Priority(enum.IntEnum):
    """Lower runs first: a reply someone is waiting for beats background work."""

    REPLY = 0
    BACKGROUND = 1  # summaries, embeddings


# In order, as a tuple: iterating an Enum class costs several times more, twice a turn.
_PRIORITIES = tuple(Priority)


class ModelSlots:
    """At most `capacity` model calls at once; a free slot goes to the first
    waiting reply, and only when no reply waits to the first background call.

    One-request servers (llama-cpp-python ends a running stream when a second
    request arrives) need `LLM_CONCURRENCY=1` to mean one call at a time, so
    summaries take these slots rather than slots of their own.
    `async with slots:` takes a slot as a reply.
    """

    def __init__(self, capacity: int) -> None:
        self._free = max(1, capacity)
        self._queues: dict[Priority, deque[asyncio.Future[None]]] = {p: deque() for p in Priority}
        self.in_use = 0

    def waiting(self, priority: Priority | None = None) -> int:
        """Calls waiting for a slot (of one priority, or all)."""
        queues = self._queues.values() if priority is None else [self._queues[priority]]
        return sum(1 for q in queues for f in q if not f.done())

    @contextlib.asynccontextmanager
    async def hold(self, priority: Priority = Priority.REPLY) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    def background(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self.hold(Priority.BACKGROUND)

    async def __aenter__(self) -> None:
        await self.acquire(Priority.REPLY)

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    async def acquire(self, priority: Priority) -> None:
        if self._free > 0 and not self._waiting_before(priority):
            self._take()
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues[priority].append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted just as it was cancelled: pass the slot on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._queues[priority].remove(waiter)

    def _waiting_before(self, priority: Priority) -> bool:
        """Whether a call of `priority` or a higher one waits (not yet granted)."""
        for p in _PRIORITIES:
            if p > priority:
                return False
            queue = self._queues[p]
            if queue and any(not f.done() for f in queue):
                return True
        return False

    def release(self) -> None:
        self.in_use -= 1
        self._free += 1
        self._wake()

    def _take(self) -> None:
        self._free -= 1
        self.in_use += 1

    def _wake(self) -> None:
        for priority in _PRIORITIES:  # in order: replies first
            queue = self._queues[priority]
            while self._free > 0 and queue:
                waiter = queue.popleft()
                if not waiter.done():
                    self._take()
                    waiter.set_result(None)
            if queue:
                return  # no slot left; lower priorities keep waiting
