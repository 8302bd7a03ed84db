"""Added latency through a platform: the real adapter against the emulator from the tests.

One user message at a time (no queueing), each from a returning user with
stored history. Measured per message: from the moment the emulator hands the
update to the bot (Telegram: a long poll is already waiting, so the update
leaves at once; Discord: the MESSAGE_CREATE dispatch is written to the
gateway websocket) to the moment the emulator holds the bot's first message
with visible text, minus the stand-in's own time to first token. Everything
runs in one process and one event loop on 127.0.0.1, so the emulator's own
work counts too (it stands in for the network).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.core import bench_settings, quantile
from benchmarks.dbseed import fresh_db
from benchmarks.standin import REPLY, InstantProvider, first_token_s
from bot.service import ChatService
from storage import open_store

REPLY_TEXT = "".join(REPLY)
USERS = 10
HISTORY = 100  # stored messages per user before the run
# Telegram's flood control in the adapter allows ~30 requests/s; a pause between
# messages keeps the run under it, so that the limiter never delays a reply.
PAUSE = 0.1
DISCORD_TOKEN = "MTEwMDAwMDAwMDAwMDAwMDAwMQ.GxYzAb.emulator-only-discord-token-0123456789"
DISCORD_USER0 = 2_100_000_000_000_000_001
TELEGRAM_USER0 = 5_000_001


@dataclass
class Added:
    """Added latency of one platform: milliseconds, after the stand-in's first token."""

    p50_ms: float
    p99_ms: float
    samples: int
    standin_ttft_ms: float


class NotAvailable(Exception):
    """The adapter or its emulator is missing or does not work yet; the reason."""


@contextlib.asynccontextmanager
async def _service(settings_overrides: dict[str, object], platform: str,
                   users: list[str]) -> AsyncIterator[ChatService]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{platform}-") as tmp:
        # fresh_db runs its own event loop (the store migrates), so off this one.
        db = await asyncio.to_thread(fresh_db, Path(tmp) / "bot.db", users, HISTORY, platform)
        settings = bench_settings(f"sqlite:///{db}", 1, **settings_overrides)
        store = open_store(settings.DATABASE_URL)
        await store.open()
        service = ChatService(settings, store, InstantProvider())
        try:
            yield service
        finally:
            await service.shutdown(1.0)
            await service.aclose()
            await store.close()


async def _bounded(what: str, waiting: Awaitable[Any], task: asyncio.Task[Any],
                   timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Wait for `waiting`, but report the adapter's own failure if it ends first."""
    waiter = asyncio.ensure_future(waiting)
    done, _ = await asyncio.wait({waiter, task}, timeout=timeout,
                                 return_when=asyncio.FIRST_COMPLETED)
    if waiter in done:
        waiter.result()
        return
    waiter.cancel()
    if task in done:
        exc = task.exception()
        raise NotAvailable(f"the adapter stopped while waiting for {what}: "
                           f"{type(exc).__name__}: {exc}" if exc else
                           f"the adapter returned while waiting for {what}")
    raise NotAvailable(f"timed out after {timeout:g} s waiting for {what}")


async def _measure(samples: int, warmup: int,
                   one: Callable[[int], Awaitable[float]]) -> list[float]:
    out = []
    for i in range(warmup + samples):
        took = await one(i)
        if i >= warmup:
            out.append(took)
        await asyncio.sleep(PAUSE)
    return out


def _summary(seconds: list[float], ttft: float) -> Added:
    added = [max(0.0, s - ttft) for s in seconds]
    return Added(quantile(added, 0.5) * 1000, quantile(added, 0.99) * 1000, len(added),
                 ttft * 1000)


async def telegram(samples: int, warmup: int = 5) -> Added:
    try:
        from adapters.telegram.adapter import TelegramAdapter
        from tests.fakes.telegram_api import TelegramApiEmulator
    except ImportError as exc:
        raise NotAvailable(f"cannot import the adapter or emulator: {exc}") from None
    ttft = await first_token_s()
    users = [str(TELEGRAM_USER0 + i) for i in range(USERS)]
    async with TelegramApiEmulator() as tg, _service(
            {"TELEGRAM_TOKEN": tg.bot_token, "TELEGRAM_BASE_URL": tg.base_url},
            "telegram", users) as service:
        adapter = TelegramAdapter(service.settings)
        stop = asyncio.Event()
        task = asyncio.create_task(adapter.run(service, stop))
        try:
            await _bounded("the first getUpdates", tg.wait_for_call("getUpdates", 1, 10), task)

            async def one(i: int) -> float:
                uid = int(users[i % USERS])
                polls = len(tg.calls("getUpdates"))
                before = len(tg.bot_messages(uid))
                t0 = time.monotonic()
                tg.user_says(uid, f"Question {i}: what should I do about the plan this week?")

                def shown() -> bool:
                    new = tg.bot_messages(uid)[before:]
                    return bool(new) and new[-1].text == REPLY_TEXT

                await _bounded("the reply", tg.wait_for(shown, 10), task)
                first = next(m for m in tg.bot_messages(uid)[before:] if m.text.strip())
                # The next update must find a long poll already waiting.
                await _bounded("the next getUpdates",
                               tg.wait_for(lambda: len(tg.calls("getUpdates")) > polls, 10),
                               task)
                return first.sent_at - t0

            seconds = await _measure(samples, warmup, one)
        finally:
            stop.set()
            await service.shutdown(1.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 15)
    return _summary(seconds, ttft)


async def discord(samples: int, warmup: int = 5) -> Added:
    try:
        from adapters.discord.adapter import DiscordAdapter
        from tests.fakes.discord_api import BOT_ID, DiscordEmulator
    except ImportError as exc:
        raise NotAvailable(f"cannot import the adapter or emulator: {exc}") from None
    ttft = await first_token_s()
    users = [str(DISCORD_USER0 + i) for i in range(USERS)]
    async with DiscordEmulator(token=DISCORD_TOKEN) as api, _service(
            {"DISCORD_TOKEN": DISCORD_TOKEN, "DISCORD_API_BASE": api.api_base},
            "discord", users) as service:
        adapter = DiscordAdapter(service.settings)
        stop = asyncio.Event()
        task = asyncio.create_task(adapter.run(service, stop))
        try:
            await _bounded("the gateway to be ready", api.wait_ready(1, 15), task, 20)

            async def one(i: int) -> float:
                uid = int(users[i % USERS])
                channel = api.dm_channel(uid)
                before = len(api.bot_messages(channel))
                t0 = time.monotonic()
                await api.user_says(uid, f"Question {i}: what should I do about the plan?")

                def shown() -> bool:
                    new = api.bot_messages(channel)[before:]
                    return bool(new) and new[-1].content == REPLY_TEXT

                await _bounded("the reply", api.wait_for(shown, 10), task)
                first = next(m for m in api.bot_messages(channel)[before:]
                             if m.author_id == BOT_ID and m.versions[0][1].strip())
                return first.versions[0][0] - t0

            seconds = await _measure(samples, warmup, one)
        finally:
            stop.set()
            await service.shutdown(1.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)
    return _summary(seconds, ttft)


def run(name: str, samples: int) -> Added | str:
    """The figures, or the reason they are not available (never raises)."""
    measure = {"telegram": telegram, "discord": discord}[name]
    try:
        return asyncio.run(measure(samples))
    except NotAvailable as exc:
        return str(exc)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
