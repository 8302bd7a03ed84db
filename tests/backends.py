"""Run a test module against both storage backends.

Import `db_url_both_backends` into a module (`# noqa: F401`): its fixture is
named `db_url`, so it overrides conftest's SQLite-only one there. The
PostgreSQL side gets a fresh schema per test (creating a whole database
costs half a second; a schema, milliseconds), dropped afterwards.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.pg import admin_execute, admin_url


@pytest.fixture(params=["sqlite", "postgres"], name="db_url")
async def db_url_both_backends(request: pytest.FixtureRequest,
                               tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'bot.db'}"
        return
    schema = f"bot_test_{os.getpid()}_{secrets.token_hex(4)}"
    await admin_execute(f'CREATE SCHEMA "{schema}"')
    try:
        # asyncpg passes unknown URL parameters on as server settings. Commits need not
        # wait for the WAL on disk: the server is not killed here, and every commit's fsync
        # on this shared disk was a third of these tests' time.
        yield f"{admin_url()}?search_path={schema}&synchronous_commit=off"
    finally:
        await admin_execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
