"""The recall index in the database: full-text terms and embedding vectors, both dialects.

SQLite keeps the tokenizer's terms in an FTS5 table (rowid = message id;
each term prefixed with its conversation, see `fts_terms`; a `conv` column
names the conversation for deletion; ranked by `bm25()`); PostgreSQL keeps
them as a `tsvector` with positions in a side table (ranked by `ts_rank`) whose
triggers keep postings per conversation and term (`recall_postings`, read
newest first). The terms come from `bot.recall.terms`, the same tokenizer
on both sides and for the query, so neither database's own parser is
involved (no 'simple' config surprises with Chinese). Vectors are
little-endian float32 blobs / bytea, one per message and model.

Every function takes a connection (aiosqlite or asyncpg, chosen by type)
and runs inside whatever transaction the caller holds: indexing a message
belongs in the transaction that stores it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import aiosqlite

from bot.recall.fitting import Around, RecallMessage
from bot.recall.terms import index_terms

if TYPE_CHECKING:
    import asyncpg  # only for hints: a SQLite bot never imports it

MIGRATION_NAME = "009_recall"  # the step of storage/migrations.py that makes the tables

MAX_POSITION = 16383  # PostgreSQL's largest tsvector position
# Both backends rank at most this many candidate matches, the newest first: ranking
# costs per match (bm25 about 0.8 µs each here, ts_rank with its row about 1 µs),
# and a long history must not make a turn slower: 200 keeps a 1,000,000-message
# history's recall within 2.5 × a 1,000's on both (250 measured 2.4-2.7; the
# memory benchmark's words-only figures are the same at 150, 200 and 250).
# The rarest terms are kept whole (terms go in rarest first while their matches
# fit); a term too common to fit says little about any one message anyway (its idf
# is near zero).
MAX_CANDIDATES = 200


def _is_sqlite(conn: Any) -> bool:
    return isinstance(conn, aiosqlite.Connection)


def conv_token(conversation_id: int) -> str:
    return f"c{conversation_id}"


def fts_terms(conversation_id: int, terms: Iterable[str]) -> str:
    """Terms as SQLite stores them: each prefixed with its conversation ("12xsister").

    So every term's doclist, document frequency and bm25 idf are the
    conversation's own: a search costs what that conversation matches, never
    the whole table, and cannot even name another conversation's terms. The
    prefix ends at the first "x", which no id contains, so it decodes uniquely.
    """
    return " ".join(f"{conversation_id}x{t}" for t in terms)


def _lexeme(term: str) -> str:
    return "'" + term.replace("\\", "\\\\").replace("'", "''") + "'"


def tsvector_literal(terms: Sequence[str]) -> str:
    """The tokenizer's terms as a tsvector with positions (no parser, no folding)."""
    positions: dict[str, list[int]] = {}
    for pos, term in enumerate(terms[:MAX_POSITION], 1):
        positions.setdefault(term, []).append(pos)
    return " ".join(f"{_lexeme(t)}:{','.join(map(str, p[:256]))}" for t, p in positions.items())


def tsquery_literal(terms: Sequence[str]) -> str:
    return " | ".join(_lexeme(t) for t in terms)


# -- writing


async def index_messages(conn: Any, rows: Iterable[tuple[int, int, str]]) -> int:
    """Index (message_id, conversation_id, content) rows; an id indexed before is replaced."""
    batch = [(mid, cid, index_terms(text)) for mid, cid, text in rows]
    if not batch:
        return 0
    if _is_sqlite(conn):
        await conn.executemany("DELETE FROM recall_fts WHERE rowid = ?",
                               [(mid,) for mid, _, _ in batch])
        await conn.executemany(
            "INSERT INTO recall_fts(rowid, terms, conv) VALUES (?, ?, ?)",
            [(mid, fts_terms(cid, terms), conv_token(cid)) for mid, cid, terms in batch])
    else:
        await conn.executemany(
            "INSERT INTO recall_terms(message_id, conversation_id, terms) "
            "VALUES ($1, $2, $3::tsvector) ON CONFLICT (message_id) DO UPDATE "
            "SET conversation_id = EXCLUDED.conversation_id, terms = EXCLUDED.terms",
            [(mid, cid, tsvector_literal(terms)) for mid, cid, terms in batch])
    return len(batch)


async def save_vectors(conn: Any, model: str,
                       rows: Iterable[tuple[int, int, bytes]]) -> int:
    """Store (message_id, conversation_id, float32 blob) rows for `model`."""
    batch = list(rows)
    if not batch:
        return 0
    if _is_sqlite(conn):
        await conn.executemany(
            "INSERT OR REPLACE INTO recall_vectors(message_id, conversation_id, model, vector) "
            "VALUES (?, ?, ?, ?)", [(mid, cid, model, blob) for mid, cid, blob in batch])
    else:
        await conn.executemany(
            "INSERT INTO recall_vectors(message_id, conversation_id, model, vector) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (message_id) DO UPDATE "
            "SET model = EXCLUDED.model, vector = EXCLUDED.vector",
            [(mid, cid, model, blob) for mid, cid, blob in batch])
    return len(batch)


async def delete_conversation(conn: Any, conversation_id: int) -> tuple[int, int]:
    """Remove a conversation's index entries and vectors; (terms, vectors) removed."""
    if _is_sqlite(conn):
        cur = await conn.execute(
            "DELETE FROM recall_fts WHERE rowid IN "
            "(SELECT rowid FROM recall_fts WHERE recall_fts MATCH ?)",
            (f'conv : "{conv_token(conversation_id)}"',))
        terms = cur.rowcount
        cur = await conn.execute("DELETE FROM recall_vectors WHERE conversation_id = ?",
                                 (conversation_id,))
        return terms, cur.rowcount
    terms_status = await conn.execute("DELETE FROM recall_terms WHERE conversation_id = $1",
                                      conversation_id)
    vectors_status = await conn.execute(
        "DELETE FROM recall_vectors WHERE conversation_id = $1", conversation_id)
    return int(terms_status.split()[-1]), int(vectors_status.split()[-1])


# -- reading


async def search(conn: Any, conversation_id: int, terms: Sequence[str], before_id: int,
                 limit: int) -> list[tuple[int, float]]:
    """Messages of one conversation with id < before_id matching any term: (id, score),
    best first (higher is better)."""
    if not terms or limit <= 0:
        return []
    if _is_sqlite(conn):
        cur = await conn.execute(_SEARCH_SQLITE, (json.dumps(list(dict.fromkeys(terms))),
                                                  conversation_id, before_id, MAX_CANDIDATES,
                                                  limit))
        return [(int(r[0]), float(r[1])) for r in await cur.fetchall()]
    rows = await conn.fetch(_SEARCH_POSTGRES + " SELECT id, score FROM ranked",
                            *_search_args(conversation_id, terms, before_id, limit))
    return sorted(((int(r[0]), float(r[1])) for r in rows), key=lambda h: (-h[1], -h[0]))


# PostgreSQL's search, as SQLite's: each term's matches counted newest first up to
# MAX_CANDIDATES + 1 (recall_postings' primary key, read backwards); the rarest terms
# kept while their matches fit (of terms past the cap, the one whose count reached
# furthest back: see _SEARCH_SQLITE); the newest MAX_CANDIDATES matches of those ranked by
# ts_rank with every query term. Only this conversation's messages older than $3.
# Arguments: conversation, terms (text[]), before_id, limit, tsquery, cap.
_SEARCH_POSTGRES = """
WITH counted AS MATERIALIZED (  -- counted once, not per reference
    SELECT t.term, c.n, CASE WHEN c.n > $6 THEN c.oldest ELSE 0 END AS depth
    FROM unnest($2::text[]) AS t(term), LATERAL (
        SELECT count(*) AS n, min(x.message_id) AS oldest FROM (
            SELECT p.message_id FROM recall_postings p WHERE p.conversation_id = $1
            AND p.term = t.term AND p.message_id < $3 ORDER BY p.message_id DESC
            LIMIT $6 + 1) AS x) AS c
), kept AS (
    SELECT term FROM (
        SELECT term, row_number() OVER w AS rank, sum(n) OVER w AS running
        FROM counted WHERE n > 0
        WINDOW w AS (ORDER BY n, depth, term ROWS UNBOUNDED PRECEDING)
    ) AS s WHERE rank = 1 OR running <= $6
), candidates AS (
    SELECT DISTINCT x.message_id FROM kept, LATERAL (
        SELECT p.message_id FROM recall_postings p WHERE p.conversation_id = $1
        AND p.term = kept.term AND p.message_id < $3 ORDER BY p.message_id DESC LIMIT $6
    ) AS x ORDER BY x.message_id DESC LIMIT $6
), ranked AS (
    SELECT r.message_id AS id, ts_rank(r.terms, CAST($5 AS tsquery), 1) AS score
    FROM candidates c JOIN recall_terms r ON r.message_id = c.message_id
    WHERE r.conversation_id = $1 ORDER BY score DESC, r.message_id DESC LIMIT $4
)"""


def _search_args(conversation_id: int, terms: Sequence[str], before_id: int,
                 limit: int) -> tuple[Any, ...]:
    return (conversation_id, list(dict.fromkeys(terms)), before_id, limit,
            tsquery_literal(terms), MAX_CANDIDATES)


# The search and, for its best `$7` hits, their neighbours (as `around`), in one round
# trip: kind 0 rows are hits (id, score), kind 1 rows neighbours (hit, side, message).
_SEARCH_AROUND_POSTGRES = _SEARCH_POSTGRES + """, best AS (
    SELECT id AS h FROM ranked ORDER BY score DESC, id DESC LIMIT $7
)
SELECT 0, id, score, NULL::int, NULL::bigint, NULL, NULL, NULL FROM ranked
UNION ALL
SELECT 1, h, NULL, m.side, m.id, m.role, m.content, m.created_at FROM best,
    LATERAL (SELECT CASE WHEN id = best.h THEN 0 ELSE -1 END AS side, id, role, content,
             created_at FROM messages WHERE conversation_id = $1 AND id <= best.h AND id < $3
             ORDER BY conversation_id DESC, id DESC LIMIT 2) m
UNION ALL
SELECT 1, h, NULL, 1, n.id, n.role, n.content, n.created_at FROM best,
    LATERAL (SELECT id, role, content, created_at FROM messages
             WHERE conversation_id = $1 AND id > best.h AND id < $3
             ORDER BY conversation_id, id LIMIT 1) n
"""


async def search_around(conn: asyncpg.Connection, conversation_id: int, terms: Sequence[str],
                        before_id: int, limit: int, best: int
                        ) -> tuple[list[tuple[int, float]], list[Around]]:
    """PostgreSQL: `search`, and `around` of its first `best` hits, in one query."""
    if not terms or limit <= 0:
        return [], []
    rows = await conn.fetch(_SEARCH_AROUND_POSTGRES,
                            *_search_args(conversation_id, terms, before_id, limit), best)
    hits = sorted(((int(r[1]), float(r[2])) for r in rows if r[0] == 0),
                  key=lambda h: (-h[1], -h[0]))
    return hits, _arounds([h for h, _ in hits[:best]],
                          [(r[1], r[3], r[4], r[5], r[6], r[7]) for r in rows if r[0] == 1])


# SQLite's search in one statement (one thread hop): each term's matches before ?3
# counted newest first up to MAX_CANDIDATES + 1 (at most that many rowids of its
# doclist, whatever the history's size; the words table's vocabulary would count a
# common term's every match); the rarest terms kept while their matches fit (the
# first is always kept). Terms past the cap tie on their count, so the rarer is
# the one whose newest matches reach further back (the oldest rowid read: "guitar"
# over "evening" in "tips for learning the guitar in the evenings"; by name, the
# choice was the alphabet's, and a common term's bm25 also pays for scoring its
# every match, many thousands in a long history); other ties by name. bm25 over
# the newest MAX_CANDIDATES matches of those. Terms are quoted FTS5 strings, so no
# query syntax gets through; with no term in the conversation the query names a
# token no message has ("0x").
# Arguments: terms (JSON), conversation, before_id, cap, limit.
_SEARCH_SQLITE = """
WITH t(term) AS (SELECT value FROM json_each(?1)),
packed AS (  -- count << 40 | how far back the capped count reached (one subquery)
    SELECT term, (SELECT count(*) << 40 | CASE WHEN count(*) > ?4 THEN min(rowid) ELSE 0 END
        FROM (SELECT rowid FROM recall_fts WHERE recall_fts MATCH
            'terms : "' || ?2 || 'x' || replace(term, '"', '""') || '"'
        AND rowid < ?3 ORDER BY rowid DESC LIMIT ?4 + 1)) AS key
    FROM t
), counted AS (
    SELECT term, key >> 40 AS n, key FROM packed
), ordered AS (
    SELECT term, sum(n) OVER w AS running, row_number() OVER w AS rank
    FROM counted WHERE n > 0 WINDOW w AS (ORDER BY key, term ROWS UNBOUNDED PRECEDING)
), kept(q) AS (
    SELECT 'terms : (' || group_concat('"' || ?2 || 'x' || replace(term, '"', '""') || '"',
                                       ' OR ') || ')'
    FROM ordered WHERE rank = 1 OR running <= ?4
)
SELECT rowid, score FROM (
    SELECT rowid, -bm25(recall_fts, 1.0, 0.0) AS score FROM recall_fts
    WHERE recall_fts MATCH coalesce((SELECT q FROM kept), 'terms : "0x"') AND rowid < ?3
    ORDER BY rowid DESC LIMIT ?4
) ORDER BY score DESC, rowid DESC LIMIT ?5
"""


async def vectors_since(conn: Any, conversation_id: int, model: str, after_id: int,
                        limit: int = 1_000_000) -> list[tuple[int, bytes]]:
    """The conversation's vectors for `model` with id > after_id, oldest first."""
    if _is_sqlite(conn):
        cur = await conn.execute(
            "SELECT message_id, vector FROM recall_vectors WHERE conversation_id = ? "
            "AND model = ? AND message_id > ? ORDER BY message_id LIMIT ?",
            (conversation_id, model, after_id, limit))
        return [(int(r[0]), bytes(r[1])) for r in await cur.fetchall()]
    rows = await conn.fetch(
        "SELECT message_id, vector FROM recall_vectors WHERE conversation_id = $1 "
        "AND model = $2 AND message_id > $3 ORDER BY message_id LIMIT $4",
        conversation_id, model, after_id, limit)
    return [(int(r[0]), bytes(r[1])) for r in rows]


_AROUND_SQLITE = """
WITH h(id) AS (SELECT value FROM json_each(?1))
SELECT h.id, 0, m.id, m.role, m.content, m.created_at FROM h
    JOIN messages m ON m.id = h.id AND m.conversation_id = ?2 AND m.id < ?3
UNION ALL
SELECT h.id, -1, m.id, m.role, m.content, m.created_at FROM h
    JOIN messages m ON m.id = (SELECT max(id) FROM messages
                               WHERE conversation_id = ?2 AND id < h.id)
UNION ALL
SELECT h.id, 1, m.id, m.role, m.content, m.created_at FROM h
    JOIN messages m ON m.id = (SELECT min(id) FROM messages
                               WHERE conversation_id = ?2 AND id > h.id AND id < ?3)
"""
# PostgreSQL: a hit and the message before it in one descent of the conversation's
# index (the two newest at or below the hit: no row of its own when it is gone, and
# then its Around is left out), the one after in another. The index's own order, so
# a generic plan can't walk the primary key past other conversations' rows instead.
_AROUND_POSTGRES = """
SELECT h, m.side, m.id, m.role, m.content, m.created_at FROM unnest($1::bigint[]) h,
    LATERAL (SELECT CASE WHEN id = h THEN 0 ELSE -1 END AS side, id, role, content,
             created_at FROM messages WHERE conversation_id = $2 AND id <= h AND id < $3
             ORDER BY conversation_id DESC, id DESC LIMIT 2) m
UNION ALL
SELECT h, 1, n.id, n.role, n.content, n.created_at FROM unnest($1::bigint[]) h,
    LATERAL (SELECT id, role, content, created_at FROM messages
             WHERE conversation_id = $2 AND id > h AND id < $3
             ORDER BY conversation_id, id LIMIT 1) n
"""


async def around(conn: Any, conversation_id: int, ids: Sequence[int],
                 before_id: int) -> list[Around]:
    """Each hit with the messages before and after it in its conversation (all below
    before_id), in the order of `ids`; a hit not in the conversation is left out."""
    if not ids:
        return []
    if _is_sqlite(conn):
        cur = await conn.execute(_AROUND_SQLITE, (json.dumps(list(ids)), conversation_id,
                                                  before_id))
        rows: Sequence[Sequence[Any]] = await cur.fetchall()
    else:
        rows = await conn.fetch(_AROUND_POSTGRES, list(ids), conversation_id, before_id)
    return _arounds(ids, rows)


def prefetched(looked: frozenset[int], found: dict[int, Around],
               ids: Sequence[int]) -> list[Around] | None:
    """The neighbours read with the search (`looked` at, `found` by hit id), if they
    cover `ids`; None when the turn asks for more (meaning found other hits). A hit
    looked at but not found was deleted meanwhile: left out, as `around` would."""
    if not looked.issuperset(ids):
        return None
    return [found[i] for i in ids if i in found]


def _arounds(ids: Sequence[int], rows: Iterable[Sequence[Any]]) -> list[Around]:
    """(hit, side, id, role, content, created_at) rows as each hit's Around, in `ids`
    order; a hit without its own row (not in the conversation) is left out."""
    # Both drivers return integers already: no int() per value (up to 75 rows a turn).
    found: dict[int, dict[int, RecallMessage]] = {}
    for hit, side, mid, role, content, created in rows:
        sides = found.get(hit)
        if sides is None:
            sides = found[hit] = {}
        sides[side] = RecallMessage(mid, role, content, created)
    out = []
    for i in ids:
        sides = found.get(i)
        if sides and 0 in sides:
            out.append(Around(sides[0], sides.get(-1), sides.get(1)))
    return out


# -- backfill (python -m bot reindex)


async def newest_indexed_id(conn: Any) -> int:
    """The newest message id in the words index (0: empty); reindex resumes after it."""
    if _is_sqlite(conn):
        cur = await conn.execute("SELECT max(rowid) FROM recall_fts")
        row = await cur.fetchone()
        return int(row[0] or 0) if row else 0
    return int(await conn.fetchval("SELECT coalesce(max(message_id), 0) FROM recall_terms"))


async def messages_after(conn: Any, after_id: int, limit: int) -> list[tuple[int, int, str]]:
    """(id, conversation_id, content) of stored messages with id > after_id, oldest first."""
    if _is_sqlite(conn):
        cur = await conn.execute(
            "SELECT id, conversation_id, content FROM messages WHERE id > ? ORDER BY id "
            "LIMIT ?", (after_id, limit))
        return [(int(a), int(b), c) for a, b, c in await cur.fetchall()]
    rows = await conn.fetch(
        "SELECT id, conversation_id, content FROM messages WHERE id > $1 ORDER BY id "
        "LIMIT $2", after_id, limit)
    return [(int(a), int(b), c) for a, b, c in rows]


def _in_conversations(sqlite: bool, ids: Sequence[int] | None, n: int) -> tuple[str, list[Any]]:
    """An `AND m.conversation_id IN …` clause (placeholder number n on PostgreSQL)."""
    if ids is None:
        return "", []
    if sqlite:
        return " AND m.conversation_id IN (SELECT value FROM json_each(?))", [json.dumps(
            list(ids))]
    return f" AND m.conversation_id = ANY(${n}::bigint[])", [list(ids)]


async def unindexed_messages(conn: Any, after_id: int, limit: int,
                             conversation_ids: Sequence[int] | None = None
                             ) -> list[tuple[int, int, str]]:
    """(id, conversation_id, content) of messages with id > after_id that have no
    words-index entry, oldest first (optionally only of those conversations)."""
    if _is_sqlite(conn):
        where, extra = _in_conversations(True, conversation_ids, 0)
        cur = await conn.execute(
            "SELECT m.id, m.conversation_id, m.content FROM messages m WHERE m.id > ?"
            f"{where} AND NOT EXISTS (SELECT 1 FROM recall_fts f WHERE f.rowid = m.id)"
            " ORDER BY m.id LIMIT ?", (after_id, *extra, limit))
        return [(int(a), int(b), c) for a, b, c in await cur.fetchall()]
    where, extra = _in_conversations(False, conversation_ids, 3)
    rows = await conn.fetch(
        "SELECT m.id, m.conversation_id, m.content FROM messages m "
        "LEFT JOIN recall_terms t ON t.message_id = m.id "
        f"WHERE m.id > $1 AND t.message_id IS NULL{where} ORDER BY m.id LIMIT $2",
        after_id, limit, *extra)
    return [(int(a), int(b), c) for a, b, c in rows]


async def messages_without_vectors(conn: Any, model: str, after_id: int, limit: int,
                                   conversation_ids: Sequence[int] | None = None
                                   ) -> list[tuple[int, int, str]]:
    """(id, conversation_id, content) with no vector for `model`, id > after_id, oldest
    first: what an embedding backfill still has to do (optionally only of those
    conversations)."""
    if _is_sqlite(conn):
        where, extra = _in_conversations(True, conversation_ids, 0)
        cur = await conn.execute(
            "SELECT m.id, m.conversation_id, m.content FROM messages m "
            "LEFT JOIN recall_vectors v ON v.message_id = m.id AND v.model = ? "
            f"WHERE m.id > ? AND v.message_id IS NULL{where} ORDER BY m.id LIMIT ?",
            (model, after_id, *extra, limit))
        return [(int(a), int(b), c) for a, b, c in await cur.fetchall()]
    where, extra = _in_conversations(False, conversation_ids, 4)
    rows = await conn.fetch(
        "SELECT m.id, m.conversation_id, m.content FROM messages m "
        "LEFT JOIN recall_vectors v ON v.message_id = m.id AND v.model = $1 "
        f"WHERE m.id > $2 AND v.message_id IS NULL{where} ORDER BY m.id LIMIT $3",
        model, after_id, limit, *extra)
    return [(int(a), int(b), c) for a, b, c in rows]


async def count_missing(conn: Any, model: str | None,
                        conversation_ids: Sequence[int] | None = None) -> int:
    """How many messages lack words-index entries (model None) or a vector for `model`."""
    sqlite = _is_sqlite(conn)
    if model is None:
        missing = ("NOT EXISTS (SELECT 1 FROM recall_fts f WHERE f.rowid = m.id)" if sqlite
                   else "NOT EXISTS (SELECT 1 FROM recall_terms t WHERE t.message_id = m.id)")
        args: list[Any] = []
    else:
        missing = ("NOT EXISTS (SELECT 1 FROM recall_vectors v WHERE v.message_id = m.id"
                   f" AND v.model = {'?' if sqlite else '$1'})")
        args = [model]
    where, extra = _in_conversations(sqlite, conversation_ids, len(args) + 1)
    sql = f"SELECT count(*) FROM messages m WHERE {missing}{where}"
    if sqlite:
        cur = await conn.execute(sql, (*args, *extra))
        row = await cur.fetchone()
        return int(row[0]) if row else 0
    return int(await conn.fetchval(sql, *args, *extra))
