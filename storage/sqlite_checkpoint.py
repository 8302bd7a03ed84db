"""WAL checkpoints beside the turns, not inside one of their commits.

By default SQLite checkpoints in the COMMIT that takes the WAL past 1,000
pages: that commit copies the WAL into the database file and syncs it
(milliseconds, more on a busy disk), and every exchange of its group commit
waits for it: about 1% of turns at 10 conversations, the whole p99. The
store's connection turns that off (`wal_autocheckpoint = 0`); this runs a
PASSIVE checkpoint on a connection of its own (so on a thread of its own) a
moment after writes, which neither waits for nor blocks the store's readers
and its writer. The WAL stays about as small as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import PurePath

import aiosqlite

log = logging.getLogger(__name__)

CHECKPOINT_AFTER = 1.0  # seconds after a write (at most one checkpoint that often)


class Checkpointer:
    """Checkpoints the WAL of the database at `path` a little after each write."""

    def __init__(self, path: str, synchronous: str, after: float = CHECKPOINT_AFTER) -> None:
        self.path = path
        # mode=rw: never create a database where the store's file went missing.
        self._uri = PurePath(os.path.abspath(path)).as_uri() + "?mode=rw"
        self.synchronous = synchronous
        self.after = after
        self._db: aiosqlite.Connection | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._failed = False
        self.checkpoints = 0  # done so far (tests)

    async def open(self) -> None:
        self._db = await aiosqlite.connect(self._uri, uri=True, isolation_level=None)
        # The checkpoint's syncs are the store's: its durability, not more.
        await self._db.execute(f"PRAGMA synchronous = {self.synchronous}")

    def wrote(self) -> None:
        """A write committed: checkpoint soon (once, however many writes meanwhile)."""
        if self._timer is None and self._db is not None:
            self._timer = asyncio.get_running_loop().call_later(self.after, self._start)

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.create_task(self._checkpoint(self._task))

    async def _checkpoint(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:  # one at a time
            await previous
        if self._db is None:
            return
        try:
            await self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self.checkpoints += 1
        except Exception as exc:
            if not self._failed:  # the file itself is watched by the store
                log.warning("WAL checkpoint of %s failed: %s", self.path, exc)
                self._failed = True

    async def flush(self) -> None:
        """Checkpoint now if one is due, and wait for it (tests, shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._start()
        if self._task is not None:
            await self._task

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        if self._db is not None:
            db, self._db = self._db, None
            with contextlib.suppress(Exception):
                await db.close()
