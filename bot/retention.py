"""Audit retention: records older than AUDIT_RETENTION_DAYS go, in small batches.

And summary records keep their counts and timing but only the head of the
fold prompt (which quotes a whole stretch of the user's transcript).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from bot.records import AuditRecord
from bot.store import Store
from storage.audit_queries import RETENTION_BATCH

log = logging.getLogger(__name__)

DAY = 86_400.0
SUMMARY_INPUT_HEAD = 500  # characters of a fold prompt kept in its audit record
BATCH_PAUSE = 0.05  # seconds between batches, so turns get the write lock in between


def cutoff_for(days: int, now: datetime | None = None) -> str:
    """The ISO timestamp before which records are old, in the audit log's format."""
    at = (now or datetime.now(UTC)) - timedelta(days=days)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def prune_audit(store: Store, days: int, *, batch: int = RETENTION_BATCH,
                      now: datetime | None = None) -> int:
    """Delete records older than `days` days; return how many went. 0 days: none."""
    if days <= 0:
        return 0
    cutoff = cutoff_for(days, now)
    removed = 0
    while True:
        n = await store.delete_audit_before(cutoff, batch)
        removed += n
        if n < batch:
            break
        await asyncio.sleep(BATCH_PAUSE)
    if removed:
        log.info("retention: deleted %d audit records older than %s", removed, cutoff)
    return removed


async def retention_loop(store: Store, days: int, *, every: float = DAY,
                         passed: asyncio.Event | None = None) -> None:
    """At start-up, then every `every` seconds, until cancelled; `passed` is set after
    each pass."""
    while True:
        try:
            await prune_audit(store, days)
        except Exception:
            log.warning("retention: could not delete old audit records", exc_info=True)
        if passed is not None:
            passed.set()
        await asyncio.sleep(every)


@contextlib.asynccontextmanager
async def running_retention(store: Store, days: int, passed: asyncio.Event | None = None
                            ) -> AsyncIterator[asyncio.Task[None] | None]:
    """The daily retention task for as long as the block runs (nothing with 0 days)."""
    task = asyncio.create_task(retention_loop(store, days, passed=passed),
                               name="retention") if days else None
    try:
        yield task
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def trim_summary_record(record: AuditRecord) -> None:
    """Keep a short head of a summary call's prompt; counts and timing stay whole."""
    if record.kind == "summary" and len(record.user_input) > SUMMARY_INPUT_HEAD:
        total = len(record.user_input)
        record.user_input = (record.user_input[:SUMMARY_INPUT_HEAD]
                             + f"… [{total - SUMMARY_INPUT_HEAD:,} more characters not kept]")
