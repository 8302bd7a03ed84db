"""SQLite faults: the file deleted or replaced under the bot, a foreign database,
group commit while another process holds the write lock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.app import open_service
from bot.records import AuditRecord, ConversationRef, StorageError
from storage.sqlite_store import SQLiteStore
from tests.conftest import SettingsFactory, ask
from tests.fakes.model_server import ModelServer

REF = ConversationRef("telegram:1@dm", "telegram", "1", "dm")


def tables(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def foreign_database(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        db.execute("INSERT INTO invoices VALUES (1, 9.5)")
        db.commit()


@pytest.mark.parametrize("fault", ["deleted", "replaced"])
async def test_database_file_deleted_or_replaced_stops_turns(
    fault: str, make_settings: SettingsFactory, tmp_path: Path, model_server: ModelServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "data" / "bot.db"
    settings = make_settings(DATABASE_URL=f"sqlite:///{path}")
    async with open_service(settings) as svc:
        assert isinstance(svc.store, SQLiteStore)
        # Every turn checks, within its own reads and writes (no once-a-second lag).
        assert await ask(svc, "remember me") == "You said: remember me"
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")
        if fault == "replaced":
            foreign_database(path)
        calls = len(model_server.requests)
        with caplog.at_level(logging.ERROR):
            first = await ask(svc, "are you there?")
            second = await ask(svc, "hello?")
            reset = await ask(svc, "/reset")
    for said in (first, second, reset):
        assert "memory is unavailable" in said and "restart" in said
    lines = [r for r in caplog.records if "was " + ("deleted" if fault == "deleted"
                                                   else "replaced") in r.getMessage()]
    assert len(lines) == 1 and str(path) in lines[0].getMessage()  # one clear line
    assert len(model_server.requests) == calls  # no model call for a turn that can't be kept
    if fault == "replaced":
        assert tables(path) == {"invoices"}  # nothing migrated into someone else's file
    else:
        assert not path.exists()


async def test_a_foreign_database_is_never_migrated(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    foreign_database(path)
    store = SQLiteStore(str(path))
    with pytest.raises(StorageError, match="not a memorybot database"):
        await store.open()
    assert tables(path) == {"invoices"}


@contextlib.asynccontextmanager
async def write_lock_held(path: Path) -> AsyncIterator[None]:
    """Another process's write transaction on the file."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


async def test_group_commit_under_lock_contention_waits_once(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    busy = 0.3
    store = SQLiteStore(str(path), busy_timeout=busy)
    await store.open()
    try:
        conv = await store.conversation_id(REF)
        transactions = 0
        plain = store._run_in_transaction

        async def counted(fn: Any, *args: Any) -> Any:
            nonlocal transactions
            transactions += 1
            return await plain(fn, *args)

        store._run_in_transaction = counted  # type: ignore[method-assign]

        def record(i: int) -> AuditRecord:
            return AuditRecord(platform="telegram", user_id="1", chat_id="c",
                               conversation=REF.key, user_input=f"q{i}")

        async with write_lock_held(path):
            async with asyncio.timeout(busy * 4):  # each alone: 1 + 8 busy timeouts
                results = await asyncio.gather(
                    *(store.save_exchange(conv, f"q{i}", f"a{i}", record(i)) for i in range(8)),
                    return_exceptions=True)
        assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
        assert transactions == 1  # the batch waited for the lock once, not once per exchange
        # Nothing half-written; once the lock is free the same exchanges go through.
        assert await store.count_messages(conv) == 0
        ids = await asyncio.gather(*(store.save_exchange(conv, f"q{i}", f"a{i}", record(i))
                                     for i in range(8)))
        assert len(set(ids)) == 8 and await store.count_messages(conv) == 16
    finally:
        await store.close()
