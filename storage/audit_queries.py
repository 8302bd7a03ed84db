"""The audit log's operator queries, built per dialect ('sqlite' or 'postgres').

Each function returns (sql, parameters) for the backend to run as it is:
SQLite takes `?` placeholders, PostgreSQL `$1`, `$2`… Both stores call these,
so a filter means the same on either backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from storage.base import AUDIT_COLUMNS

Dialect = Literal["sqlite", "postgres"]

# Records deleted per statement by retention: each delete holds the write
# lock for milliseconds, so turns in flight never wait long behind it.
RETENTION_BATCH = 2000


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What `logs` narrows the audit log to; None means any."""

    user: str | None = None  # platform:user_id
    since: str | None = None  # ISO timestamp, inclusive
    status: str | None = None
    model: str | None = None
    kind: str | None = None
    grep: str | None = None  # in the input or the reply, case-insensitive


class _Params:
    """Placeholders in the dialect's style, numbered in the order they are used."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return "?" if self.dialect == "sqlite" else f"${len(self.values)}"


def _quote(dialect: Dialect, name: str) -> str:
    return name if dialect == "sqlite" else f'"{name}"'


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _where(f: AuditFilter, p: _Params) -> list[str]:
    clauses: list[str] = []
    if f.user:
        platform, _, user_id = f.user.partition(":")
        clauses.append(f"platform = {p(platform)} AND user_id = {p(user_id)}")
    if f.since:
        # ISO 8601 UTC strings of one width sort as the times they name. The id
        # bound (from the audit_timestamp index) is exact, and lets the newest-first
        # scan by id stop where the time range starts instead of at the table's start.
        ts = _quote(p.dialect, "timestamp")
        clauses.append(f"id >= (SELECT min(+id) FROM audit WHERE {ts} >= {p(f.since)})"
                       f" AND {ts} >= {p(f.since)}")
    if f.status:
        clauses.append(f"status = {p(f.status)}")
    if f.model:
        clauses.append(f"model = {p(f.model)}")
    if f.kind:
        clauses.append(f"kind = {p(f.kind)}")
    if f.grep:
        # SQLite's LIKE folds ASCII case; PostgreSQL needs ILIKE for the same.
        like = "LIKE" if p.dialect == "sqlite" else "ILIKE"
        pattern = _like_pattern(f.grep)
        clauses.append(f"(user_input {like} {p(pattern)} ESCAPE '\\'"
                       f" OR model_response {like} {p(pattern)} ESCAPE '\\')")
    return clauses


def _columns(dialect: Dialect) -> str:
    return ", ".join(["id", *(_quote(dialect, c) for c in AUDIT_COLUMNS)])


def audit_log(dialect: Dialect, f: AuditFilter, limit: int) -> tuple[str, list[Any]]:
    """The newest `limit` matching records, newest first (the caller reverses them)."""
    p = _Params(dialect)
    clauses = _where(f, p)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT {_columns(dialect)} FROM audit{where} ORDER BY id DESC LIMIT {p(limit)}"
    return sql, p.values


def audit_after(dialect: Dialect, f: AuditFilter, after_id: int,
                limit: int) -> tuple[str, list[Any]]:
    """Matching records with id > after_id, oldest first (for `logs --follow`)."""
    p = _Params(dialect)
    clauses = [f"id > {p(after_id)}", *_where(f, p)]
    sql = (f"SELECT {_columns(dialect)} FROM audit WHERE {' AND '.join(clauses)}"
           f" ORDER BY id LIMIT {p(limit)}")
    return sql, p.values


def last_audit_id(dialect: Dialect) -> tuple[str, list[Any]]:
    return "SELECT coalesce(max(id), 0) FROM audit", []


def delete_older_than(dialect: Dialect, cutoff: str,
                      batch: int = RETENTION_BATCH) -> tuple[str, list[Any]]:
    """Delete one batch of records older than `cutoff` (served by audit_timestamp)."""
    p = _Params(dialect)
    ts = _quote(dialect, "timestamp")
    sql = (f"DELETE FROM audit WHERE id IN (SELECT id FROM audit"
           f" WHERE {ts} < {p(cutoff)} ORDER BY {ts} LIMIT {p(batch)})")
    return sql, p.values


def oldest_timestamp(dialect: Dialect) -> tuple[str, list[Any]]:
    """The oldest record's time and how many records there are."""
    return f"SELECT min({_quote(dialect, 'timestamp')}), count(*) FROM audit", []


def stats(dialect: Dialect, since: str | None = None) -> tuple[str, list[Any]]:
    """Per provider and model: exchanges, errors and tokens; chat records only,
    refusals left out (as `stats` always counted)."""
    p = _Params(dialect)
    sql = f"""
SELECT provider, model, count(*) AS exchanges,
       sum(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS errors,
       coalesce(sum(prompt_tokens), 0) AS tokens_in,
       coalesce(sum(completion_tokens), 0) AS tokens_out
FROM audit WHERE {_chat_records(dialect, p, since)}
GROUP BY provider, model ORDER BY provider, model
"""
    return sql, p.values


def stats_histogram(dialect: Dialect, since: str | None = None) -> tuple[str, list[Any]]:
    """How many ok replies took each whole millisecond, per provider, model and metric
    ('latency' or 'ttft'), smallest first: the percentiles are read off it exactly
    to the millisecond, without sorting every record (bot.stats)."""
    p = _Params(dialect)
    parts = []
    for metric, column in (("latency", "response_time"), ("ttft", "first_token_time")):
        parts.append(
            f"SELECT provider, model, '{metric}' AS metric,"
            f" CAST(round({column} * 1000) AS BIGINT) AS ms, count(*) AS n"
            f" FROM audit WHERE {_chat_records(dialect, p, since)} AND status = 'ok'"
            f" AND {column} IS NOT NULL GROUP BY provider, model, ms")
    sql = " UNION ALL ".join(parts) + " ORDER BY provider, model, metric, ms"
    return sql, p.values


def _chat_records(dialect: Dialect, p: _Params, since: str | None) -> str:
    where = "kind = 'chat' AND status != 'rejected'"
    if since:
        where += f" AND {_quote(dialect, 'timestamp')} >= {p(since)}"
    return where
