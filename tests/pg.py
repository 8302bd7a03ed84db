"""A fresh PostgreSQL database per test, on the local test server.

Use the `pg_url` fixture (import it into a test module, or list this module
in conftest's `pytest_plugins`). The server is 127.0.0.1:5432, user postgres,
unless PG_TEST_ADMIN_URL names another admin connection. An unreachable
server fails the test loudly: a skipped PostgreSQL suite looks green.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
START_HINT = ("start it with: pg_ctlcluster --skip-systemctl-redirect "
              "$(ls /etc/postgresql) main start")


class ServerUnreachable(RuntimeError):
    """The test PostgreSQL server cannot be reached."""


def admin_url() -> str:
    return os.environ.get("PG_TEST_ADMIN_URL", DEFAULT_ADMIN_URL)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _database_of(url: str) -> str:
    name = urlsplit(url).path.lstrip("/")
    # Only ever drop what fresh_database made.
    if not name.startswith("bot_test_") or not name.replace("_", "").isalnum():
        raise ValueError(f"refusing to drop {name!r}: not a test database")
    return name


async def admin_connection() -> asyncpg.Connection:
    url = admin_url()
    try:
        return await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        host = urlsplit(url).hostname
        raise ServerUnreachable(
            f"PostgreSQL test server at {host}:{urlsplit(url).port or 5432} cannot be used "
            f"({type(exc).__name__}: {exc}); {START_HINT}"
        ) from exc


async def admin_execute(sql: str) -> None:
    """Run one statement as the admin, on a connection of its own."""
    conn = await admin_connection()
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def fresh_database() -> str:
    """Create an empty, uniquely named database; return its URL."""
    name = f"bot_test_{os.getpid()}_{secrets.token_hex(4)}"
    await admin_execute(f'CREATE DATABASE "{name}" ENCODING \'UTF8\' TEMPLATE template0')
    return _with_database(admin_url(), name)


async def drop_database(url: str) -> None:
    """Drop a database made by `fresh_database`, ending any session still in it."""
    await admin_execute(f'DROP DATABASE IF EXISTS "{_database_of(url)}" WITH (FORCE)')


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """The URL of a fresh empty database, dropped after the test."""
    url = problem = ""
    try:
        url = await fresh_database()
    except ServerUnreachable as exc:
        problem = str(exc)
    if problem:  # failed outside the except block: one clear line, no chained traceback
        pytest.fail(problem, pytrace=False)
    try:
        yield url
    finally:
        await drop_database(url)
