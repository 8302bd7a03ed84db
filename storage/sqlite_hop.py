"""Several SQLite statements in one hand-off to aiosqlite's thread.

Every awaited aiosqlite call is a round trip between threads: a queue put that
wakes the connection's thread, then `call_soon_threadsafe` waking the event
loop again (a system call each way, and on a busy machine a wait to be
scheduled). A turn's reads and an exchange's writes are several statements
each; `in_one_hop` runs them as one function on the connection's own thread,
so they cost one hand-off.

The function is ordinary store code written against aiosqlite's API (so the
helpers of storage/recall_index.py run unchanged): on the thread it gets a
`Here`, an aiosqlite connection whose every await is answered at once.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite

P = ParamSpec("P")
T = TypeVar("T")


class Here(aiosqlite.Connection):
    """aiosqlite's API over the raw connection, for code already on its thread.

    aiosqlite routes every call (cursors' too) through `_execute`; here that
    runs the call at once instead of queueing it for the thread we are on.
    """

    def __init__(self, conn: sqlite3.Connection, iter_chunk_size: int = 64) -> None:
        # No worker thread of its own: the connection's thread is running this.
        self._running = True
        self._connection = conn
        self._iter_chunk_size = iter_chunk_size

    async def _execute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return fn(*args, **kwargs)

    def __del__(self) -> None:
        """The connection belongs to the aiosqlite.Connection that lent it."""


def run_here(fn: Callable[..., Coroutine[Any, Any, T]], conn: sqlite3.Connection,
             *args: Any) -> T:
    """Run `fn(Here(conn), *args)` to its end on the calling thread (the connection's)."""
    coro = fn(Here(conn), *args)
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError(f"{getattr(fn, '__qualname__', fn)} awaited something other than its "
                       "connection, which cannot run on the connection's thread")


def _on_thread(db: aiosqlite.Connection, fn: Callable[..., Coroutine[Any, Any, T]],
               args: tuple[Any, ...]) -> T:
    return run_here(fn, db._conn, *args)  # the raw connection, read on its own thread


async def in_one_hop(db: aiosqlite.Connection,
                     fn: Callable[Concatenate[aiosqlite.Connection, P], Awaitable[T]],
                     *args: P.args, **_: P.kwargs) -> T:
    """`await fn(conn, *args)`, every statement of it in one trip to `db`'s thread."""
    return await db._execute(_on_thread, db, fn, args)  # type: ignore[no-any-return]


async def transaction(conn: aiosqlite.Connection,
                      fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """`fn(conn, *args)` inside BEGIN IMMEDIATE … COMMIT, rolled back if anything fails
    (its COMMIT included). Meant to run inside `in_one_hop`: a transaction in one
    hand-off can't interleave with another coroutine's statements."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        result = await fn(conn, *args)
        await conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
        raise
    return result
