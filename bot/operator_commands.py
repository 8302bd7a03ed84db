"""The operator's commands: logs, stats, forget, migrate, copy-db, reindex."""

from __future__ import annotations

import json
import sys
from typing import Any

from bot.records import StorageError
from bot.settings import Settings
from bot.stats import compute_stats, format_model_time, format_stats, with_model_time
from bot.store import TABLES, Store
from storage import open_store


async def _opened(url: str, settings: Settings | None = None) -> Store:
    store = open_store(url, pool_size=settings.DB_POOL_SIZE if settings else 4)
    await store.open()
    return store


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


async def logs(settings: Settings, n: int, user: str | None, as_json: bool) -> int:
    store = await _opened(settings.DATABASE_URL, settings)
    try:
        rows = await store.audit_log(max(0, n), user)
    finally:
        await store.close()
    for r in rows:
        print(json.dumps(r, ensure_ascii=False) if as_json else _line(r))
    return 0


async def stats(settings: Settings, as_json: bool) -> int:
    store = await _opened(settings.DATABASE_URL, settings)
    try:
        figures = compute_stats(await store.audit_rows_for_stats())
        model_time = await store.model_time()
    finally:
        await store.close()
    if as_json:
        for f in with_model_time(figures, model_time):
            print(json.dumps(f))
    else:
        print(format_stats(figures))
        if model_time:
            print("\n" + format_model_time(model_time))
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
    store = await _opened(settings.DATABASE_URL, settings)
    try:
        names = await store.applied_migrations()
    finally:
        await store.close()
    print(f"database is at migration {names[-1] if names else '-'} ({len(names)} applied)")
    return 0


async def copy_db(src_url: str, dst_url: str) -> int:
    """Copy every table, then check the counts match."""
    src = await _opened(src_url)
    try:
        dst = await _opened(dst_url)
        try:
            if any((await dst.table_counts()).values()):
                raise StorageError("the destination database is not empty")
            for table in TABLES:
                async for rows in src.export_rows(table):
                    await dst.import_rows(table, rows)
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
