"""Throughput on PostgreSQL at 100 concurrent conversations, in one process and in two.

The database is created fresh on the local server by the tests' own helper
(tests/pg.py, `PG_TEST_ADMIN_URL` to point elsewhere) and dropped afterwards.
Each process is a fresh interpreter (`python -m benchmarks.pgbench --worker`)
that opens its own store, warms up, reports READY and waits for GO on stdin,
so that both processes of the two-process run start together. The combined
rate is all exchanges ÷ (last end − first start). Both runs use the same
number of database connections in total (`TOTAL_POOL`), because the server's
max_connections is shared with whatever else uses it; each process runs with
DB_POOL_SIZE = its share and LLM_CONCURRENCY = DB_POOL_SIZE − 2 (the store's
rule), so turns beyond that wait their turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from urllib.parse import urlsplit

import asyncpg

from benchmarks.core import (
    BadReply,
    bench_settings,
    drive,
    quiet_logging,
    split_users,
)
from benchmarks.dbseed import PLATFORM, chat_texts, conversation_key, user_id
from benchmarks.standin import InstantProvider
from tests.pg import admin_url, drop_database, fresh_database

TOTAL_POOL = 40  # connections across all processes; the server allows 100 in all
CONCURRENCY = 100
USERS_PER_CONVERSATION = 2  # each worker alternates between two returning users
HISTORY = 100
_STAMP = "2025-01-01T00:00:00.000Z"


async def seed(url: str, users: list[str]) -> None:
    """Schema by the store's own migrations; history rows by COPY."""
    from storage import open_store, recall_index

    store = open_store(url, pool_size=2)
    await store.open()
    await store.close()
    texts = chat_texts(4096)
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.copy_records_to_table(
            "conversations", columns=["key", "platform", "user_id", "place", "created_at"],
            records=[(conversation_key(u), PLATFORM, u, "dm", _STAMP) for u in users])
        ids = {r["key"]: r["id"] for r in await conn.fetch("SELECT key, id FROM conversations")}
        conv = [ids[conversation_key(u)] for u in users]
        rows = []
        n = 0
        for rnd in range(HISTORY):
            for c in conv:
                n += 1
                rows.append((c, "user" if rnd % 2 == 0 else "assistant",
                             texts[(n * 2654435761) % len(texts)], _STAMP))
        await conn.copy_records_to_table(
            "messages", columns=["conversation_id", "role", "content", "created_at"],
            records=rows)
        # In the words index too, as the bot stores them (see dbseed.fill).
        await recall_index.index_messages(conn, [tuple(r) for r in await conn.fetch(
            "SELECT id, conversation_id, content FROM messages")])
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


# -- one worker process


async def _worker(url: str, users: list[str], concurrency: int, exchanges: int,
                  pool: int) -> dict[str, float]:
    from bot.service import ChatService
    from storage import open_store

    # The store wants DB_POOL_SIZE >= LLM_CONCURRENCY + 2 (a connection per turn in
    # flight, for its conversation lock); the server's connections bound the pool.
    settings = bench_settings(url, concurrency, DB_POOL_SIZE=pool, LLM_CONCURRENCY=pool - 2)
    store = open_store(url, pool_size=pool)
    await store.open()
    service = ChatService(settings, store, InstantProvider())
    try:
        groups = split_users(users, concurrency)
        await drive(service, groups, max(len(g) for g in groups), start=-1_000_000)
        print("READY", flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        if line.strip() != "GO":
            raise SystemExit("no GO from the parent")
        t0 = time.monotonic()
        seconds, latencies = await drive(service, groups, max(1, exchanges // concurrency))
    finally:
        await service.aclose()
        await store.close()
    return {"exchanges": len(latencies), "start": t0, "end": t0 + seconds}


def _worker_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pgbench --worker")
    parser.add_argument("--url", required=True)
    parser.add_argument("--users", required=True, help="first:count")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--exchanges", type=int, required=True)
    parser.add_argument("--pool", type=int, required=True)
    args = parser.parse_args(argv)
    quiet_logging()
    first, count = (int(x) for x in args.users.split(":"))
    users = [user_id(n) for n in range(first, first + count)]
    try:
        out: dict[str, object] = dict(asyncio.run(
            _worker(args.url, users, args.concurrency, args.exchanges, args.pool)))
    except BadReply as exc:
        out = {"error": f"unexpected reply: {exc}"}
    print("RESULT " + json.dumps(out), flush=True)


# -- the parent


def run_processes(url: str, processes: int, exchanges: int, timeout: float = 240) -> float:
    """Exchanges per second of `processes` workers sharing CONCURRENCY conversations."""
    per_proc = CONCURRENCY // processes
    users_each = per_proc * USERS_PER_CONVERSATION
    procs = []
    for p in range(processes):
        cmd = [sys.executable, "-m", "benchmarks.pgbench", "--worker", "--url", url,
               "--users", f"{p * users_each}:{users_each}", "--concurrency", str(per_proc),
               "--exchanges", str(exchanges // processes),
               "--pool", str(TOTAL_POOL // processes)]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True))
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:  # the barrier: every worker warmed up and waiting
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"a worker failed before READY: {line.strip()[:300]!r}")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            tagged = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if not tagged:
                raise RuntimeError(f"a worker exited {proc.returncode} without a result")
            result = json.loads(tagged[-1].removeprefix("RESULT "))
            if "error" in result:
                raise RuntimeError(result["error"])
            results.append(result)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    total = sum(r["exchanges"] for r in results)
    return total / (max(r["end"] for r in results) - min(r["start"] for r in results))


def measure(exchanges: int) -> tuple[float, float] | str:
    """(one process, two processes) exchanges/s, or why PostgreSQL is not available."""
    try:
        from storage.postgres_store import PostgresStore  # noqa: F401
    except ImportError as exc:
        return f"storage/postgres_store.py is not importable: {exc}"
    try:
        url = asyncio.run(fresh_database())
    except Exception as exc:
        return f"cannot create a database on {urlsplit(admin_url()).netloc}: " \
               f"{type(exc).__name__}: {exc}"
    try:
        users = CONCURRENCY * USERS_PER_CONVERSATION
        asyncio.run(seed(url, [user_id(n) for n in range(users)]))
        one = run_processes(url, 1, exchanges)
        two = run_processes(url, 2, exchanges)
        return one, two
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        try:
            asyncio.run(drop_database(url))
        except Exception as exc:
            print(f"  warning: could not drop {url}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker_main(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m benchmarks.pgbench --worker ... (run by benchmarks)")
