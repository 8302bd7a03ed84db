"""Round trips to PostgreSQL per exchange, counted (not timed).

Every connection of the store's pool is an asyncpg Connection whose protocol
is wrapped: each request that waits for the server's answer (a simple query,
a prepare, a bind+execute, a statement close) is one round trip. Pool acquire
and release cost nothing unless they send something (release's reset does).
`pg_round_trips_per_exchange`: the count over N exchanges at 10 concurrent
conversations (each a returning user with 100 stored messages) ÷ N, after a
warm-up round so that statements are prepared once, as in a long-running bot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import asyncpg

from benchmarks.core import bench_settings, drive, split_users
from benchmarks.dbseed import user_id
from benchmarks.pgbench import seed
from benchmarks.standin import InstantProvider
from tests.pg import drop_database, fresh_database

ROUND_TRIPS = frozenset({"query", "prepare", "bind_execute", "bind_execute_many", "bind",
                         "execute", "close_statement", "copy_in", "copy_out"})
CONCURRENCY = 10


class _Counted:
    """The protocol, with each round trip counted by kind."""

    def __init__(self, protocol: Any, counts: collections.Counter[str]) -> None:
        self._p = protocol
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._p, name)
        if name in ROUND_TRIPS:
            def counted(*args: Any, **kwargs: Any) -> Any:
                self._counts[name] += 1
                return attr(*args, **kwargs)
            return counted
        return attr


@contextlib.contextmanager
def counting() -> Iterator[collections.Counter[str]]:
    """Within: every new asyncpg pool's connections count their round trips here."""
    counts: collections.Counter[str] = collections.Counter()

    original = asyncpg.create_pool

    def create_pool(*args: Any, **kwargs: Any) -> Any:
        base = kwargs.get("connection_class", asyncpg.Connection)

        class CountingConnection(base):  # type: ignore[misc, valid-type]
            def __init__(self, protocol: Any, *a: Any, **kw: Any) -> None:
                super().__init__(protocol, *a, **kw)
                self._protocol = _Counted(protocol, counts)

        kwargs["connection_class"] = CountingConnection
        return original(*args, **kwargs)

    asyncpg.create_pool = create_pool  # type: ignore[assignment]
    try:
        yield counts
    finally:
        asyncpg.create_pool = original  # type: ignore[assignment]


async def _run(exchanges: int) -> tuple[float, dict[str, float]]:
    from bot.service import ChatService
    from storage import open_store

    url = await fresh_database()
    try:
        users = [user_id(n) for n in range(CONCURRENCY * 2)]
        await seed(url, users)
        with counting() as counts:
            pool = CONCURRENCY + 4
            settings = bench_settings(url, CONCURRENCY, DB_POOL_SIZE=pool,
                                      LLM_CONCURRENCY=CONCURRENCY)
            store = open_store(url, pool_size=pool)
            await store.open()
            service = ChatService(settings, store, InstantProvider())
            try:
                groups = split_users(users, CONCURRENCY)
                await drive(service, groups, 2, start=-1_000_000)  # warm-up
                counts.clear()
                _, latencies = await drive(service, groups, max(1, exchanges // CONCURRENCY))
                n = len(latencies)
                seen = dict(counts)
            finally:
                await service.aclose()
                await store.close()
    finally:
        await drop_database(url)
    return sum(seen.values()) / n, {k: v / n for k, v in sorted(seen.items())}


def measure(exchanges: int = 500) -> tuple[float, dict[str, float]]:
    """(round trips per exchange, the same by protocol request kind)."""
    return asyncio.run(_run(exchanges))


if __name__ == "__main__":
    from benchmarks.core import quiet_logging

    quiet_logging()
    print(measure())
