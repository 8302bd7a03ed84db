"""SQLite files for the benchmarks: the store's own schema, filled fast with sqlite3.

The schema comes from `SQLiteStore.open()` (its migrations); the rows go in
with plain `sqlite3.executemany`, which is two orders of magnitude faster than
going through the bot. The 1,000,000-message file is cached under
`benchmarks/.cache/`, keyed by a hash of the migrations, so re-runs skip it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shutil
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from storage import recall_index
from storage.dialect import SQLITE
from storage.migrations import MIGRATIONS
from storage.sqlite_store import SQLiteStore

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
PLATFORM = "telegram"
_STAMP = "2025-01-01T00:00:00.000Z"

_VOCAB = (
    "the a to of and in is it you that for on with as this be are can was have not what "
    "how my your about would could should we they there some more time make like just "
    "python code server memory question answer idea travel recipe garden weather music "
    "book history science budget plan week morning project friend family, example. "
    "because maybe really think know want need help please thanks! first then also"
).split()


def user_id(n: int) -> str:
    return f"u{n:05d}"


def conversation_key(uid: str, platform: str = PLATFORM) -> str:
    """The key `ChatService.conversation_ref` gives a direct message of `uid`."""
    return f"{platform}:{uid}@dm"


SEED_VERSION = 2  # 2: the seeded messages are in the words index too


def schema_key() -> str:
    """Changes whenever a migration is added or edited, or the seed's shape changes."""
    steps = [SEED_VERSION, *((m.name, m.statements(SQLITE)) for m in MIGRATIONS)]
    digest = hashlib.sha256(repr(steps).encode()).hexdigest()[:10]
    return f"{MIGRATIONS[-1].name}-{digest}"


def chat_texts(count: int, seed: int = 7) -> list[str]:
    """A pool of chat-like texts of 8 to 60 words (about 10 to 70 tokens)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(_VOCAB, k=rng.randint(8, 60))) for _ in range(count)]


def create_schema(path: Path) -> None:
    """An empty database with the store's schema, made by the store itself."""
    async def make() -> None:
        store = SQLiteStore(str(path))
        await store.open()
        await store.close()

    asyncio.run(make())


def fill(path: Path, users: Sequence[str], per_user: int, platform: str = PLATFORM) -> None:
    """Give each user a DM conversation with `per_user` messages, in the words index.

    Rows go in round by round (one exchange of every user, then the next), as
    a busy bot writes them, so one user's messages are spread over the whole
    table rather than packed together.
    """
    texts = chat_texts(4096)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA synchronous = OFF")
        db.execute("PRAGMA cache_size = -262144")  # 256 MiB: index inserts stay in memory
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO conversations (key, platform, user_id, place, created_at)"
            " VALUES (?, ?, ?, 'dm', ?)",
            ((conversation_key(u, platform), platform, u, _STAMP) for u in users),
        )
        ids = dict(db.execute("SELECT key, id FROM conversations"))
        conv = [ids[conversation_key(u, platform)] for u in users]

        def rows() -> Iterator[tuple[int, str, str, str]]:
            n = 0
            for rnd in range(per_user):
                role = "user" if rnd % 2 == 0 else "assistant"
                for c in conv:
                    n += 1
                    yield c, role, texts[(n * 2654435761) % len(texts)], _STAMP

        db.executemany(
            "INSERT INTO messages (conversation_id, role, content, created_at)"
            " VALUES (?, ?, ?, ?)",
            rows(),
        )
        # In the words index too, as the bot stores them: a turn's recall then
        # searches a real history and finds its hits, as a returning user's does.
        db.executemany(
            "INSERT INTO recall_fts(rowid, terms, conv) VALUES (?, ?, ?)",
            ((mid, recall_index.fts_terms(cid, recall_index.index_terms(text)),
              recall_index.conv_token(cid))
             for mid, cid, text in db.execute(
                 "SELECT id, conversation_id, content FROM messages").fetchall()),
        )
        db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("ANALYZE")
    finally:
        db.close()


def fresh_db(path: Path, users: Sequence[str], per_user: int,
             platform: str = PLATFORM) -> Path:
    """A new database at `path` holding `per_user` messages for each user."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    create_schema(path)
    if users:
        fill(path, users, per_user, platform)
    return path


def big_db(dest: Path, users: int = 10_000, per_user: int = 100,
           log: bool = True) -> tuple[Path, bool]:
    """A copy at `dest` of the cached `users` × `per_user` database; (path, was cached)."""
    CACHE_DIR.mkdir(exist_ok=True)
    cached = CACHE_DIR / f"history-{users}x{per_user}-{schema_key()}.db"
    hit = cached.exists()
    if not hit:
        for stale in CACHE_DIR.glob(f"history-{users}x{per_user}-*.db"):
            stale.unlink()  # built for an older schema: never used again
        t0 = time.perf_counter()
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        try:
            fresh_db(tmp, [user_id(n) for n in range(users)], per_user)
            tmp.replace(cached)  # only a complete file ever has the cache's name
        finally:
            for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                leftover.unlink(missing_ok=True)
        if log:
            print(f"  populated {users * per_user:,} messages in "
                  f"{time.perf_counter() - t0:.1f} s → {cached.name} (cached)", flush=True)
    shutil.copyfile(cached, dest)  # the run appends rows; the cache stays as built
    return dest, hit
