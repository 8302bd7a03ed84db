"""Retention, searchable logs, --follow, stats in SQL and read-only opens, on both backends."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot import operator_commands as ops
from bot.records import AuditRecord, StorageError
from bot.retention import prune_audit, running_retention
from bot.stats import compute_stats, store_stats
from bot.store import Store
from storage import open_store
from storage.audit_queries import AuditFilter
from tests.backends import db_url_both_backends  # noqa: F401
from tests.conftest import SettingsFactory
from tests.test_console import ROOT

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def ts(ago: timedelta) -> str:
    return (NOW - ago).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record(text: str, ago: timedelta = timedelta(0), **kw: object) -> AuditRecord:
    values: dict[str, object] = {
        "platform": "telegram", "user_id": "1", "chat_id": "c", "conversation": "k",
        "user_input": text, "model_response": f"reply to {text}", "provider": "ollama",
        "model": "llama3.2", "timestamp": ts(ago)}
    values.update(kw)
    return AuditRecord(**values)  # type: ignore[arg-type]


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = open_store(db_url, pool_size=4)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def inputs(store: Store, f: AuditFilter | None = None, n: int = 1000) -> list[str]:
    return [r["user_input"] for r in await store.audit_query(f or AuditFilter(), n)]


# -- retention
async def test_retention_deletes_only_what_is_old_in_batches(store: Store) -> None:
    for i in range(7):
        await store.save_audit(record(f"old {i}", timedelta(days=40 + i)))
    await store.save_audit(record("just old", timedelta(days=30, seconds=1)))
    await store.save_audit(record("just kept", timedelta(days=29, hours=23)))
    await store.save_audit(record("new", timedelta(hours=1)))
    assert await prune_audit(store, 0, now=NOW) == 0  # 0 keeps everything
    assert len(await inputs(store)) == 10
    removed = await prune_audit(store, 30, batch=3, now=NOW)  # three batches and a rest
    assert removed == 8
    assert await inputs(store) == ["just kept", "new"]
    oldest, count = await store.audit_span()
    assert count == 2 and oldest == ts(timedelta(days=29, hours=23))


async def test_retention_runs_at_start_up(store: Store) -> None:
    await store.save_audit(record("ancient", timedelta(days=4000)))
    await store.save_audit(record("today", timedelta(days=-1000)))  # "now" is later than NOW
    passed = asyncio.Event()
    async with running_retention(store, 365, passed) as task:
        assert task is not None
        async with asyncio.timeout(10):
            await passed.wait()
    assert task.cancelled()
    assert await inputs(store) == ["today"]


# -- logs filters
async def _seed(store: Store) -> None:
    await store.save_audit(record("hello Ana", timedelta(days=3)))
    await store.save_audit(record("broken", timedelta(hours=5), status="error", error="x"))
    await store.save_audit(record("qwen talk", timedelta(minutes=30), model="qwen2.5"))
    await store.save_audit(record("fold this", timedelta(minutes=20), kind="summary",
                                  model_response="SUMMARY about 50% of_it"))
    await store.save_audit(record("spam", timedelta(minutes=10), status="rejected",
                                  user_id="2", model_response=""))


@pytest.mark.parametrize(("f", "want"), [
    (AuditFilter(), ["hello Ana", "broken", "qwen talk", "fold this", "spam"]),
    (AuditFilter(since=ts(timedelta(hours=1))), ["qwen talk", "fold this", "spam"]),
    (AuditFilter(since=ts(timedelta(days=1))), ["broken", "qwen talk", "fold this", "spam"]),
    (AuditFilter(status="error"), ["broken"]),
    (AuditFilter(model="qwen2.5"), ["qwen talk"]),
    (AuditFilter(kind="summary"), ["fold this"]),
    (AuditFilter(grep="ana"), ["hello Ana"]),  # any case, in the input
    (AuditFilter(grep="summary ABOUT"), ["fold this"]),  # in the reply
    (AuditFilter(grep="50%"), ["fold this"]),  # % and _ are literal
    (AuditFilter(grep="d_t"), []),  # would match "fold this" as a wildcard
    (AuditFilter(grep="of_it"), ["fold this"]),
    (AuditFilter(user="telegram:2"), ["spam"]),
    (AuditFilter(user="telegram:1", since=ts(timedelta(hours=6)), status="ok"),
     ["qwen talk", "fold this"]),
])
async def test_each_logs_filter(store: Store, f: AuditFilter, want: list[str]) -> None:
    await _seed(store)
    assert await inputs(store, f) == want
    assert await inputs(store, f, n=1) == want[-1:]  # -n: the newest, still oldest first


async def test_logs_command_prints_the_filtered_records(
        store: Store, make_settings: SettingsFactory, capsys: pytest.CaptureFixture[str]) -> None:
    await _seed(store)
    since = ops.parse_since("2h", now=NOW)
    assert since == ts(timedelta(hours=2))
    code = await ops.logs(make_settings(), 5, AuditFilter(since=since, grep="TALK"), True)
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and [json.loads(x)["user_input"] for x in lines] == ["qwen talk"]
    code = await ops.logs(make_settings(), 1, AuditFilter(status="rejected"), False)
    out = capsys.readouterr().out
    assert code == 0 and "rejected" in out and "spam" in out and "hello" not in out


def test_parse_since_forms() -> None:
    assert ops.parse_since("2026-12-01") == "2026-12-01T00:00:00.000Z"
    assert ops.parse_since("2026-12-01T10:30") == "2026-12-01T10:30:00.000Z"
    assert ops.parse_since("7d", now=NOW) == "2026-11-24T12:00:00.000Z"
    assert ops.parse_since("30m", now=NOW) == "2026-12-01T11:30:00.000Z"
    with pytest.raises(ValueError, match="allowed"):
        ops.parse_since("yesterday")


async def test_logs_follow_sees_records_another_process_writes(
        store: Store, db_url: str, tmp_path: Path) -> None:
    await store.save_audit(record("before", timedelta(0)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": db_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "logs", "--follow", "--json", "-n", "1", "--status", "ok",
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            first = json.loads(await proc.stdout.readline())
            assert first["user_input"] == "before"
            await store.save_audit(record("skipped", status="error"))
            await store.save_audit(record("after one"))
            await store.save_audit(record("after two"))
            seen = [json.loads(await proc.stdout.readline())["user_input"] for _ in range(2)]
        assert seen == ["after one", "after two"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            code = await proc.wait()
    assert code == 0  # Ctrl-C ends --follow cleanly


# -- stats
async def test_stats_in_sql_equal_the_figures_computed_row_by_row(store: Store) -> None:
    rng = random.Random(7)
    rows = []
    for i in range(97):
        status = rng.choice(["ok", "ok", "ok", "error", "cancelled", "rejected"])
        r = record(f"m{i}", model=rng.choice(["llama3.2", "qwen2.5"]), status=status,
                   response_time=rng.choice([None, round(rng.uniform(0.1, 9), 3)]),
                   first_token_time=rng.choice([None, round(rng.uniform(0.01, 2), 3)]),
                   prompt_tokens=rng.choice([None, rng.randint(1, 900)]),
                   completion_tokens=rng.randint(0, 300))
        await store.save_audit(r)
        if status != "rejected":
            rows.append(r.as_dict())
    await store.save_audit(record("a summary", kind="summary", response_time=100.0))
    got = await store_stats(store)
    assert got == compute_stats(rows)
    assert {g["model"] for g in got} == {"llama3.2", "qwen2.5"}
    assert sum(g["exchanges"] for g in got) == len(rows)


# -- read-only commands
async def test_read_only_store_runs_no_migration_and_writes_nothing(store: Store,
                                                                    db_url: str) -> None:
    await store.save_audit(record("kept"))
    ro = open_store(db_url, pool_size=2, read_only=True)
    await ro.open()
    try:
        assert await inputs(ro) == ["kept"]
        with pytest.raises(Exception, match=r"(?i)read.?only"):
            await ro.save_audit(record("written"))
    finally:
        await ro.close()
    assert await inputs(store) == ["kept"]


async def test_logs_on_a_missing_database_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "none" / "bot.db"
    ro = open_store(f"sqlite:///{path}", read_only=True)
    with pytest.raises(StorageError, match="no database"):
        await ro.open()
    assert not path.parent.exists()


async def test_stats_in_chat_and_command_say_how_far_back_the_log_reaches(
        make_settings: SettingsFactory, capsys: pytest.CaptureFixture[str]) -> None:
    from bot.app import open_service
    from tests.conftest import ask

    settings = make_settings(AUDIT_RETENTION_DAYS=30)
    async with open_service(settings) as service:
        await ask(service, "one")
        await ask(service, "two")
        shown = await ask(service, "/stats")  # the console is the operator's own
        oldest, count = await service.store.audit_span()
    assert "ollama/llama3.2" in shown and "  2  " in shown
    assert f"Audit log: 2 records since {oldest}" in shown and count == 2
    assert "older than 30 days are deleted daily" in shown
    assert await ops.stats(settings, False) == 0
    out = capsys.readouterr().out
    assert "ollama/llama3.2" in out and "Audit log: 2 records since" in out


async def test_a_bad_since_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "DATABASE_URL": f"sqlite:///{tmp_path / 'bot.db'}"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "logs", "--since", "yesterday", cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(20):
        out, err = await proc.communicate()
    assert proc.returncode == 2 and out == b""
    assert err.decode().strip().splitlines() == [
        "error: --since 'yesterday': allowed: a date (2026-12-01), a time "
        "(2026-12-01T10:00, UTC) or an age (30m, 2h, 7d, 2w)"]
    assert not (tmp_path / "bot.db").exists()  # nothing was opened, let alone created


def test_grep_matches_exactly_the_records_containing_the_text() -> None:
    """Any text, any pattern (LIKE's own % _ and the escape \\ included): the SQL
    filter agrees with a plain case-insensitive `in`."""
    import sqlite3

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from bot.records import AUDIT_COLUMNS
    from storage import audit_queries as aq
    from storage.dialect import SQLITE

    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE TABLE audit (id INTEGER PRIMARY KEY, {', '.join(AUDIT_COLUMNS)})")
    text = st.text(alphabet="aB%_\\' x", max_size=8)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.tuples(text, text), max_size=6), text.filter(bool))
    def check(rows: list[tuple[str, str]], pattern: str) -> None:
        conn.execute("DELETE FROM audit")
        conn.executemany("INSERT INTO audit (user_input, model_response) VALUES (?, ?)", rows)
        sql, args = aq.audit_log(SQLITE, AuditFilter(grep=pattern), 100)
        got = [r[0] for r in conn.execute(sql, args).fetchall()]  # ids
        want = [i + 1 for i, (a, b) in enumerate(rows)
                if pattern.lower() in a.lower() or pattern.lower() in b.lower()]
        assert sorted(got) == want

    check()
    conn.close()


async def test_an_unwritable_shm_file_is_one_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bot.db"
    first = open_store(f"sqlite:///{path}")
    await first.open()
    await first.save_audit(record("kept"))
    shm = path.with_name("bot.db-shm")
    assert shm.exists()  # the first store still has it open
    real_access = os.access
    # Tests run as root, whom permissions never stop: pretend the file is another user's.
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != shm and real_access(p, mode))
    second = open_store(f"sqlite:///{path}")
    with pytest.raises(StorageError, match=r"bot\.db-shm is not writable by this user"):
        await second.open()
    ro = open_store(f"sqlite:///{path}", read_only=True)  # logs and stats still work
    await ro.open()
    try:
        assert await inputs(ro) == ["kept"]
    finally:
        await ro.close()
        await first.close()
