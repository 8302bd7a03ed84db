"""Every SQL statement the stores run, written once, and the decoding of their rows.

Statements are written with `?` placeholders; `Queries.for_dialect` renders
them for a backend (`$1, $2…` on PostgreSQL). A new query: one field here,
then `self.q.<field>` in the store. They differ by dialect only where the SQL
must: RETURNING vs the cursor's lastrowid on SQLite's batched inserts, and row
locks (PostgreSQL; SQLite's single writer already serialises).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from bot.records import AUDIT_COLUMNS, Note, StorageError, StoredMessage, Summary, TurnContext
from bot.store import TABLES
from storage.dialect import POSTGRES, SQLITE, Dialect

# Every copied table's columns in table order, with the Python type they hold
# (a new table or column: here too; tests compare this with both schemas).
# copy-db column names become SQL identifiers, so they are checked against this.
_AUDIT_KINDS: dict[str, type] = {
    "timestamp": str, "platform": str, "user_id": str, "chat_id": str, "conversation": str,
    "provider": str, "model": str, "user_input": str, "model_response": str, "status": str,
    "error": str, "response_time": float, "first_token_time": float, "prompt_tokens": int,
    "completion_tokens": int, "history_messages": int, "kind": str, "summary_used": bool,
    "recalled": int, "persona": str, "images": int, "est_prompt_tokens": int,
    "est_completion_tokens": int,
}
COLUMNS: dict[str, dict[str, type]] = {
    "conversations": {"id": int, "key": str, "platform": str, "user_id": str, "place": str,
                      "created_at": str},
    "messages": {"id": int, "conversation_id": int, "role": str, "content": str,
                 "created_at": str},
    "summaries": {"conversation_id": int, "text": str, "upto_id": int, "updated_at": str},
    "user_settings": {"platform": str, "user_id": str, "model": str, "updated_at": str,
                      "language": str},
    "audit": {"id": int, **{c: _AUDIT_KINDS[c] for c in AUDIT_COLUMNS}},
    # What was learned per model (its window, the token correction) moves with the data.
    "model_info": {"model": str, "context_length": int, "learned_window": int,
                   "token_factor": float, "cjk_factor": float, "updated_at": str},
    "notes": {"id": int, "conversation_id": int, "text": str, "created_at": str},
    "conversation_settings": {"conversation_key": str, "platform": str, "user_id": str,
                              "persona": str, "updated_at": str},
    "place_settings": {"platform": str, "place_id": str, "persona": str, "updated_at": str},
}
PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "conversations": ("id",),
    "messages": ("id",),
    "summaries": ("conversation_id",),
    "user_settings": ("platform", "user_id"),
    "audit": ("id",),
    "model_info": ("model",),
    "notes": ("id",),
    "conversation_settings": ("conversation_key",),
    "place_settings": ("platform", "place_id"),
}
SERIAL_TABLES = ("conversations", "messages", "audit", "notes")  # their `id` never repeats
# Seconds an erasure is remembered: far longer than any turn or summary pass
# that could have read the user's data before it.
ERASURE_KEEP = 86_400.0


def quoted(name: str) -> str:
    """A quoted identifier (several columns are named like SQL types)."""
    return '"' + name.replace('"', '""') + '"'


_AUDIT_COLS = ", ".join(quoted(c) for c in AUDIT_COLUMNS)
AUDIT_ROW = f"({', '.join('?' * len(AUDIT_COLUMNS))})"
MESSAGE_ROW = "(?, ?, ?, ?)"
# Rows a user leaves behind, per table, in the order `forget` deletes them.
_OF_USER = "platform = ? AND user_id = ?"
_OF_USER_CONVERSATIONS = f"conversation_id IN (SELECT id FROM conversations WHERE {_OF_USER})"
_FORGET = {
    "notes": _OF_USER_CONVERSATIONS,
    "messages": f"conversation_id IN (SELECT id FROM conversations WHERE {_OF_USER})",
    "summaries": f"conversation_id IN (SELECT id FROM conversations WHERE {_OF_USER})",
    "conversations": _OF_USER,
    "user_settings": _OF_USER,
    "audit": _OF_USER,
    "conversation_settings": _OF_USER,
}


@dataclass(frozen=True, slots=True)
class Queries:
    """The statements, in one dialect (build with `for_dialect`)."""

    conversation_by_key: str = "SELECT id FROM conversations WHERE key = ?"
    conversation_insert: str = (
        "INSERT INTO conversations (key, platform, user_id, place, created_at)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING RETURNING id")
    # Served by messages_conversation_id (conversation_id, id), scanned backwards.
    recent_messages: str = (
        "SELECT id, role, content FROM messages WHERE conversation_id = ? AND id > ?"
        " ORDER BY id DESC LIMIT ?")
    messages_range: str = (
        "SELECT id, role, content FROM messages WHERE conversation_id = ?"
        " AND id > ? AND id <= ? ORDER BY id LIMIT ?")
    count_messages: str = "SELECT count(*) FROM messages WHERE conversation_id = ?"
    # The user's model and language picks (the language in `role`), the
    # summary, and the newest messages after it, in one query. Arguments:
    # conversation, with_summary, conversation, limit, platform, user_id.
    turn_context: str = """
WITH s AS (
    SELECT text, upto_id, updated_at FROM summaries WHERE conversation_id = ? AND ?
)
SELECT * FROM (
    SELECT 0 AS kind, id, role, content, CAST(NULL AS TEXT) AS updated FROM messages
    WHERE conversation_id = ? AND id > coalesce((SELECT upto_id FROM s), 0)
    ORDER BY id DESC LIMIT ?
) AS recent
UNION ALL SELECT 1, upto_id, NULL, text, updated_at FROM s
UNION ALL SELECT 2, 0, language, model, NULL FROM user_settings
WHERE platform = ? AND user_id = ?
"""
    # turn_context with only the messages' ids, read from the (conversation_id, id)
    # index alone and joined into one text (one row, not one per message; in no
    # particular order): the SQLite store fetches just the rows it has not cached
    # (storage/history_cache.py). Rows: (0, 0, NULL, ids, NULL), then turn_context's
    # kind 1 and 2 rows. Same arguments.
    turn_context_ids: str = """
WITH s AS (
    SELECT text, upto_id, updated_at FROM summaries WHERE conversation_id = ? AND ?
)
SELECT 0 AS kind, 0 AS id, CAST(NULL AS TEXT) AS role, (SELECT group_concat(id) FROM (
    SELECT id FROM messages
    WHERE conversation_id = ? AND id > coalesce((SELECT upto_id FROM s), 0)
    ORDER BY id DESC LIMIT ?)) AS content, CAST(NULL AS TEXT) AS updated
UNION ALL SELECT 1, upto_id, NULL, text, updated_at FROM s
UNION ALL SELECT 2, 0, language, model, NULL FROM user_settings
WHERE platform = ? AND user_id = ?
"""
    message_insert_head: str = (
        "INSERT INTO messages (conversation_id, role, content, created_at) VALUES ")
    message_insert: str = message_insert_head + MESSAGE_ROW
    message_pair_insert: str = message_insert_head + MESSAGE_ROW + ", " + MESSAGE_ROW + \
        " RETURNING id"
    audit_insert_head: str = f"INSERT INTO audit ({_AUDIT_COLS}) VALUES "
    audit_insert: str = audit_insert_head + AUDIT_ROW + " RETURNING id"
    delete_messages: str = "DELETE FROM messages WHERE conversation_id = ?"
    delete_summary: str = "DELETE FROM summaries WHERE conversation_id = ?"
    summary: str = "SELECT text, upto_id, updated_at FROM summaries WHERE conversation_id = ?"
    # Written only if message `upto_id` still exists: a /reset meanwhile wins.
    # Arguments: conversation, text, upto_id, now, upto_id, conversation.
    save_summary: str = (
        "INSERT INTO summaries (conversation_id, text, upto_id, updated_at)"
        " SELECT CAST(? AS BIGINT), CAST(? AS TEXT), CAST(? AS BIGINT), CAST(? AS TEXT)"
        " WHERE EXISTS (SELECT 1 FROM messages WHERE id = ? AND conversation_id = ?)"
        " ON CONFLICT (conversation_id) DO UPDATE SET text = excluded.text,"
        " upto_id = excluded.upto_id, updated_at = excluded.updated_at"
        # A slower summariser (another process) never moves a newer summary back.
        " WHERE summaries.upto_id <= excluded.upto_id")
    # Erasures since the oldest turn of a batch (usually none: a cheap index probe).
    erasures_since: str = (
        "SELECT platform, user_id, erased_at FROM erasures WHERE erased_at >= ?")
    record_erasure: str = (
        "INSERT INTO erasures (platform, user_id, erased_at) VALUES (?, ?, ?)"
        " ON CONFLICT (platform, user_id) DO UPDATE SET erased_at = excluded.erased_at")
    prune_erasures: str = "DELETE FROM erasures WHERE erased_at < ?"
    user_model: str = "SELECT model FROM user_settings WHERE platform = ? AND user_id = ?"
    set_user_model: str = (
        "INSERT INTO user_settings (platform, user_id, model, updated_at)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (platform, user_id)"
        " DO UPDATE SET model = excluded.model, updated_at = excluded.updated_at")
    user_language: str = "SELECT language FROM user_settings WHERE platform = ? AND user_id = ?"
    set_user_language: str = (
        "INSERT INTO user_settings (platform, user_id, language, updated_at)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (platform, user_id)"
        " DO UPDATE SET language = excluded.language, updated_at = excluded.updated_at")
    # One round trip for a turn's persona: the conversation's pick, the place's default.
    personas_of: str = (
        "SELECT (SELECT persona FROM conversation_settings WHERE conversation_key = ?),"
        " (SELECT persona FROM place_settings WHERE platform = ? AND place_id = ?)")
    set_conversation_persona: str = (
        "INSERT INTO conversation_settings (conversation_key, platform, user_id, persona,"
        " updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (conversation_key)"
        " DO UPDATE SET persona = excluded.persona, updated_at = excluded.updated_at")
    clear_conversation_persona: str = (
        "DELETE FROM conversation_settings WHERE conversation_key = ?")
    set_place_persona: str = (
        "INSERT INTO place_settings (platform, place_id, persona, updated_at)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (platform, place_id)"
        " DO UPDATE SET persona = excluded.persona, updated_at = excluded.updated_at")
    clear_place_persona: str = "DELETE FROM place_settings WHERE platform = ? AND place_id = ?"
    audit_log: str = f"SELECT id, {_AUDIT_COLS} FROM audit ORDER BY id DESC LIMIT ?"
    audit_log_of_user: str = (
        f"SELECT id, {_AUDIT_COLS} FROM audit WHERE {_OF_USER} ORDER BY id DESC LIMIT ?")
    audit_for_stats: str = (
        "SELECT provider, model, status, response_time, first_token_time, prompt_tokens,"
        " completion_tokens, est_prompt_tokens, est_completion_tokens"
        " FROM audit WHERE kind = 'chat' AND status != 'rejected'")
    # What the bot learned per model (a cache: copy-db leaves it out).
    model_info: str = (
        "SELECT context_length, learned_window, token_factor, cjk_factor"
        " FROM model_info WHERE model = ?")
    # Model time per kind (chat, summary) for `stats`.
    model_time: str = (
        "SELECT provider, model, kind, count(*) AS calls, coalesce(sum(response_time), 0)"
        " AS seconds FROM audit WHERE status != 'rejected' GROUP BY provider, model, kind")
    # Row locks, PostgreSQL only: a summary being saved waits for a /reset or
    # forget in flight (they lock first, forget in id order so two cannot
    # deadlock).
    lock_conversation: str = "SELECT 1 FROM conversations WHERE id = ? FOR UPDATE"
    share_conversation: str = "SELECT 1 FROM conversations WHERE id = ? FOR SHARE"
    lock_user_conversations: str = (
        f"SELECT 1 FROM conversations WHERE {_OF_USER} ORDER BY id FOR UPDATE")
    # Notes (/remember), numbered in id order.
    notes: str = "SELECT id, text, created_at FROM notes WHERE conversation_id = ? ORDER BY id"
    note_insert: str = ("INSERT INTO notes (conversation_id, text, created_at) VALUES (?, ?, ?)"
                        " RETURNING id")
    note_delete: str = "DELETE FROM notes WHERE id = ? AND conversation_id = ?"
    delete_notes: str = "DELETE FROM notes WHERE conversation_id = ?"
    user_conversations: str = "SELECT id FROM conversations WHERE platform = ? AND user_id = ?"
    insert_migration: str = "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)"
    migration_done: str = "SELECT 1 FROM _migrations WHERE name = ?"
    applied_migrations: str = "SELECT name FROM _migrations ORDER BY name"

    @classmethod
    def for_dialect(cls, d: Dialect) -> Queries:
        base = cls()
        return replace(base, **{f.name: d.sql(getattr(base, f.name)) for f in fields(cls)})


SQLITE_QUERIES = Queries.for_dialect(SQLITE)
POSTGRES_QUERIES = Queries.for_dialect(POSTGRES)


# SQLite's words index has no foreign key (an FTS5 table): its rows go first, by
# rowid (the message id). PostgreSQL's recall rows and both backends' vectors
# go with their messages (ON DELETE CASCADE).
_FORGET_FTS = (f"DELETE FROM recall_fts WHERE rowid IN (SELECT id FROM messages WHERE"
               f" {_OF_USER_CONVERSATIONS})")


def forget(d: Dialect) -> list[tuple[str, str]]:
    """(table, DELETE) for every row a user leaves; arguments: platform, user_id."""
    steps = [("recall_fts", _FORGET_FTS)] if d.is_sqlite else []
    return [*steps, *((t, d.sql(f"DELETE FROM {t} WHERE {where}")) for t, where in
                      _FORGET.items())]


def erasure_id(platform: str, user_id: str) -> str:
    """What an erasure row keeps of the user: a one-way hash, never the id itself
    (after `forget`, nothing of the user's may remain readable)."""
    return hashlib.sha256(f"erased:{platform}:{user_id}".encode()).hexdigest()


def erased(rows: Iterable[Sequence[Any]], platform: str, user_id: str, since: str) -> bool:
    """Whether `erasures_since` rows erase this user at or after `since`."""
    key = erasure_id(platform, user_id)
    return any(r[0] == platform and r[1] == key and r[2] >= since for r in rows)


def erasure_horizon() -> str:
    """Erasures older than this are pruned (as the ISO strings compare)."""
    then = datetime.now(UTC) - timedelta(seconds=ERASURE_KEEP)
    return then.isoformat(timespec="microseconds").replace("+00:00", "Z")


def count_rows(table: str) -> str:
    return f"SELECT count(*) FROM {_known(table)}"


def export_batch(d: Dialect, table: str, first: bool) -> str:
    """One batch of a table in primary-key order: keyset pagination, an index range
    scan however deep. Arguments: (unless first) the last key, then the limit."""
    cols = ", ".join(quoted(c) for c in COLUMNS[_known(table)])
    pk = ", ".join(quoted(c) for c in PRIMARY_KEYS[table])
    after = "" if first else \
        f" WHERE ({pk}) > ({', '.join('?' * len(PRIMARY_KEYS[table]))})"
    return d.sql(f"SELECT {cols} FROM {table}{after} ORDER BY {pk} LIMIT ?")


def import_columns(table: str, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The columns of rows to copy into `table`, checked against the schema."""
    kinds = COLUMNS[_known(table)]
    cols = list(rows[0]) if rows else []
    unknown = [c for c in cols if c not in kinds]
    if unknown:
        raise StorageError(f"table {table} has no column(s) {', '.join(unknown)}")
    if any(r.keys() != rows[0].keys() for r in rows):
        raise StorageError(f"rows of {table} differ in their columns")
    return cols


def _known(table: str) -> str:
    if table not in TABLES:
        raise StorageError(f"unknown table {table}")
    return table


# -- rows → records


def messages(rows: Iterable[Sequence[Any]]) -> list[StoredMessage]:
    return [StoredMessage(int(r[0]), r[1], r[2]) for r in rows]


def notes(rows: Iterable[Sequence[Any]]) -> list[Note]:
    """`notes` rows (id, text, created_at) as Notes, in their order."""
    return [Note(int(r[0]), r[1], r[2]) for r in rows]


def summary(row: Sequence[Any] | None) -> Summary | None:
    return Summary(row[0], int(row[1]), row[2]) if row else None


def turn_context(rows: Iterable[Sequence[Any]]) -> TurnContext:
    choice: str | None = None
    language: str | None = None
    found: Summary | None = None
    history: list[StoredMessage] = []
    for kind, ident, role, content, updated in rows:
        if kind == 0:
            history.append(StoredMessage(int(ident), role, content))
        elif kind == 1:
            found = Summary(content, int(ident), updated)
        else:
            choice, language = content, role
    history.reverse()
    return TurnContext(choice, found, history, language)


def window_ids(rows: Sequence[Sequence[Any]]) -> list[int]:
    """The message ids of `turn_context_ids` rows, oldest first."""
    joined = next((r[3] for r in rows if r[0] == 0), None)
    return sorted(map(int, joined.split(","))) if joined else []


def turn_context_by_ids(rows: Iterable[Sequence[Any]],
                        history: list[StoredMessage]) -> TurnContext:
    """A TurnContext from `turn_context_ids` rows and the window's messages."""
    choice: str | None = None
    language: str | None = None
    found: Summary | None = None
    for kind, ident, role, content, updated in rows:
        if kind == 1:
            found = Summary(content, int(ident), updated)
        elif kind == 2:
            choice, language = content, role
    return TurnContext(choice, found, history, language)


def audit_row(row: Any) -> dict[str, Any]:
    """An audit row (sqlite3.Row or asyncpg.Record) as `logs` shows it."""
    d = {k: row[k] for k in row.keys()}
    d["summary_used"] = bool(d["summary_used"])  # SQLite keeps 0/1
    return d


def export_row(row: Any) -> dict[str, Any]:
    # Rows leave as SQLite's do (summary_used 0/1), so exports compare equal.
    return {k: int(v) if isinstance(v := row[k], bool) else v for k in row.keys()}


MODEL_INFO_FIELDS = ("context_length", "learned_window", "token_factor", "cjk_factor")


def save_model_info(d: Dialect, fields: list[str]) -> str:
    """The upsert of the named model_info fields (others are kept)."""
    names = ", ".join(["model", *fields, "updated_at"])
    sets = ", ".join(f"{c} = excluded.{c}" for c in [*fields, "updated_at"])
    marks = ", ".join("?" * (len(fields) + 2))
    return d.sql(f"INSERT INTO model_info ({names}) VALUES ({marks})"
                 f" ON CONFLICT (model) DO UPDATE SET {sets}")
