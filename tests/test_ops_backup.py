"""`backup` under load, and the progress shown by long operator commands."""

from __future__ import annotations

import asyncio
import contextlib
import io
import sqlite3
from pathlib import Path

import pytest

from bot import operator_commands as ops
from bot.app import open_service
from bot.backup import backup_sqlite, pg_dump_command
from bot.progress import progress
from tests.conftest import SettingsFactory, ask


async def test_backup_during_load_holds_every_acknowledged_exchange(
        make_settings: SettingsFactory, tmp_path: Path) -> None:
    settings = make_settings(MEMORY_STRATEGY="truncate")
    acknowledged: list[str] = []
    stop = asyncio.Event()
    under_way = asyncio.Event()

    async def load(user: str) -> None:
        i = 0
        while not stop.is_set():
            text = f"load {user} {i}"
            reply = await ask(service, text, user=user, platform="telegram")
            assert reply == f"You said: {text}"
            acknowledged.append(text)  # the user saw it: it is stored
            if len(acknowledged) >= 20:
                under_way.set()
            i += 1

    async with open_service(settings) as service:
        for i in range(15):
            text = f"before {i} " + "x" * 3000  # enough pages for many steps
            await ask(service, text, user=str(i % 5), platform="telegram")
            acknowledged.append(text)
        loaders = [asyncio.create_task(load(f"L{n}")) for n in range(3)]
        async with asyncio.timeout(10):
            await under_way.wait()
        before = set(acknowledged)
        steps: list[tuple[int, int]] = []
        src = settings.DATABASE_URL.removeprefix("sqlite:///")
        result = await asyncio.to_thread(backup_sqlite, src, tmp_path / "copy.db", pages=2,
                                         on_progress=lambda d, t: steps.append((d, t)))
        stop.set()
        async with asyncio.timeout(10):
            await asyncio.gather(*loaders)
        after = len(acknowledged)
    assert after > len(before)  # writes went on while the copy ran
    assert len(steps) > 5 and steps[-1][0] == steps[-1][1]  # stepwise, to the end
    copy = sqlite3.connect(tmp_path / "copy.db")
    try:
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        audited = {r[0] for r in copy.execute("SELECT user_input FROM audit")}
        said = {r[0] for r in copy.execute("SELECT content FROM messages WHERE role = 'user'")}
        exchanges = copy.execute("SELECT count(*) FROM audit WHERE kind = 'chat'").fetchone()[0]
        messages = copy.execute("SELECT count(*) FROM messages").fetchone()[0]
        audit = copy.execute("SELECT count(*) FROM audit").fetchone()[0]
    finally:
        copy.close()
    assert before <= audited and before <= said
    assert messages == 2 * exchanges  # whole exchanges only
    assert result.counts["audit"] == audit and result.size > 15 * 3000


async def test_backup_command(make_settings: SettingsFactory, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings()
    async with open_service(settings) as service:
        await ask(service, "keep me")
    target = tmp_path / "backups" / "bot-1.db"
    target.parent.mkdir()
    assert await ops.backup(settings, str(target)) == 0
    captured = capsys.readouterr()
    assert "backup written to" in captured.out and "integrity_check ok" in captured.out
    assert "audit 1" in captured.out and "messages 2" in captured.out
    assert "backup:" in captured.err  # progress, as plain lines off a terminal
    assert target.stat().st_mode & 0o077 == 0  # owner only, like the database
    copy = sqlite3.connect(target)
    try:
        assert copy.execute("SELECT content FROM messages ORDER BY id").fetchall() == [
            ("keep me",), ("You said: keep me",)]
    finally:
        copy.close()
    assert await ops.backup(settings, str(target)) == 1  # never overwrites
    assert "already exists" in capsys.readouterr().err
    assert not list(target.parent.glob("*.partial"))


async def test_backup_of_postgres_prints_pg_dump_without_the_password(
        make_settings: SettingsFactory, capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(DATABASE_URL="postgresql://bot:s3cr3t@db.example:5432/memorybot")
    assert await ops.backup(settings, "/var/backups/bot.dump") == 2
    out = capsys.readouterr().out
    assert "pg_dump --format=custom --file='/var/backups/bot.dump' " \
           "'postgresql://bot@db.example:5432/memorybot'" in out
    assert "s3cr3t" not in out
    assert "s3cr3t" not in pg_dump_command("postgresql://u@h/d?password=s3cr3t&sslmode=require",
                                           "x")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    plain = io.StringIO()
    with progress("copy-db", 1200, unit="rows", stream=plain) as bar:
        for _ in range(12):
            bar.advance(100)
    assert plain.getvalue().splitlines()[-1].startswith("copy-db: 1,200/1,200 rows (100%), ")
    assert plain.getvalue().rstrip().endswith("rows/s")
    tty = _Terminal()
    with progress("copy-db", 1200, unit="rows", stream=tty) as bar:
        for _ in range(12):
            bar.advance(100)
    shown = tty.getvalue()
    assert "1200/1200" in shown and "━" in shown and "rows/s" in shown


async def test_copy_db_shows_progress(make_settings: SettingsFactory, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings()
    async with open_service(settings) as service:
        for i in range(3):
            await ask(service, f"row {i}")
    dst = f"sqlite:///{tmp_path / 'copy' / 'bot.db'}"
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert await ops.copy_db(settings.DATABASE_URL, dst) == 0
    assert "copy verified" in capsys.readouterr().out
    # 1 conversation + 6 messages + 3 audit records + what was learned about the
    # model (migrations are not copied)
    assert "copy-db: 11/11 rows (100%)" in err.getvalue()
