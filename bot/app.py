"""Wiring: settings → store, provider, service → adapters; signals and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

from adapters.base import Adapter
from bot.health import operations
from bot.providers import make_provider
from bot.service import ChatService
from bot.settings import Settings
from storage import open_store

log = logging.getLogger(__name__)


class Reloads:
    """The SIGHUP reloads of PERSONAS_FILE: in flight, and their results in order."""

    def __init__(self, service: ChatService) -> None:
        self._service = service
        self.tasks: set[asyncio.Task[bool]] = set()
        self._results: asyncio.Queue[bool] = asyncio.Queue()

    def start(self) -> None:
        task = asyncio.get_running_loop().create_task(self._service.personas.reload_async())
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[bool]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is None:
            self._results.put_nowait(task.result())

    async def next(self) -> bool:
        """The result of the next reload to finish (True: the new file is in use)."""
        return await self._results.get()


@contextlib.contextmanager
def reload_on_sighup(service: ChatService) -> Iterator[Reloads]:
    """While open, SIGHUP re-reads PERSONAS_FILE (off the loop); a bad edit keeps the old."""
    loop = asyncio.get_running_loop()
    reloads = Reloads(service)
    installed = False
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, reloads.start)
        installed = True
    try:
        yield reloads
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGHUP)
        for task in reloads.tasks:
            task.cancel()


@contextlib.contextmanager
def settled_heap() -> Iterator[None]:
    """What start-up built (modules, settings, tables) lives as long as the bot:
    frozen out of the collector's sight, a full collection walks only what the
    turns made (pauses 45-50 ms → 12-20 ms at 100 conversations)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.asynccontextmanager
async def open_service(settings: Settings) -> AsyncIterator[ChatService]:
    """A ready service: store opened and migrated, provider built."""
    store = open_store(settings.DATABASE_URL, pool_size=settings.DB_POOL_SIZE,
                       sqlite_synchronous=settings.SQLITE_SYNCHRONOUS)
    await store.open()
    try:
        service = ChatService(settings, store, make_provider(settings))
        try:
            yield service
        finally:
            await service.aclose()
    finally:
        await store.close()


def choose_adapters(settings: Settings, *, console: bool) -> list[Adapter[Any]]:
    """The adapters the tokens ask for; the console when there are none."""
    adapters: list[Adapter[Any]] = []
    if not console:
        # Platform libraries are imported only when their adapter starts.
        if settings.TELEGRAM_TOKEN is not None:
            from adapters.telegram.adapter import TelegramAdapter

            adapters.append(TelegramAdapter(settings))
        if settings.DISCORD_TOKEN is not None:
            from adapters.discord.adapter import DiscordAdapter

            adapters.append(DiscordAdapter(settings))
    if not adapters:
        from adapters.console import ConsoleAdapter

        adapters.append(ConsoleAdapter(settings))
    return adapters


def log_access(settings: Settings) -> None:
    if not settings.allowed_users and not settings.allowed_places:
        log.info("access: open to everyone (set ALLOWED_USERS / ALLOWED_PLACES to restrict)")
    else:
        log.info("access: %d allowed users, %d allowed places",
                 len(settings.allowed_users), len(settings.allowed_places))


async def run_bot(settings: Settings, *, console: bool = False) -> int:
    """Run until a signal (or the console's end of input); return the exit code."""
    adapters = choose_adapters(settings, console=console)
    if adapters[0].name == "console" and settings.LOG_FORMAT == "text":
        # In a terminal chat the exchange line repeats what was just shown.
        logging.getLogger("bot.exchange").setLevel(logging.WARNING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with open_service(settings) as service, contextlib.AsyncExitStack() as stack:
        stack.enter_context(settled_heap())
        stack.enter_context(reload_on_sighup(service))
        if not console and adapters[0].name != "console":
            log_access(settings)  # once the store opened: a bad database says only that
        tasks = {asyncio.create_task(a.run(service, stop), name=a.name): a for a in adapters}
        stopper = asyncio.create_task(stop.wait())
        async with operations(settings, service, tasks):  # retention, /metrics, /healthz
            await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            stop.set()  # one adapter ending (console EOF, a crash) ends them all
            await service.shutdown(settings.SHUTDOWN_GRACE)
        code = 0
        for task, adapter in tasks.items():
            try:
                await task
            except Exception as exc:
                log.error("%s adapter failed: %s", adapter.name, exc)
                log.debug("adapter failure", exc_info=True)
                code = 1
        stopper.cancel()
        return code
