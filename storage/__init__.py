"""Where memory and the audit log live: SQLite by default, PostgreSQL to scale out."""

from __future__ import annotations

from bot.records import StorageError
from bot.store import Store


def open_store(url: str, *, pool_size: int = 10, sqlite_synchronous: str = "NORMAL",
               read_only: bool = False) -> Store:
    """A store for DATABASE_URL; call `await store.open()` before use.

    `read_only`: for commands that only read (logs, stats): no migrations, no writes.
    """
    if url.startswith("sqlite:///"):
        from storage.sqlite_store import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///"), read_only=read_only,
                           synchronous=sqlite_synchronous)  # type: ignore[arg-type]
    if url.startswith(("postgresql://", "postgres://")):
        from storage.postgres_store import PostgresStore

        return PostgresStore(url, pool_size=pool_size, read_only=read_only)
    raise StorageError(f"unsupported DATABASE_URL scheme: {url.split(':', 1)[0]}")


__all__ = ["open_store"]
