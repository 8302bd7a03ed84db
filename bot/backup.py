"""`python -m bot backup PATH`: a consistent, verified copy of a SQLite database.

SQLite's online backup API copies the pages while the bot keeps running. The
copy reads inside one read transaction, so it is the database as of one
moment (every exchange acknowledged before it started is in it) and writers
are never blocked (WAL). The copy is checked with `PRAGMA integrity_check`
and by counting every table against the same moment, then moved into place.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

PAGES_PER_STEP = 1024  # pages copied per step (4 MiB at the default page size)


class BackupError(Exception):
    """The backup could not be made or did not verify; one line for the operator."""


@dataclass(frozen=True, slots=True)
class BackupResult:
    path: Path
    size: int  # bytes
    counts: dict[str, int]  # rows per table, equal in source and copy


def _tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                        " AND name NOT LIKE 'sqlite_%' ORDER BY name").fetchall()
    return [r[0] for r in rows]


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0])
            for t in _tables(conn)}


def backup_sqlite(src: str | Path, dst: str | Path, *, pages: int = PAGES_PER_STEP,
                  on_progress: Callable[[int, int], None] | None = None) -> BackupResult:
    """Copy `src` to `dst` (which must not exist) and verify it. Blocking: run it in a
    thread. `on_progress(pages_done, pages_total)` is called after each step."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise BackupError(f"no database at {src}")
    if dst.exists():
        raise BackupError(f"{dst} already exists; give a new path")
    if dst.resolve() == src.resolve():
        raise BackupError("the backup path is the database itself")
    partial = dst.with_name(dst.name + ".partial")
    partial.unlink(missing_ok=True)
    source = sqlite3.connect(src.resolve().as_uri() + "?mode=ro", uri=True,
                             isolation_level=None, timeout=30)
    try:
        # One read transaction: the counts and every page come from one snapshot.
        source.execute("BEGIN")
        want = _counts(source)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # owner only
        os.close(fd)
        target = sqlite3.connect(partial, isolation_level=None)
        try:
            def step(_status: int, remaining: int, total: int) -> None:
                if on_progress is not None:
                    on_progress(total - remaining, total)

            source.backup(target, pages=pages, progress=step)
            source.execute("COMMIT")
            check = [r[0] for r in target.execute("PRAGMA integrity_check").fetchall()]
            if check != ["ok"]:
                raise BackupError(f"the copy fails integrity_check: {'; '.join(check[:3])}")
            got = _counts(target)
        finally:
            target.close()
        if got != want:
            raise BackupError(f"row counts differ after the copy: {want} → {got}")
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, dst)
    except sqlite3.Error as exc:
        raise BackupError(f"backup failed: {exc}") from None
    finally:
        source.close()
        partial.unlink(missing_ok=True)
    return BackupResult(dst, dst.stat().st_size, want)


def without_password(url: str) -> str:
    """The URL with no password in it (pg_dump then asks, or reads ~/.pgpass)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}@{hostport}"
    query = "&".join(q for q in parts.query.split("&")
                     if q and not unquote(q).lower().startswith("password="))
    return urlunsplit(("postgresql", netloc, parts.path, query, parts.fragment))


def pg_dump_command(url: str, path: str) -> str:
    """The command that backs up a PostgreSQL database, password left out."""
    return f"pg_dump --format=custom --file='{path}' '{without_password(url)}'"


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{n} bytes"
