"""Exchanges through the real core (`ChatService`) on real SQLite storage.

A run is closed-loop: `concurrency` workers, each one conversation at a time
sending a message and reading the whole reply before sending the next; every
conversation starts with stored history (a returning user). An exchange is
`ChatService.handle(msg)` from the call to its last delta.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.dbseed import PLATFORM, user_id
from benchmarks.standin import MODEL, MODEL_WAIT, REPLY, InstantProvider
from bot.logging_setup import setup_logging
from bot.messages import Incoming
from bot.service import ChatService
from bot.settings import Settings, load_settings
from storage import open_store


def bench_settings(db_url: str, concurrency: int, **overrides: object) -> Settings:
    """The throughput settings the issue asks for; nothing read from `.env`."""
    values: dict[str, object] = {
        "DATABASE_URL": db_url,
        "RATE_LIMIT_PER_MINUTE": 0,
        "LLM_CONCURRENCY": max(100, concurrency),
        "MEMORY_STRATEGY": "truncate",
        "LOG_LEVEL": "WARNING",
        "LLM_MODEL": MODEL,
    }
    values.update(overrides)
    return load_settings(None, **values)


def quiet_logging() -> None:
    """The bot's own logging at WARNING, as LOG_LEVEL=WARNING sets it up."""
    setup_logging("WARNING", "text", [])
    # discord.py warns at start that voice support is missing: noise here.
    logging.getLogger("discord.client").setLevel(logging.ERROR)


def message(uid: str, n: int) -> Incoming:
    text = (f"Question {n}: what do you think about the plan for this week, and how "
            "should I approach the first step?")
    return Incoming(platform=PLATFORM, user_id=uid, display_name=f"User {uid}",
                    chat_id=uid, place_id=None, text=text)


class BadReply(Exception):
    """The core answered something other than the stand-in's reply (an error path)."""


async def exchange(service: ChatService, msg: Incoming) -> float:
    """Seconds for one exchange, less a paced model's own wait; raises BadReply unless
    the whole reply came back."""
    parts: list[str] = []
    model_wait: list[float] = []
    MODEL_WAIT.set(model_wait)  # a paced stand-in records its own time here
    t0 = time.perf_counter()
    async with contextlib.aclosing((await service.handle(msg)).deltas()) as deltas:
        async for delta in deltas:
            parts.append(delta)
    elapsed = time.perf_counter() - sum(model_wait) - t0
    if len(parts) != len(REPLY) or parts[0] != REPLY[0]:
        raise BadReply("".join(parts)[:300])
    return elapsed


@dataclass
class RunResult:
    concurrency: int
    exchanges: int
    seconds: float
    latencies: list[float] = field(repr=False)
    loop_cpu: float = 0.0  # CPU seconds of the event loop's thread while measuring

    @property
    def per_s(self) -> float:
        return self.exchanges / self.seconds

    def latency_ms(self, q: float) -> float:
        return quantile(self.latencies, q) * 1000


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (p99 of 1,000 samples is the 990th smallest)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


MAX_EXCHANGES_PER_USER = 20  # keeps every conversation near its seeded history


def users_for(concurrency: int, exchanges: int) -> list[str]:
    """Enough users that none sends more than MAX_EXCHANGES_PER_USER messages.

    So every run, whatever its concurrency, measures conversations of about
    the same length: the seeded 100 messages plus at most 40.
    """
    per_worker = math.ceil(exchanges / concurrency)
    users_each = max(1, math.ceil(per_worker / MAX_EXCHANGES_PER_USER))
    return [user_id(n) for n in range(concurrency * users_each)]


def split_users(users: list[str], workers: int) -> list[list[str]]:
    """Worker w takes users w, w + workers, ... in turn."""
    return [users[w::workers] for w in range(workers)]


async def drive(service: ChatService, groups: list[list[str]], per_worker: int,
                start: int = 0, max_seconds: float = 3600.0) -> tuple[float, list[float]]:
    """Run the workers once; (wall seconds, every exchange's seconds).

    Each worker stops after `per_worker` exchanges or once `max_seconds` have
    passed, whichever comes first, so a slow core cannot stretch the run.
    """
    latencies: list[float] = []
    deadline = time.perf_counter() + max_seconds

    async def worker(users: list[str]) -> None:
        for i in range(per_worker):
            latencies.append(await exchange(service, message(users[i % len(users)], start + i)))
            if time.perf_counter() > deadline:
                return

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(g) for g in groups))
    return time.perf_counter() - t0, latencies


async def run_service(db_path: Path, users: list[str], concurrency: int,
                      exchanges: int, max_seconds: float = 3600.0,
                      provider: InstantProvider | None = None) -> RunResult:
    """Warm up (one exchange per user), then up to `exchanges` measured exchanges."""
    settings = bench_settings(f"sqlite:///{db_path}", concurrency)
    store = open_store(settings.DATABASE_URL)
    await store.open()
    service = ChatService(settings, store, provider or InstantProvider())
    try:
        groups = split_users(users, concurrency)
        await drive(service, groups, max(len(g) for g in groups), start=-1_000_000)
        per_worker = max(1, exchanges // concurrency)
        cpu0 = time.thread_time()
        seconds, latencies = await drive(service, groups, per_worker, max_seconds=max_seconds)
        cpu = time.thread_time() - cpu0
    finally:
        await service.aclose()
        await store.close()
    return RunResult(concurrency, len(latencies), seconds, latencies, cpu)
