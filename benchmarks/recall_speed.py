"""Recall's cost per turn on SQLite: query terms, ranking, neighbours, fitting.

`recall_p50_ms_{1k,100k,1m}`: the median time of the words-only recall step
of a turn (bot.recall.query_terms → storage.recall_index.search →
around → fit_recalled) with 1,000 / 100,000 / 1,000,000 stored messages in
that one conversation, among 5 other conversations of 1,000 messages each
(so the conversation filter has something to filter). Messages are chat-like
text over a Zipf-distributed vocabulary of 30,000 words plus everyday
phrases (so query words match many messages, as in a long real history);
queries are user questions. The databases are built once with sqlite3 and
cached under benchmarks/.cache/ (keyed by schema and tokenizer).

The sizes are timed in turn, query by query (a burst of load from elsewhere
on the machine then lands on every size, not on one, and the ratio is a
figure), and each recall starts with the token estimate's cache empty but
for the header, as a turn's recalled lines are new to it (the same eight
queries over and over would otherwise price fitting at the cached 1 µs a
line instead of about 20).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import os
import random
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosqlite

from benchmarks import dbseed, memory_corpus
from bot import tokens
from bot.recall import RECALL_HEADER, fit_recalled, query_terms, terms
from bot.recaller import FUSED_HITS
from storage import recall_index
from storage.dialect import POSTGRES, SQLITE
from storage.migrations import MIGRATIONS

SIZES = {"1k": 1_000, "100k": 100_000, "1m": 1_000_000}
OTHERS = 5  # other conversations of 1,000 messages
QUERIES = [
    "Where does my sister live now?",
    "What was the code for the garage again?",
    "How much rent am I paying now?",
    "Can you remind me what recipe we talked about for the curry dinner?",
    "我妹妹現在住在哪個城市？",
    "車庫的密碼是多少來著？",
    "what did my manager say about the billing project",
    "any tips for learning the guitar in the evenings",
]
RECALL_TOKENS = 896  # a quarter of 4096 - 512


def _vocab(n: int, rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(n)]


def _texts(count: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    vocab = _vocab(30_000, rng)
    cum, total = [], 0.0
    for i in range(len(vocab)):
        total += 1 / (i + 1)
        cum.append(total)
    everyday = [memory_corpus._fill(rng, t, memory_corpus.EN_SLOTS)
                for t in memory_corpus.EN_FILLER for _ in range(20)]
    everyday += [memory_corpus._fill(rng, t, memory_corpus.ZH_SLOTS)
                 for t in memory_corpus.ZH_FILLER for _ in range(20)]
    pool = [" ".join(rng.choices(vocab, cum_weights=cum, k=rng.randint(6, 40)))
            for _ in range(20_000)]
    for n in range(count):
        yield everyday[n % len(everyday)] if n % 3 == 0 else pool[(n * 7919) % len(pool)]


def _cache_key() -> str:
    # The tokenizer, the stored form of terms and the recall tables decide what is
    # stored; later migrations are applied to the cached copy when it is used.
    recall_step = next(m for m in MIGRATIONS if m.name == recall_index.MIGRATION_NAME)
    src = (inspect.getsource(terms) + inspect.getsource(recall_index.fts_terms)
           + inspect.getsource(recall_index.tsvector_literal)
           + repr(recall_step.statements(SQLITE)) + repr(recall_step.statements(POSTGRES)))
    return hashlib.sha256(src.encode()).hexdigest()[:10]


def _upgrade(path: Path) -> None:
    """Apply migrations added since the cached file was built (none: a quick check)."""
    dbseed.create_schema(path)


def build(size: int, log: bool = True) -> Path:
    """The cached database with one conversation of `size` messages (id 1) and others."""
    dbseed.CACHE_DIR.mkdir(exist_ok=True)
    path = dbseed.CACHE_DIR / f"recall-{size}-{_cache_key()}.db"
    if path.exists():
        _upgrade(path)
        return path
    for stale in dbseed.CACHE_DIR.glob(f"recall-{size}-*.db"):
        stale.unlink()
    t0 = time.perf_counter()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    dbseed.create_schema(tmp)
    db = sqlite3.connect(tmp, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -262144")
        db.execute("BEGIN")
        convs = [(f"telegram:r{n}@dm", f"r{n}") for n in range(OTHERS + 1)]
        db.executemany("INSERT INTO conversations (key, platform, user_id, place, created_at) "
                       "VALUES (?, 'telegram', ?, 'dm', '2026-01-01T00:00:00.000Z')", convs)
        big = 1
        # The big conversation's rows interleave with the others', as a busy bot writes them.
        plan = [big] * size + [c for c in range(2, OTHERS + 2) for _ in range(1000)]
        random.Random(3).shuffle(plan)
        texts = _texts(len(plan), seed=size)
        rows = []
        for n, (conv, text) in enumerate(zip(plan, texts, strict=False), 1):
            rows.append((n, conv, "user" if n % 2 else "assistant", text))
            if len(rows) == 20_000 or n == len(plan):
                db.executemany("INSERT INTO messages (id, conversation_id, role, content, "
                               "created_at) VALUES (?, ?, ?, ?, '2026-01-01T00:00:00.000Z')",
                               rows)
                db.executemany("INSERT INTO recall_fts(rowid, terms, conv) VALUES (?, ?, ?)",
                               [(i, recall_index.fts_terms(c, recall_index.index_terms(t)),
                                 f"c{c}") for i, c, _, t in rows])
                rows = []
        db.execute("COMMIT")
        db.execute("INSERT INTO recall_fts(recall_fts) VALUES ('optimize')")
        db.execute("ANALYZE")
    finally:
        db.close()
    tmp.replace(path)
    if log:
        print(f"  built {size:,} + {OTHERS * 1000:,} messages in {time.perf_counter() - t0:.0f} s"
              f" → {path.name} (cached)", flush=True)
    return path


async def _recall_once(conn: Any, newest: int, query: str) -> float:
    """Seconds for one recall (search, neighbours, fitting) on either backend's connection,
    in the round trips a turn makes there.

    The token estimate's cache is emptied first (all but the header's): a turn's
    recalled lines are new text to it, and counting one costs about 20 µs cold,
    1 µs warm; the same eight queries again and again would price fitting warm."""
    before = newest - 60  # the window holds the newest messages
    tokens.measure.cache_clear()
    tokens.count_tokens(RECALL_HEADER)
    t0 = time.perf_counter()
    if isinstance(conn, aiosqlite.Connection):
        hits = await recall_index.search(conn, 1, query_terms(query), before, 25)
        arounds = await recall_index.around(conn, 1, [h[0] for h in hits], before)
    else:  # as a PostgreSQL turn runs it: the best hits' neighbours in the same query
        _, arounds = await recall_index.search_around(conn, 1, query_terms(query), before,
                                                      25, FUSED_HITS)
    fit_recalled(arounds, RECALL_TOKENS)
    return time.perf_counter() - t0


async def _timed(conns: dict[str, tuple[Any, int]], reps: int) -> dict[str, list[float]]:
    """Seconds per recall at each size (name → (connection, newest id)), the sizes in
    turn for each query: a burst of load from elsewhere on this 2-core machine then
    hits every size alike instead of one, and their ratio is a figure. The first
    round of queries warms the caches and is left out."""
    times: dict[str, list[float]] = {name: [] for name in conns}
    for rep in range(reps + len(QUERIES)):
        q = QUERIES[rep % len(QUERIES)]
        for name, (conn, newest) in conns.items():
            took = await _recall_once(conn, newest, q)
            if rep >= len(QUERIES):
                times[name].append(took)
    return times


def _figures(times: dict[str, list[float]], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, ts in times.items():
        out[f"{prefix}_p50_ms_{name}"] = statistics.median(ts) * 1000
        out[f"{prefix}_p99_ms_{name}"] = sorted(ts)[int(len(ts) * 0.99) - 1] * 1000
    if f"{prefix}_p50_ms_1m" in out and f"{prefix}_p50_ms_1k" in out:
        out[f"{prefix}_ratio_1m_vs_1k"] = out[f"{prefix}_p50_ms_1m"] / out[f"{prefix}_p50_ms_1k"]
    return out


async def _newest(conn: Any) -> int:
    sql = "SELECT max(id) FROM messages WHERE conversation_id = 1"
    if isinstance(conn, aiosqlite.Connection):
        cur = await conn.execute(sql)
        return int((await cur.fetchone())[0])  # type: ignore[index]
    return int(await conn.fetchval(sql))


async def _measure(paths: dict[str, Path], reps: int) -> dict[str, list[float]]:
    async with contextlib.AsyncExitStack() as stack:
        conns = {}
        for name, path in paths.items():
            conn = await stack.enter_async_context(aiosqlite.connect(path))
            conns[name] = (conn, await _newest(conn))
        return await _timed(conns, reps)


def measure(reps: int = 200, sizes: dict[str, int] = SIZES) -> dict[str, float]:
    """p50 ms per size (and the 1m ÷ 1k ratio)."""
    paths = {name: build(size) for name, size in sizes.items()}
    return _figures(asyncio.run(_measure(paths, reps)), "recall")


# -- PostgreSQL: the same conversations and queries on recall_terms (tsvector + GIN)

PG_DB_PREFIX = "bench_recall_"


def _pg_name(size: int) -> str:
    return f"{PG_DB_PREFIX}{size}_{_cache_key().replace('-', '_')}"


async def _pg_build(size: int) -> str:
    """The URL of a kept database holding the SQLite cache's rows (built once)."""
    import asyncpg

    from storage import open_store
    from tests.pg import _with_database, admin_connection, admin_url

    name = _pg_name(size)
    url = _with_database(admin_url(), name)
    admin = await admin_connection()
    try:
        have = {r[0] for r in await admin.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"{PG_DB_PREFIX}{size}_%")}
        if name in have:
            store = open_store(url, pool_size=2)
            await store.open()  # migrations added since it was built
            await store.close()
            return url
        for stale in have:
            await admin.execute(f'DROP DATABASE "{stale}"')
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}_tmp"')  # an interrupted build
        await admin.execute(f'CREATE DATABASE "{name}_tmp"')
    finally:
        await admin.close()
    t0 = time.perf_counter()
    tmp_url = _with_database(admin_url(), f"{name}_tmp")
    store = open_store(tmp_url, pool_size=2)
    await store.open()  # the schema by the store's own migrations
    await store.close()
    src = sqlite3.connect(await asyncio.to_thread(build, size))
    conn = await asyncpg.connect(tmp_url)
    try:
        await conn.copy_records_to_table(
            "conversations", columns=["id", "key", "platform", "user_id", "place", "created_at"],
            records=src.execute("SELECT id, key, platform, user_id, place, created_at "
                                "FROM conversations").fetchall())
        cur = src.execute("SELECT id, conversation_id, role, content FROM messages ORDER BY id")
        while batch := cur.fetchmany(50_000):
            await conn.copy_records_to_table(
                "messages", columns=["id", "conversation_id", "role", "content", "created_at"],
                records=[(*r, "2026-01-01T00:00:00.000Z") for r in batch])
            # tsvector has no binary codec in asyncpg: COPY it as text.
            lines = "".join(
                f"{mid}\t{cid}\t"
                + recall_index.tsvector_literal(recall_index.index_terms(text))
                .replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n") + "\n"
                for mid, cid, _role, text in batch)
            await conn.copy_to_table("recall_terms", source=_Bytes(lines.encode()),
                                     columns=["message_id", "conversation_id", "terms"])
        await conn.execute("SELECT setval(pg_get_serial_sequence('messages', 'id'), "
                           "(SELECT max(id) FROM messages))")
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
        src.close()
    admin = await admin_connection()
    try:
        await admin.execute(f'ALTER DATABASE "{name}_tmp" RENAME TO "{name}"')
    finally:
        await admin.close()
    print(f"  PostgreSQL: built {size:,} + {OTHERS * 1000:,} messages in "
          f"{time.perf_counter() - t0:.0f} s → database {name} (kept)", flush=True)
    return url


class _Bytes:
    """A file-like source for COPY FROM (asyncpg reads it with `read`)."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._at = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._at + n
        out = bytes(self._data[self._at:end])
        self._at += len(out)
        return out


async def _pg_measure(urls: dict[str, str], reps: int) -> dict[str, list[float]]:
    import asyncpg

    conns: dict[str, tuple[Any, int]] = {}
    try:
        for name, url in urls.items():
            conn = await asyncpg.connect(url)
            conns[name] = (conn, await _newest(conn))
        return await _timed(conns, reps)
    finally:
        for conn, _ in conns.values():
            await conn.close()


def measure_pg(reps: int = 200, sizes: dict[str, int] = SIZES) -> dict[str, float]:
    """`recall_pg_p50_ms_*` per size and the ratio, on the local PostgreSQL server."""

    async def run() -> dict[str, list[float]]:
        urls = {name: await _pg_build(size) for name, size in sizes.items()}
        return await _pg_measure(urls, reps)

    return _figures(asyncio.run(run()), "recall_pg")


if __name__ == "__main__":
    import sys

    fn = measure_pg if "--postgres" in sys.argv else measure
    for k, v in fn().items():
        print(f"{k}: {v:.3f}")
