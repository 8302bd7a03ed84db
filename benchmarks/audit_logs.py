"""`python -m benchmarks.audit_logs [--rows N]`: searchable logs on a big audit table.

Fills a SQLite audit table (the store's own schema) with N records spread over
90 days, newest last, then times what an operator runs: `logs --since 1h`,
`--since 1h --status error`, `--grep`, `stats`, and one retention batch. The
same `--since` query without the audit_timestamp index shows what it buys.
Timings only: no assertions (the tests check behaviour).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bot.operator_commands import parse_since
from bot.records import AUDIT_COLUMNS
from bot.stats import store_stats
from storage.audit_queries import AuditFilter
from storage.postgres_store import PostgresStore
from storage.sqlite_store import SQLiteStore

SPAN = timedelta(days=90)


def _records(rows: int, now: datetime) -> Iterator[list[tuple[Any, ...]]]:
    """Batches of audit rows (AUDIT_COLUMNS order) over SPAN, oldest first."""
    rng = random.Random(1)
    start = now - SPAN
    step = SPAN / rows
    batch: list[tuple[Any, ...]] = []
    for i in range(rows):
        at = (start + step * i).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        status = "error" if rng.random() < 0.02 else "ok"
        batch.append((at, "telegram", str(rng.randrange(5000)), "c", "k", "ollama",
                      rng.choice(("llama3.2", "qwen2.5")), f"question {i} about things",
                      f"an answer {i}", status, "", rng.uniform(0.2, 6), rng.uniform(0.05, 1),
                      rng.randrange(50, 900), rng.randrange(5, 300), 4, "chat", False))
        if len(batch) == 50_000:
            yield batch
            batch = []
    yield batch


def _fill(path: Path, rows: int, now: datetime) -> None:
    conn = sqlite3.connect(path)
    cols = ", ".join(AUDIT_COLUMNS)
    sql = f"INSERT INTO audit ({cols}) VALUES ({', '.join('?' * len(AUDIT_COLUMNS))})"
    for batch in _records(rows, now):
        conn.executemany(sql, batch)
        conn.commit()
    conn.close()


async def postgres(rows: int) -> None:
    """The same `logs` queries on PostgreSQL (a fresh database on the test server)."""
    from tests.pg import drop_database, fresh_database

    now = datetime.now(UTC)
    url = await fresh_database()
    try:
        store = PostgresStore(url, pool_size=2)
        await store.open()
        try:
            t0 = time.perf_counter()
            async with store.pool.acquire() as conn:
                for batch in _records(rows, now):
                    await conn.copy_records_to_table("audit", records=batch,
                                                     columns=list(AUDIT_COLUMNS))
                await conn.execute("ANALYZE audit")
            print(f"PostgreSQL: filled {rows:,} audit records in "
                  f"{time.perf_counter() - t0:.1f} s")
            hour = AuditFilter(since=parse_since("1h"))
            await _time("pg logs --since 1h -n 20", lambda: store.audit_query(hour, 20))
            await _time("pg logs --since 1h -n 1000", lambda: store.audit_query(hour, 1000))
            await _time("pg logs --since 1h --status error", lambda: store.audit_query(
                AuditFilter(since=hour.since, status="error"), 20))
            await _time("pg stats (whole table, in SQL)", lambda: store_stats(store), repeat=1)
        finally:
            await store.close()
    finally:
        await drop_database(url)


async def _time(label: str, work: object, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = await work()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    shown = len(result) if isinstance(result, list) else result
    print(f"{label:<44} {best * 1000:9.1f} ms   ({shown} rows)")
    return best


async def main(rows: int) -> None:
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bot.db"
        store = SQLiteStore(str(path))
        await store.open()
        await store.close()
        t0 = time.perf_counter()
        await asyncio.to_thread(_fill, path, rows, now)
        print(f"filled {rows:,} audit records in {time.perf_counter() - t0:.1f} s")
        store = SQLiteStore(str(path), read_only=True)
        await store.open()
        hour = AuditFilter(since=parse_since("1h"))
        try:
            await _time("logs --since 1h -n 20", lambda: store.audit_query(hour, 20))
            await _time("logs --since 1h -n 1000", lambda: store.audit_query(hour, 1000))
            await _time("logs --since 1h --status error", lambda: store.audit_query(
                AuditFilter(since=hour.since, status="error"), 20))
            await _time("logs --since 1h --grep 'answer 99'", lambda: store.audit_query(
                AuditFilter(since=hour.since, grep="answer 99"), 20))
            await _time("logs -n 20 (no filter)", lambda: store.audit_query(AuditFilter(), 20))
            await _time("logs --since 7d --model qwen2.5 -n 20", lambda: store.audit_query(
                AuditFilter(since=parse_since("7d"), model="qwen2.5"), 20))
            await _time("stats (whole table, in SQL)", lambda: store_stats(store), repeat=1)
        finally:
            await store.close()
        writer = SQLiteStore(str(path))
        await writer.open()
        try:
            cutoff = (now - SPAN + timedelta(days=1)).isoformat(timespec="milliseconds")
            await _time("retention: one batch of 2,000 deleted",
                        lambda: writer.delete_audit_before(cutoff.replace("+00:00", "Z"), 2000))
        finally:
            await writer.close()
        conn = sqlite3.connect(path)
        conn.execute("DROP INDEX audit_timestamp")
        conn.commit()
        conn.close()
        store = SQLiteStore(str(path), read_only=True)
        await store.open()
        try:
            await _time("logs --since 1h -n 20, WITHOUT the index",
                        lambda: store.audit_query(hour, 20), repeat=2)
        finally:
            await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--postgres", action="store_true",
                        help="measure PostgreSQL (the test server) instead of SQLite")
    args = parser.parse_args()
    asyncio.run(postgres(args.rows) if args.postgres else main(args.rows))
