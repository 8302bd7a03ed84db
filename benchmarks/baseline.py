"""The bare exchange the core is compared with: aiosqlite and nothing else.

Per exchange: read the newest 50 messages of the conversation, then insert
the two new messages and one audit row and commit, on one connection with
the same pragmas as the store (WAL, synchronous=NORMAL) and a lock so that
concurrent transactions do not interleave. Same database, same closed loop
and same users as the core run it is compared with.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosqlite

from benchmarks.core import RunResult, split_users
from benchmarks.dbseed import conversation_key
from benchmarks.standin import REPLY

_READ = ("SELECT id, role, content FROM messages WHERE conversation_id = ?"
         " ORDER BY id DESC LIMIT 50")
_INSERT = ("INSERT INTO messages (conversation_id, role, content, created_at)"
           " VALUES (?, ?, ?, ?)")
_AUDIT = ("INSERT INTO audit (timestamp, platform, user_id, chat_id, conversation, provider,"
          " model, user_input, model_response, status, error, response_time)"
          " VALUES (?, 'telegram', ?, ?, ?, 'standin', 'bench-model', ?, ?, 'ok', '', ?)")
_STAMP = "2025-01-01T00:00:00.000Z"


async def run_baseline(db_path: Path, users: list[str], concurrency: int,
                       exchanges: int, max_seconds: float = 3600.0) -> RunResult:
    db = await aiosqlite.connect(db_path, isolation_level=None)
    lock = asyncio.Lock()
    reply = "".join(REPLY)
    try:
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        conv: dict[str, int] = {}
        for uid in users:
            rows = await db.execute_fetchall(
                "SELECT id FROM conversations WHERE key = ?", (conversation_key(uid),))
            conv[uid] = next(iter(rows))[0]

        async def one(uid: str, n: int) -> float:
            text = f"Question {n}: what do you think about the plan for this week?"
            t0 = time.perf_counter()
            async with lock:
                history = await db.execute_fetchall(_READ, (conv[uid],))
            assert history is not None
            async with lock:
                await db.execute("BEGIN IMMEDIATE")
                await db.executemany(_INSERT, [(conv[uid], "user", text, _STAMP),
                                               (conv[uid], "assistant", reply, _STAMP)])
                await db.execute(_AUDIT, (_STAMP, uid, uid, conversation_key(uid), text, reply,
                                          time.perf_counter() - t0))
                await db.execute("COMMIT")
            return time.perf_counter() - t0

        groups = split_users(users, concurrency)
        latencies: list[float] = []

        async def worker(group: list[str], count: int, start: int, keep: bool) -> None:
            deadline = time.perf_counter() + max_seconds
            for i in range(count):
                took = await one(group[i % len(group)], start + i)
                if keep:
                    latencies.append(took)
                if time.perf_counter() > deadline:
                    return

        await asyncio.gather(*(worker(g, len(g), -1_000_000, False) for g in groups))
        per_worker = max(1, exchanges // concurrency)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(g, per_worker, 0, True) for g in groups))
        seconds = time.perf_counter() - t0
    finally:
        await db.close()
    return RunResult(concurrency, len(latencies), seconds, latencies)
