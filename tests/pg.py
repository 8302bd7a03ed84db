"""A fresh PostgreSQL database per test, on the local test server.

Use the `pg_url` fixture (import it into a test module, or list this module
in conftest's `pytest_plugins`). The server is 127.0.0.1:5432, user postgres,
unless PG_TEST_ADMIN_URL names another admin connection. An unreachable
server fails the test loudly: a skipped PostgreSQL suite looks green.

`DROP DATABASE` makes the server checkpoint (about half a second each, more on
a busy machine), so a test's database is emptied after it instead (its
sessions ended, its schema dropped) and handed to the next test of the same
worker as new; the worker drops them all when it ends.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
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


async def empty_database(url: str) -> None:
    """Make a used test database as good as new: no session left in it, nothing stored."""
    name = _database_of(url)
    admin = await admin_connection()
    try:
        # As DROP DATABASE ... WITH (FORCE) does: end every session (and so its locks),
        # waiting (at most 5 s each) until it is gone.
        ended = await admin.fetch(
            "SELECT pg_terminate_backend(pid, 5000) AS gone FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'", name)
        if not all(row["gone"] for row in ended):
            raise RuntimeError(f"a session of {name} outlived pg_terminate_backend")
    finally:
        await admin.close()
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def spare_databases() -> Iterator[list[str]]:
    """Emptied databases this worker hands out again; dropped when the worker ends."""
    spare: list[str] = []
    yield spare

    async def drop_all() -> None:
        for url in spare:
            await drop_database(url)

    if spare:
        asyncio.run(drop_all())


@pytest.fixture
async def pg_url(spare_databases: list[str]) -> AsyncIterator[str]:
    """The URL of an empty database of its own, emptied (or dropped) after the test."""
    url = problem = ""
    try:
        url = spare_databases.pop() if spare_databases else await fresh_database()
    except ServerUnreachable as exc:
        problem = str(exc)
    if problem:  # failed outside the except block: one clear line, no chained traceback
        pytest.fail(problem, pytrace=False)
    try:
        yield url
    finally:
        try:
            await empty_database(url)
        except BaseException:
            await drop_database(url)  # not reusable: a new one for the next test
            raise
        spare_databases.append(url)
