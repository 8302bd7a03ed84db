"""Test helpers for the Discord adapter: the bot run on the Discord emulator, and waits.

A pytest plugin (tests/conftest.py loads it) and a module of plain helpers. It is
imported by the tests only: the emulator itself lives in tests/fakes/, so it is
imported where a fixture makes one, never when the bot runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from adapters.discord.adapter import DiscordAdapter
from bot.app import open_service
from bot.commands import parse_command
from bot.messages import Incoming
from bot.reply import Reply
from bot.service import ChatService
from bot.settings import Settings

if TYPE_CHECKING:
    from tests.fakes.discord_api import DiscordEmulator, ShownMessage

# A token of Discord's shape that only the emulator accepts.
TOKEN = "MTEwMDAwMDAwMDAwMDAwMDAwMQ.GxYzAb.emulator-only-discord-token-0123456789"
ALICE = 2_100_000_000_000_000_001
BOB = 2_100_000_000_000_000_002
STOP_WITHIN = 15.0  # seconds for the adapter to stop once told

SettingsFactory = Callable[..., Settings]


@dataclass
class RunningBot:
    adapter: DiscordAdapter
    service: ChatService
    stop_event: asyncio.Event
    task: asyncio.Task[None]
    resources: contextlib.AsyncExitStack  # the service's store and provider

    async def stop(self) -> None:
        """Stop the adapter as `python -m bot` does on a signal, then close its core."""
        self.stop_event.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout=STOP_WITHIN)
        finally:
            await self.resources.aclose()


StartBot = Callable[..., Awaitable[RunningBot]]


class ServiceProxy:
    """The real core behind hooks: slow or failing on purpose, or with a canned answer."""

    def __init__(self, inner: ChatService, *,
                 before: Callable[[Incoming], Awaitable[None]] | None = None,
                 canned: Callable[[Incoming], str | None] | None = None) -> None:
        self._inner = inner
        self._before = before
        self._canned = canned

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def handle(self, msg: Incoming) -> Reply:
        if self._before is not None:
            await self._before(msg)
        answer = self._canned(msg) if self._canned is not None else None
        if answer is not None:
            # Private as the core would mark it: by the command's declaration.
            name = (parse_command(msg.text) or ("", ""))[0]
            return Reply.notice(answer, private=self._inner.commands.private(name))
        return await self._inner.handle(msg)


async def start_bot(api: DiscordEmulator, settings: Settings, running: contextlib.AsyncExitStack,
                    *, shards: int = 1,
                    wrap: Callable[[ChatService], Any] | None = None) -> RunningBot:
    """A core and the adapter on it, connected to `api`; `running` stops them at its end."""
    resources = contextlib.AsyncExitStack()
    service = await resources.enter_async_context(open_service(settings))
    adapter = DiscordAdapter(settings)
    stop = asyncio.Event()
    identified = len(api.identifies)
    task = asyncio.create_task(adapter.run(wrap(service) if wrap else service, stop))
    bot = RunningBot(adapter, service, stop, task, resources)
    running.push_async_callback(bot.stop)
    ready = asyncio.create_task(api.wait_for(
        lambda: len(api.identifies) >= identified + shards and len(api.ready_shards) >= shards))
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        await task  # raises what stopped the adapter
        raise AssertionError("the adapter returned before connecting")
    ready.result()
    return bot


async def said(api: DiscordEmulator, channel_id: int, text: str) -> ShownMessage:
    """Wait until the bot shows exactly `text` in the channel; return that message."""
    def shown() -> ShownMessage | None:
        return next((m for m in api.bot_messages(channel_id) if m.content == text), None)

    await api.wait_for(lambda: shown() is not None)
    found = shown()
    assert found is not None
    return found


def contents(api: DiscordEmulator, channel_id: int) -> list[str]:
    """What the bot's messages in the channel read now, oldest first."""
    return [m.content for m in api.bot_messages(channel_id)]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
async def discord_api() -> AsyncIterator[DiscordEmulator]:
    """The Discord emulator (REST and gateway), on a free port of 127.0.0.1."""
    from tests.fakes.discord_api import DiscordEmulator

    async with DiscordEmulator(token=TOKEN) as api:
        yield api


@pytest.fixture
def discord_settings(make_settings: SettingsFactory,
                     discord_api: DiscordEmulator) -> SettingsFactory:
    """Settings pointing the adapter at the emulator (`make_settings`: tests/conftest.py)."""
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"DISCORD_TOKEN": TOKEN,
                                  "DISCORD_API_BASE": discord_api.api_base,
                                  "STREAM_EDIT_INTERVAL": 0.2}
        return make_settings(**(values | overrides))

    return make


@pytest.fixture
async def run_bot(discord_api: DiscordEmulator,
                  discord_settings: SettingsFactory) -> AsyncIterator[StartBot]:
    """Start a core and the adapter on it; both stop at the end of the test at the latest."""
    async with contextlib.AsyncExitStack() as running:

        async def start(*, api: DiscordEmulator | None = None, shards: int = 1,
                        wrap: Callable[[ChatService], Any] | None = None,
                        **overrides: Any) -> RunningBot:
            api = api or discord_api
            settings = discord_settings(DISCORD_API_BASE=api.api_base, **overrides)
            return await start_bot(api, settings, running, shards=shards, wrap=wrap)

        yield start
