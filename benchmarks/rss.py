"""Resident memory after N distinct users have each sent one message.

Run in a fresh interpreter (`python -m benchmarks.rss`), so that nothing the
other benchmarks allocated counts. The service runs with the production
defaults (rate limiting on, MEMORY_STRATEGY=summarize) because per-user
state is what this measures; only the model is the instant stand-in. Prints
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.core import BadReply, exchange, message, quiet_logging
from benchmarks.dbseed import user_id
from benchmarks.standin import MODEL, InstantProvider


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


async def measure(users: int, concurrency: int, db_path: Path) -> dict[str, float]:
    from bot.service import ChatService
    from bot.settings import load_settings
    from storage import open_store

    settings = load_settings(None, DATABASE_URL=f"sqlite:///{db_path}", LLM_MODEL=MODEL,
                             LOG_LEVEL="WARNING", LLM_CONCURRENCY=concurrency)
    store = open_store(settings.DATABASE_URL)
    await store.open()
    service = ChatService(settings, store, InstantProvider())
    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    queue = iter(range(users))

    async def worker() -> None:
        for n in queue:  # shared iterator: each user exactly once
            await exchange(service, message(user_id(n), n))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await service.aclose()
    seconds = time.perf_counter() - t0
    gc.collect()
    after = rss_mb()  # the store is still open: its caches count
    await store.close()
    return {"rss_mb_before": round(before, 1), "rss_mb": round(after, 1),
            "users": users, "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rss")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    quiet_logging()
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
        try:
            out = asyncio.run(measure(args.users, args.concurrency, Path(tmp) / "rss.db"))
        except BadReply as exc:
            out = {"error": f"unexpected reply: {exc}"}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
