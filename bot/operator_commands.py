"""The operator's commands: logs, stats, forget, migrate, copy-db, backup, reindex."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
from datetime import UTC, date, datetime, timedelta
from typing import Any

from bot.progress import progress
from bot.records import StorageError
from bot.settings import Settings
from bot.stats import format_model_time, format_stats, reach_line, store_stats, with_model_time
from bot.store import TABLES, Store
from storage import open_store
from storage.audit_queries import AuditFilter

FOLLOW_POLL = 1.0  # seconds between looks for new records with --follow
FOLLOW_BATCH = 500  # records a look fetches at most
# PostgreSQL hands out ids before commit: a record may appear below the newest
# id already shown. --follow looks this far back, skipping what it printed.
FOLLOW_LOOKBACK = 200


async def _opened(url: str, settings: Settings | None = None, *,
                  read_only: bool = False) -> Store:
    store = open_store(url, pool_size=settings.DB_POOL_SIZE if settings else 4,
                       read_only=read_only)
    await store.open()
    return store


_AGO = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> str:
    """`2026-12-01`, `2026-12-01T10:00`, `2h`, `7d`, `30m` → an audit timestamp (UTC)."""
    text = text.strip()
    m = _AGO.fullmatch(text)
    if m:
        at = (now or datetime.now(UTC)) - timedelta(**{_UNITS[m[2]]: int(m[1])})
    else:
        try:
            if len(text) == 10:
                d = date.fromisoformat(text)
                at = datetime(d.year, d.month, d.day, tzinfo=UTC)
            else:
                at = datetime.fromisoformat(text.replace("Z", "+00:00"))
                at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
        except ValueError:
            raise ValueError(f"--since {text!r}: allowed: a date (2026-12-01), a time "
                             "(2026-12-01T10:00, UTC) or an age (30m, 2h, 7d, 2w)") from None
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _line(r: dict[str, Any]) -> str:
    took = f"{r['response_time']:.2f}s" if r.get("response_time") is not None else "-"
    head = (f"{r['timestamp']}  {r['platform']}:{r['user_id']}  {r['kind']}  {r['status']}  "
            f"{r['provider']}/{r['model']}  {took}")
    body = f"  > {_short(r['user_input'])}"
    if r.get("model_response"):
        body += f"\n  < {_short(r['model_response'])}"
    if r.get("error"):
        body += f"\n  ! {r['error']}"
    return head + "\n" + body


def _short(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


async def logs(settings: Settings, n: int, f: AuditFilter, as_json: bool,
               follow: bool = False) -> int:
    """The last n matching records, oldest first; with `follow`, new ones until Ctrl-C."""
    def show(r: dict[str, Any]) -> None:
        print(json.dumps(r, ensure_ascii=False) if as_json else _line(r), flush=follow)

    store = await _opened(settings.DATABASE_URL, settings, read_only=True)
    try:
        # Taken first: whatever is written after it is new, and --follow prints it.
        last = await store.last_audit_id() if follow else 0
        rows = await store.audit_query(f, max(0, n))
        for r in rows:
            show(r)
        if follow:
            await _follow(store, f, max([last] + [r["id"] for r in rows]), show)
    finally:
        await store.close()
    return 0


async def _follow(store: Store, f: AuditFilter, last: int, show: Any) -> None:
    """Poll for records after `last` until SIGINT/SIGTERM; one query a second at most."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    window = FOLLOW_BATCH + FOLLOW_LOOKBACK
    # Records up to `last` were there before: they count as shown.
    seen = {r["id"] for r in await store.audit_after(f, max(0, last - FOLLOW_LOOKBACK),
                                                     window) if r["id"] <= last}
    while not stop.is_set():
        rows = await store.audit_after(f, max(0, last - FOLLOW_LOOKBACK), window)
        for r in rows:
            if r["id"] not in seen:
                show(r)
                seen.add(r["id"])
        if rows:
            last = max(last, rows[-1]["id"])
        seen = {i for i in seen if i > last - FOLLOW_LOOKBACK}  # bounded
        if len(rows) < window:  # caught up: wait for more
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FOLLOW_POLL)


async def stats(settings: Settings, as_json: bool) -> int:
    store = await _opened(settings.DATABASE_URL, settings, read_only=True)
    try:
        figures = await store_stats(store)
        model_time = await store.model_time()
        oldest, records = await store.audit_span()
    finally:
        await store.close()
    if as_json:
        for f in with_model_time(figures, model_time):
            print(json.dumps(f))
    else:
        print(format_stats(figures))
        if model_time:
            print("\n" + format_model_time(model_time))
        print(reach_line(oldest, records, settings.AUDIT_RETENTION_DAYS))
    return 0


async def forget(settings: Settings, who: str) -> int:
    platform, sep, user_id = who.partition(":")
    if not sep or not platform or not user_id:
        print(f"error: {who!r} is not PLATFORM:USER_ID, e.g. telegram:123", file=sys.stderr)
        return 2
    store = await _opened(settings.DATABASE_URL, settings)
    try:
        counts = await store.forget_user(platform, user_id)
    finally:
        await store.close()
    print(f"forgot {who}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


async def migrate(settings: Settings) -> int:
    with progress("migrate", None, unit="steps") as bar:
        store = open_store(settings.DATABASE_URL, pool_size=settings.DB_POOL_SIZE)
        store.on_migration = bar.update  # each step of a big table rebuild shows
        await store.open()
        try:
            names = await store.applied_migrations()
        finally:
            await store.close()
    print(f"database is at migration {names[-1] if names else '-'} ({len(names)} applied):")
    for name in names:
        print(f"  {name}")
    return 0


async def copy_db(src_url: str, dst_url: str) -> int:
    """Copy every table, then check the counts match."""
    src = await _opened(src_url)
    try:
        dst = await _opened(dst_url)
        try:
            if any((await dst.table_counts()).values()):
                raise StorageError("the destination database is not empty")
            total = sum((await src.table_counts()).values())
            with progress("copy-db", total, unit="rows") as bar:
                for table in TABLES:
                    async for rows in src.export_rows(table):
                        await dst.import_rows(table, rows)
                        bar.advance(len(rows))
            await dst.finish_import()
            want, got = await src.table_counts(), await dst.table_counts()
            # The recall index is not copied: it is rebuilt from the copied messages
            # (embeddings: `reindex` with EMBED_MODEL set on the destination).
            after = 0
            while True:
                indexed, after = await dst.index_unindexed(after, 2000)
                if not indexed:
                    break
        finally:
            await dst.close()
    finally:
        await src.close()
    for table in TABLES:
        print(f"{table}: {want[table]} → {got[table]}")
    if want != got:
        print("error: counts differ after the copy", file=sys.stderr)
        return 1
    print("copy verified: every table has the same number of rows")
    print("words index rebuilt on the destination; with EMBED_MODEL set, run "
          "`python -m bot reindex` there for the embeddings")
    return 0


async def reindex(settings: Settings, user: str | None) -> int:
    """Build the recall index for stored messages that lack it (bot.reindex)."""
    from bot.reindex import reindex as run_reindex

    if user is not None and ":" not in user:
        print(f"error: {user!r} is not PLATFORM:USER_ID, e.g. telegram:123", file=sys.stderr)
        return 2
    store = await _opened(settings.DATABASE_URL, settings)
    try:
        return await run_reindex(settings, store, user)
    finally:
        await store.close()
async def backup(settings: Settings, path: str) -> int:
    """SQLite: a verified online copy at `path`. PostgreSQL: the pg_dump command to use."""
    from bot.backup import BackupError, backup_sqlite, human_size, pg_dump_command

    url = settings.DATABASE_URL
    if not url.startswith("sqlite:///"):
        print("PostgreSQL is backed up with its own tool, pg_dump, while the bot runs:")
        print(f"  {pg_dump_command(url, path)}")
        print("(the password is left out: pg_dump asks for it, or reads PGPASSWORD or "
              "~/.pgpass)")
        return 2
    src = url.removeprefix("sqlite:///")
    try:
        with progress("backup", None, unit="pages") as bar:
            result = await asyncio.to_thread(
                backup_sqlite, src, path, on_progress=lambda d, t: bar.update(d, t))
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = ", ".join(f"{t} {n:,}" for t, n in result.counts.items() if not t.startswith("_"))
    print(f"backup written to {result.path}: {human_size(result.size)}; "
          f"integrity_check ok; rows: {rows}")
    return 0
