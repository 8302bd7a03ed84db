"""Test helpers for the Telegram adapter: the bot run on the Bot API emulator, and waits.

A pytest plugin (tests/conftest.py loads it) and a module of plain helpers. It is
imported by the tests only: the emulator itself lives in tests/fakes/, so it is
imported where a fixture makes one, never when the bot runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from adapters.telegram.adapter import TelegramAdapter
from bot.app import open_service
from bot.service import ChatService
from bot.settings import Settings

if TYPE_CHECKING:
    from tests.fakes.telegram_api import TelegramApiEmulator, VisibleMessage

GROUP = -1001234567890  # a supergroup of the emulator's
ALICE, BOB = 1001, 1002  # two of its users
START_WITHIN = 10.0  # seconds for the adapter to reach getUpdates (or setWebhook)

SettingsFactory = Callable[..., Settings]


@dataclass
class RunningBot:
    adapter: TelegramAdapter
    service: ChatService
    settings: Settings
    task: asyncio.Task[None]


@functools.cache
def shared_tls() -> ssl.SSLContext:
    """One TLS context for every adapter a test process starts (each would load the CA
    bundle again: ~0.25 s of CPU per start; the emulator speaks plain HTTP anyway)."""
    return httpx.create_ssl_context()


def emulator_settings(tg: TelegramApiEmulator) -> dict[str, Any]:
    """The settings that point the adapter at the emulator."""
    return {"TELEGRAM_TOKEN": tg.bot_token, "TELEGRAM_BASE_URL": tg.base_url}


@contextlib.asynccontextmanager
async def telegram_bot(tg: TelegramApiEmulator, settings: Settings, *,
                       service: ChatService | None = None) -> AsyncIterator[RunningBot]:
    """The adapter running on a fresh service (or on `service`), stopped the way
    `python -m bot` stops it."""
    async with contextlib.AsyncExitStack() as resources:
        if service is None:
            service = await resources.enter_async_context(open_service(settings))
        adapter = TelegramAdapter(settings, tls=shared_tls())
        stop = asyncio.Event()
        task = asyncio.create_task(adapter.run(service, stop))
        receiving = "setWebhook" if settings.TELEGRAM_WEBHOOK_URL else "getUpdates"
        await tg.wait_for(lambda: task.done() or bool(tg.calls(receiving)), START_WITHIN,
                          f"the adapter to call {receiving}")
        if task.done():
            task.result()  # raise what stopped it
        try:
            yield RunningBot(adapter, service, settings, task)
        finally:
            stop.set()
            await service.shutdown(settings.SHUTDOWN_GRACE)
            await asyncio.wait_for(task, settings.SHUTDOWN_GRACE + 10)


async def bot_says(tg: TelegramApiEmulator, chat_id: int, expected: list[str],
                   timeout: float = 5.0) -> list[VisibleMessage]:  # noqa: ASYNC109
    """Wait until the bot's messages in the chat read exactly `expected`."""
    try:
        await tg.wait_for(lambda: tg.bot_texts(chat_id) == expected, timeout)
    except TimeoutError:
        raise AssertionError(f"expected bot messages {expected!r}; chat reads:\n"
                             f"{tg.transcript(chat_id)}") from None
    return tg.bot_messages(chat_id)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
async def tg() -> AsyncIterator[TelegramApiEmulator]:
    """The Bot API emulator, on a free port of 127.0.0.1."""
    from tests.fakes.telegram_api import TelegramApiEmulator

    async with TelegramApiEmulator() as emulator:
        yield emulator


@pytest.fixture
def tg_settings(make_settings: SettingsFactory, tg: TelegramApiEmulator) -> SettingsFactory:
    """Settings pointing the adapter at the emulator (`make_settings`: tests/conftest.py)."""
    def make(**overrides: Any) -> Settings:
        return make_settings(**(emulator_settings(tg) | overrides))
    return make
