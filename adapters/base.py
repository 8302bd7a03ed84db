"""The adapter contract: connect, listen, send, disconnect; and what every adapter shares.

As errbot's Backend or opsdroid's Connector: `run` is written once here
(connect → listen until `stop` → disconnect), and an adapter fills in its
platform's translation. Shared here: the replies in flight (tracked so that
shutdown drains them, then cancels the rest, which the core records as
`cancelled`), streaming a Reply through the renderer (typing, throttled edits,
splits), collecting a whole Reply, UTF-16 lengths, and the `connected`
status a health check reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

from bot.render import MessageSink, StreamRenderer
from bot.render import utf16_len as utf16_len  # Telegram counts lengths in UTF-16 units

if TYPE_CHECKING:
    from bot.reply import Reply
    from bot.service import ChatService
    from bot.settings import Settings

log = logging.getLogger(__name__)

CANCEL_WAIT = 2.0  # seconds for cancelled replies to unwind

Target = TypeVar("Target")  # where a reply goes: a platform's chat, channel or terminal


class Adapter(ABC, Generic[Target]):
    """A platform edge: `await adapter.run(service, stop)` answers until `stop` is set."""

    name: str

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._service: ChatService | None = None
        self._in_flight: set[asyncio.Task[object]] = set()
        self._connected = False

    # -- the contract
    async def run(self, service: ChatService, stop: asyncio.Event) -> None:
        self._service = service
        await self.connect()
        try:
            await self.listen(stop)
        finally:
            self._connected = False
            await self.disconnect()

    @abstractmethod
    async def connect(self) -> None:
        """Log in and announce the command menu; raise if the platform refuses."""

    @abstractmethod
    async def listen(self, stop: asyncio.Event) -> None:
        """Receive and answer until `stop` is set (or the platform fails for good)."""

    @abstractmethod
    async def send(self, reply: Reply, to: Target) -> None:
        """Show one reply at `to`, the platform's way."""

    @abstractmethod
    async def disconnect(self) -> None:
        """Stop receiving, drain the replies in flight, close the connection."""

    # -- shared
    @property
    def service(self) -> ChatService:
        assert self._service is not None, "the adapter is not running"
        return self._service

    @property
    def connected(self) -> bool:
        """True while the platform's connection is up (for a health check)."""
        return self._connected

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @contextlib.contextmanager
    def tracked(self) -> Iterator[None]:
        """Count the current task as a reply in flight while the block runs."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        self._in_flight.add(task)
        try:
            yield
        finally:
            self._in_flight.discard(task)

    async def drain(self, timeout: float, *,  # noqa: ASYNC109
                    until: Awaitable[object] | None = None) -> None:
        """Let the replies in flight (and `until`) finish for `timeout` seconds, then
        cancel the replies still running; the core records them as cancelled."""
        waiting = asyncio.ensure_future(until) if until is not None else None
        pending: set[asyncio.Future[object]] = set(self._in_flight)
        if waiting is not None:
            pending.add(waiting)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        if pending:
            running = [t for t in self._in_flight if not t.done()]
            log.warning("%s: cancelling %d replies still running", self.name, len(running))
            for task in running:
                task.cancel()
            await asyncio.wait(pending, timeout=CANCEL_WAIT)
        if waiting is not None and not waiting.done():
            waiting.cancel()
        if waiting is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await waiting

    async def stream(self, reply: Reply, sink: MessageSink, *, limit: int,
                     measure: Callable[[str], int] = len,
                     on_end: Callable[[], None] | None = None) -> list[str]:
        """Show a reply through `sink` as it streams; the texts of the messages shown.

        `on_end` runs when the reply's last delta is in, before the final edit
        (a Stop button can leave with it)."""
        renderer = StreamRenderer(sink, limit=limit, measure=measure,
                                  edit_interval=self._settings.STREAM_EDIT_INTERVAL)
        if on_end is None:
            return await renderer.run(reply.deltas())

        async def deltas() -> AsyncIterator[str]:
            async with contextlib.aclosing(reply.deltas()) as stream:
                async for delta in stream:
                    yield delta
            on_end()

        return await renderer.run(deltas())

    @staticmethod
    async def collect(reply: Reply) -> str:
        """The whole of a reply, for platforms that show it at once."""
        return await reply.text()
