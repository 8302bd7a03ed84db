"""The audit log's operator queries (the filtered log, retention, stats) per dialect.

Each function returns (sql, parameters), the SQL written with `?` placeholders
and rendered for the backend by storage.dialect; storage.sql_store runs them, so
a filter means the same on either backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.records import AUDIT_COLUMNS
from storage.dialect import Dialect

# Records deleted per statement by retention: each delete holds the write
# lock for milliseconds, so turns in flight never wait long behind it.
RETENTION_BATCH = 2000

_TS = '"timestamp"'  # a quoted identifier in both dialects


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What `logs` narrows the audit log to; None means any."""

    user: str | None = None  # platform:user_id
    since: str | None = None  # ISO timestamp, inclusive
    status: str | None = None
    model: str | None = None
    kind: str | None = None
    grep: str | None = None  # in the input or the reply, case-insensitive


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _where(d: Dialect, f: AuditFilter, values: list[Any]) -> list[str]:
    clauses: list[str] = []
    if f.user:
        platform, _, user_id = f.user.partition(":")
        clauses.append("platform = ? AND user_id = ?")
        values += [platform, user_id]
    if f.since:
        # ISO 8601 UTC strings of one width sort as the times they name. The id
        # bound (from the audit_timestamp index) is exact, and lets the newest-first
        # scan by id stop where the time range starts instead of at the table's start.
        clauses.append(f"id >= (SELECT min(+id) FROM audit WHERE {_TS} >= ?) AND {_TS} >= ?")
        values += [f.since, f.since]
    for column in ("status", "model", "kind"):
        if (value := getattr(f, column)) is not None:
            clauses.append(f"{column} = ?")
            values.append(value)
    if f.grep:
        # SQLite's LIKE folds ASCII case; PostgreSQL needs ILIKE for the same.
        like = "LIKE" if d.is_sqlite else "ILIKE"
        pattern = _like_pattern(f.grep)
        clauses.append(f"(user_input {like} ? ESCAPE '\\' OR model_response {like} ? ESCAPE '\\')")
        values += [pattern, pattern]
    return clauses


def _columns() -> str:
    return ", ".join(["id", *(f'"{c}"' for c in AUDIT_COLUMNS)])


def audit_log(d: Dialect, f: AuditFilter, limit: int) -> tuple[str, list[Any]]:
    """The newest `limit` matching records, newest first (the caller reverses them)."""
    values: list[Any] = []
    clauses = _where(d, f, values)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT {_columns()} FROM audit{where} ORDER BY id DESC LIMIT ?"
    return d.sql(sql), [*values, max(0, limit)]


def audit_after(d: Dialect, f: AuditFilter, after_id: int,
                limit: int) -> tuple[str, list[Any]]:
    """Matching records with id > after_id, oldest first (for `logs --follow`)."""
    values: list[Any] = [after_id]
    clauses = ["id > ?", *_where(d, f, values)]
    sql = f"SELECT {_columns()} FROM audit WHERE {' AND '.join(clauses)} ORDER BY id LIMIT ?"
    return d.sql(sql), [*values, limit]


def last_audit_id(d: Dialect) -> tuple[str, list[Any]]:
    return "SELECT coalesce(max(id), 0) FROM audit", []


def delete_older_than(d: Dialect, cutoff: str,
                      batch: int = RETENTION_BATCH) -> tuple[str, list[Any]]:
    """Delete one batch of records older than `cutoff` (served by audit_timestamp);
    the ids deleted come back, so both backends count alike."""
    sql = (f"DELETE FROM audit WHERE id IN (SELECT id FROM audit"
           f" WHERE {_TS} < ? ORDER BY {_TS} LIMIT ?) RETURNING id")
    return d.sql(sql), [cutoff, batch]


def oldest_timestamp(d: Dialect) -> tuple[str, list[Any]]:
    """The oldest record's time and how many records there are."""
    return f"SELECT min({_TS}), count(*) FROM audit", []


def stats(d: Dialect, since: str | None = None) -> tuple[str, list[Any]]:
    """Per provider and model: exchanges, errors and tokens (NULL where no record had a
    count: unknown, not 0; the bot's estimates beside); chat records only, refusals
    left out (as `stats` always counted)."""
    where, values = _chat_records(since)
    sql = f"""
SELECT provider, model, count(*) AS exchanges,
       sum(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS errors,
       sum(prompt_tokens) AS tokens_in,
       sum(completion_tokens) AS tokens_out,
       sum(CASE WHEN prompt_tokens IS NULL THEN 1 ELSE 0 END) AS tokens_unknown,
       sum(CASE WHEN prompt_tokens IS NULL THEN est_prompt_tokens END) AS est_tokens_in,
       sum(CASE WHEN completion_tokens IS NULL THEN est_completion_tokens END)
           AS est_tokens_out
FROM audit WHERE {where}
GROUP BY provider, model ORDER BY provider, model
"""
    return d.sql(sql), values


def stats_histogram(d: Dialect, since: str | None = None) -> tuple[str, list[Any]]:
    """How many ok replies took each whole millisecond, per provider, model and metric
    ('latency' or 'ttft'), smallest first: the percentiles are read off it exactly
    to the millisecond, without sorting every record (bot.stats)."""
    parts, values = [], []
    for metric, column in (("latency", "response_time"), ("ttft", "first_token_time")):
        where, part_values = _chat_records(since)
        parts.append(
            f"SELECT provider, model, '{metric}' AS metric,"
            f" CAST(round({column} * 1000) AS BIGINT) AS ms, count(*) AS n"
            f" FROM audit WHERE {where} AND status = 'ok'"
            f" AND {column} IS NOT NULL GROUP BY provider, model, ms")
        values += part_values
    sql = " UNION ALL ".join(parts) + " ORDER BY provider, model, metric, ms"
    return d.sql(sql), values


def _chat_records(since: str | None) -> tuple[str, list[Any]]:
    where = "kind = 'chat' AND status != 'rejected'"
    if since:
        return where + f" AND {_TS} >= ?", [since]
    return where, []
