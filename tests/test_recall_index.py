"""storage/recall_index.py on both backends: schema, indexing, search, vectors, deletion."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import aiosqlite
import asyncpg
import pytest

from bot.recall import query_terms
from bot.recall.vectors import to_blob
from storage import recall_index
from storage.dialect import POSTGRES, SQLITE
from storage.migrations import MIGRATIONS
from tests.backends import db_url_both_backends  # noqa: F401

NOW = "2026-11-03T10:00:00.000Z"


class Db:
    """A raw connection with the real schema (recall steps included), either dialect."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.sqlite = isinstance(conn, aiosqlite.Connection)

    async def run(self, sql: str, *args: Any) -> None:
        if self.sqlite:
            await self.conn.execute(sql.replace("$", "?"), args)
        else:
            await self.conn.execute(sql, *args)

    async def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if self.sqlite:
            import re
            cur = await self.conn.execute(re.sub(r"\$\d+", "?", sql), args)
            return [tuple(r) for r in await cur.fetchall()]
        return [tuple(r) for r in await self.conn.fetch(sql, *args)]

    async def commit(self) -> None:
        if self.sqlite:
            await self.conn.commit()

    async def conversation(self, key: str) -> int:
        rows = await self.rows(
            "INSERT INTO conversations(key, platform, user_id, place, created_at) "
            "VALUES ($1, 'console', $2, 'dm', $3) RETURNING id", key, key, NOW)
        return int(rows[0][0])

    async def message(self, conv: int, role: str, content: str, created: str = NOW) -> int:
        rows = await self.rows(
            "INSERT INTO messages(conversation_id, role, content, created_at) "
            "VALUES ($1, $2, $3, $4) RETURNING id", conv, role, content, created)
        mid = int(rows[0][0])
        await recall_index.index_messages(self.conn, [(mid, conv, content)])
        return mid


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Db]:
    if db_url.startswith("sqlite"):
        path = db_url.removeprefix("sqlite:///")
        import os
        os.makedirs(os.path.dirname(path), exist_ok=True)
        conn = await aiosqlite.connect(path)
        # The one list of steps, as the store applies it (the table rebuild of 004
        # wants foreign keys off).
        for step in MIGRATIONS:
            for sql in step.statements(SQLITE):
                await conn.execute(sql)
        await conn.commit()
        await conn.execute("PRAGMA foreign_keys = ON")
        try:
            yield Db(conn)
        finally:
            await conn.close()
        return
    parts = urlsplit(db_url)
    schema = parse_qs(parts.query)["search_path"][0]
    conn = await asyncpg.connect(urlunsplit(parts._replace(query="")),
                                 server_settings={"search_path": schema})
    for step in MIGRATIONS:
        for sql in step.statements(POSTGRES):
            await conn.execute(sql)
    try:
        yield Db(conn)
    finally:
        await conn.close()


async def test_search_finds_english_and_chinese_within_one_conversation(db: Db) -> None:
    mine = await db.conversation("me")
    other = await db.conversation("other")
    fact = await db.message(mine, "user", "My sister moved to Tainan last spring.")
    await db.message(mine, "assistant", "That's a lovely city.")
    noodle = await db.message(mine, "user", "我昨天在台北吃了一碗拉麵，小明也在。")
    for i in range(20):
        await db.message(mine, "user", f"Filler message number {i} about the weather.")
    # Another user's message with the very same words must never come back.
    theirs = await db.message(other, "user", "My sister moved to Tainan; 拉麵 with 小明.")
    window = await db.message(mine, "user", "Where does my sister live now?")
    await db.commit()

    hits = await recall_index.search(db.conn, mine, query_terms("where does my sister live?"),
                                     before_id=window, limit=5)
    assert [h[0] for h in hits] == [fact]
    assert hits[0][1] > 0
    hits = await recall_index.search(db.conn, mine, query_terms("小明吃了什麼拉麵？"),
                                     before_id=window, limit=5)
    assert hits and hits[0][0] == noodle
    assert theirs not in {h[0] for h in hits}
    hits = await recall_index.search(db.conn, other, query_terms("sister"), 10**9, 5)
    assert [h[0] for h in hits] == [theirs]


async def test_only_messages_older_than_the_bound_and_better_matches_first(db: Db) -> None:
    conv = await db.conversation("me")
    weak = await db.message(conv, "user", "I walked past a garden and a bakery and a school.")
    for _ in range(3):
        await db.message(conv, "user", "The garden again, a garden of roses.")
    strong = await db.message(conv, "user", "The garage code, the garage code is 4417.")
    newer = await db.message(conv, "user", "garage")
    await db.commit()
    hits = await recall_index.search(db.conn, conv, ["garage", "garden"], before_id=newer,
                                     limit=10)
    # Every match below the bound comes back, best first.
    assert {h[0] for h in hits} == set(range(weak, strong + 1))
    assert [h[1] for h in hits] == sorted((h[1] for h in hits), reverse=True)
    if db.sqlite:  # bm25: the rarer term, twice, beats the common one (ts_rank has no idf)
        assert hits[0][0] == strong and hits[0][1] > hits[1][1]
    assert await recall_index.search(db.conn, conv, ["garage"], before_id=strong, limit=10) == []
    assert await recall_index.search(db.conn, conv, [], before_id=10**9, limit=10) == []
    # Terms that look like FTS5 or tsquery syntax are plain words here.
    assert await recall_index.search(db.conn, conv, ['x" OR conv', "a'b", "NEAR"], 10**9,
                                     10) == []


async def test_reindexing_a_message_replaces_its_terms(db: Db) -> None:
    conv = await db.conversation("me")
    mid = await db.message(conv, "user", "apples")
    await recall_index.index_messages(db.conn, [(mid, conv, "pears")])
    await db.commit()
    assert await recall_index.search(db.conn, conv, ["apple"], 10**9, 5) == []
    assert [h[0] for h in await recall_index.search(db.conn, conv, ["pear"], 10**9, 5)] == [mid]
    assert await recall_index.newest_indexed_id(db.conn) == mid


async def test_around_gives_each_hit_its_neighbours_inside_the_conversation(db: Db) -> None:
    a = await db.conversation("a")
    b = await db.conversation("b")
    m1 = await db.message(a, "user", "one", "2026-11-01T00:00:00Z")
    await db.message(b, "user", "interleaved other user")
    m2 = await db.message(a, "assistant", "two")
    m3 = await db.message(a, "user", "three")
    m4 = await db.message(a, "assistant", "four (in the window)")
    foreign = await db.message(b, "user", "not yours")
    await db.commit()
    got = await recall_index.around(db.conn, a, [m2, m1, m3, foreign], before_id=m4)
    assert [(g.hit.id, g.before and g.before.id, g.after and g.after.id) for g in got] == [
        (m2, m1, m3), (m1, None, m2), (m3, m2, None)]
    assert got[1].hit.content == "one" and got[1].hit.created_at.startswith("2026-11-01")
    assert got[0].hit.role == "assistant"


async def test_vectors_round_trip_and_come_back_only_newer_than_asked(db: Db) -> None:
    conv = await db.conversation("me")
    other = await db.conversation("other")
    ids = [await db.message(conv, "user", f"m{i}") for i in range(4)]
    theirs = await db.message(other, "user", "x")
    await recall_index.save_vectors(db.conn, "mini", [(i, conv, to_blob([i, 0.5])) for i in ids])
    await recall_index.save_vectors(db.conn, "mini", [(theirs, other, to_blob([9, 9]))])
    await db.commit()
    got = await recall_index.vectors_since(db.conn, conv, "mini", ids[1])
    assert got == [(i, to_blob([i, 0.5])) for i in ids[2:]]
    assert await recall_index.vectors_since(db.conn, conv, "other-model", 0) == []
    todo = await recall_index.messages_without_vectors(db.conn, "mini", 0, 10)
    assert todo == []
    todo = await recall_index.messages_without_vectors(db.conn, "other-model", ids[0], 10)
    assert [t[0] for t in todo] == [*ids[1:], theirs]
    assert [t[0] for t in await recall_index.messages_after(db.conn, ids[2], 10)] == [
        ids[3], theirs]


async def test_delete_conversation_removes_its_entries_and_no_one_elses(db: Db) -> None:
    conv = await db.conversation("me")
    other = await db.conversation("other")
    mine = [await db.message(conv, "user", "secret garage code") for _ in range(3)]
    theirs = await db.message(other, "user", "secret garage code")
    await recall_index.save_vectors(db.conn, "m", [(i, conv, to_blob([1.0])) for i in mine])
    await recall_index.save_vectors(db.conn, "m", [(theirs, other, to_blob([1.0]))])
    await db.commit()
    assert await recall_index.delete_conversation(db.conn, conv) == (3, 3)
    await db.commit()
    assert await recall_index.search(db.conn, conv, ["garage"], 10**9, 5) == []
    assert await recall_index.vectors_since(db.conn, conv, "m", 0) == []
    assert [h[0] for h in await recall_index.search(db.conn, other, ["garage"], 10**9, 5)] == [
        theirs]
    assert len(await recall_index.vectors_since(db.conn, other, "m", 0)) == 1
    # Vectors also go with their message (foreign key), whoever deletes it.
    if not db.sqlite:  # the postings the search reads: kept by triggers, both ways
        assert await db.rows("SELECT DISTINCT conversation_id, message_id FROM "
                             "recall_postings") == [(other, theirs)]
    await db.run("DELETE FROM messages WHERE id = $1", theirs)
    await db.commit()
    assert await recall_index.vectors_since(db.conn, other, "m", 0) == []
    if not db.sqlite:
        assert await db.rows("SELECT * FROM recall_postings") == []


async def test_a_common_word_does_not_crowd_out_a_rare_one_in_a_long_history(
        db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recall_index, "MAX_CANDIDATES", 20)
    conv = await db.conversation("me")
    fact = await db.message(conv, "user", "The garage code is 4417.")
    common = [await db.message(conv, "user", f"a code review, number {i}") for i in range(50)]
    await db.commit()
    hits = await recall_index.search(db.conn, conv, ["code", "garage"], 10**9, 5)
    assert hits[0][0] == fact
    # The common term alone is still searched, newest matches first and bounded
    # (PostgreSQL too: its postings are read newest first).
    hits = await recall_index.search(db.conn, conv, ["code"], 10**9, 100)
    assert len(hits) == 20 and {h[0] for h in hits} <= set(common[-20:]) | {fact}
    # Bounded below the window as well: the newest 20 matches older than it.
    hits = await recall_index.search(db.conn, conv, ["code"], common[-10], 100)
    assert {h[0] for h in hits} == set(common[-30:-10])


async def test_of_terms_past_the_cap_the_one_reaching_further_back_is_kept(
        db: Db, monkeypatch: pytest.MonkeyPatch) -> None:
    # "tips for learning the guitar in the evenings": both words are past the cap,
    # so their counts tie; the guitar's newest matches reach further back (rarer),
    # so the guitar is what the search is about, not the alphabet's first word.
    monkeypatch.setattr(recall_index, "MAX_CANDIDATES", 5)
    conv = await db.conversation("me")
    guitar = []
    for i in range(10):
        guitar.append(await db.message(conv, "user", f"guitar chords, lesson {i}"))
        for j in range(3):
            await db.message(conv, "assistant", f"filler reply {i} {j}")
    for i in range(20):
        await db.message(conv, "user", f"a quiet evening, number {i}")
    await db.commit()
    hits = await recall_index.search(db.conn, conv, ["evening", "guitar"], 10**9, 100)
    assert {h[0] for h in hits} == set(guitar[-5:])


async def test_a_lone_common_term_ranks_only_its_newest_matches(db: Db) -> None:
    # The bound a turn's ranking works within, whatever the history's size.
    conv = await db.conversation("me")
    ids = [await db.message(conv, "user", f"the garden, day {i}")
           for i in range(recall_index.MAX_CANDIDATES + 20)]
    await db.commit()
    hits = await recall_index.search(db.conn, conv, ["garden"], 10**9, 1000)
    assert recall_index.MAX_CANDIDATES == 200
    assert {h[0] for h in hits} == set(ids[-200:])
