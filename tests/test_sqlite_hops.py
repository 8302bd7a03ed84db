"""SQLite: a turn's statements in few hand-offs to aiosqlite's thread, and the
history cache that spares it re-reading rows (storage/sqlite_hop.py,
storage/history_cache.py)."""

from __future__ import annotations

import asyncio
import collections
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosqlite
import aiosqlite.core
import pytest

from bot.records import AuditRecord
from bot.store import Store
from storage import sqlite_hop
from storage.sqlite_store import SQLiteStore
from tests.conftest import SettingsFactory, ask
from tests.samples import REF, audit


@pytest.fixture
def hand_offs(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Every trip to aiosqlite's thread, by what it ran."""
    counts: collections.Counter[str] = collections.Counter()
    original = aiosqlite.core.Connection._execute

    async def counting(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(args[1], "__name__", "?") if fn is sqlite_hop._on_thread \
            else getattr(fn, "__name__", "?")
        counts[name] += 1
        return await original(self, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.core.Connection, "_execute", counting)
    return counts


async def test_a_chat_turn_reads_in_one_hand_off_and_stores_in_one(
        make_settings: SettingsFactory, hand_offs: collections.Counter[str]) -> None:
    from bot.app import open_service
    from tests.conftest import incoming

    async with open_service(make_settings(CONTEXT_TOKENS=600, REPLY_TOKENS=100,
                                          MEMORY_STRATEGY="truncate")) as service:
        ref = service.conversation_ref(incoming("x"))
        conv = await service.store.conversation_id(ref)

        def mine() -> AuditRecord:
            return audit(platform=ref.platform, user_id=ref.user_id, conversation=ref.key)

        # A history longer than the window, its oldest part the one that matters.
        await service.store.save_exchange(conv, "My sister's name is Mira.", "Noted.", mine())
        for i in range(40):
            await service.store.save_exchange(conv, f"Tell me about topic {i} please.",
                                              f"Topic {i} is a fine topic.", mine())
        await ask(service, "Hello again.")  # first turn: the model's window is learned
        await service.windows.flush()
        hand_offs.clear()
        reply = await ask(service, "What is the name of my sister?")
        assert reply
        # The context, notes and language in one; the recall search with its hits'
        # neighbours in one; both messages, their words index and the audit row in one.
        assert dict(hand_offs) == {"_turn_reads": 1, "_search_around": 1,
                                   "_transaction_on_file": 1}
        assert service.recaller.last(conv).recalled.messages  # type: ignore[union-attr]
        db = service.store.db  # type: ignore[attr-defined]
        rows = await db.execute_fetchall("SELECT role, content FROM messages ORDER BY id")
        assert [tuple(r) for r in rows][-2:] == [("user", "What is the name of my sister?"),
                                                 ("assistant", reply)]


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    s = SQLiteStore(str(tmp_path / "bot.db"))
    await s.open()
    yield s
    await s.close()


async def _reads(store: SQLiteStore, conv: int, limit: int = 50) -> Any:
    return await store.turn_reads(conv, REF, None, limit, with_summary=True,
                                  with_personas=True)


@pytest.fixture
def other_process(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    """A second connection to the same file, as another process (`python -m bot forget`)."""
    conn = sqlite3.connect(tmp_path / "bot.db", isolation_level=None)
    yield conn
    conn.close()


async def test_turn_reads_in_one_hand_off_are_the_separate_reads(store: SQLiteStore) -> None:
    conv = await store.conversation_id(REF)
    for i in range(4):
        await store.save_exchange(conv, f"q{i}", f"a{i}", audit())
    msgs = await store.recent_messages(conv, 100)
    await store.save_summary(conv, "User is Ana.", msgs[1].id)
    await store.add_note(conv, "likes tea")
    await store.set_user_language("telegram", "1", "zh-TW")
    await store.set_conversation_persona(REF, "poet")
    for limit in (3, 50):
        for _ in range(2):  # read, then served from what the first read kept
            got = await _reads(store, conv, limit)
            assert got == await Store.turn_reads(store, conv, REF, None, limit,
                                                 with_summary=True, with_personas=True)
    assert [m.content for m in got.context.history] == ["q1", "a1", "q2", "a2", "q3", "a3"]
    assert got.context.summary is not None and got.context.language_choice == "zh-TW"
    assert [n.text for n in got.notes] == ["likes tea"] and got.personas == ("poet", None)


async def test_cached_history_never_brings_back_a_message_deleted_elsewhere(
        store: SQLiteStore, other_process: sqlite3.Connection) -> None:
    conv = await store.conversation_id(REF)
    for i in range(3):
        await store.save_exchange(conv, f"q{i}", f"a{i}", audit())
    first = await _reads(store, conv)
    assert [m.content for m in first.context.history] == ["q0", "a0", "q1", "a1", "q2", "a2"]
    # Another process deletes one message and stores one the bot never saw.
    other_process.execute("DELETE FROM messages WHERE content = 'a1'")
    other_process.execute(
        "INSERT INTO messages (conversation_id, role, content, created_at)"
        " VALUES (?, 'user', 'from elsewhere', 't')", (conv,))
    got = await _reads(store, conv)
    assert [m.content for m in got.context.history] == \
        ["q0", "a0", "q1", "q2", "a2", "from elsewhere"]
    assert got.context.history == (await store.turn_context(
        conv, "telegram", "1", 50, True)).history
    # Everything gone (forget in another process): nothing comes back from memory.
    other_process.execute("DELETE FROM messages")
    assert (await _reads(store, conv)).context.history == []


async def test_reset_and_forget_leave_nothing_in_the_history_cache(store: SQLiteStore) -> None:
    conv = await store.conversation_id(REF)
    await store.save_exchange(conv, "my pin is 1234", "noted", audit())
    assert len((await _reads(store, conv)).context.history) == 2
    await store.reset_conversation(conv)
    assert store._history.known(conv) == {}
    assert (await _reads(store, conv)).context.history == []
    await store.save_exchange(conv, "again 1234", "noted", audit())
    await _reads(store, conv)
    await store.forget_user("telegram", "1")
    assert len(store._history) == 0


async def test_a_one_hand_off_transaction_that_fails_writes_nothing(store: SQLiteStore) -> None:
    conv = await store.conversation_id(REF)

    async def half(db: aiosqlite.Connection) -> None:
        await db.execute("INSERT INTO messages (conversation_id, role, content, created_at)"
                         " VALUES (?, 'user', 'half', 't')", (conv,))
        await db.execute("INSERT INTO no_such_table VALUES (1)")

    with pytest.raises(sqlite3.OperationalError):
        await store._run_in_transaction(half)
    assert not store.db.in_transaction
    assert await store.count_messages(conv) == 0
    assert await store.save_exchange(conv, "q", "a", audit()) > 0  # the next one goes in


async def test_code_that_awaits_anything_but_the_connection_is_refused(
        store: SQLiteStore) -> None:
    async def sleeps(db: aiosqlite.Connection) -> None:
        await db.execute("SELECT 1")
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="awaited something other than its connection"):
        await store._run(sleeps)
    assert await store.applied_migrations()  # the connection is fine


async def test_wal_checkpoints_happen_beside_the_commits(store: SQLiteStore,
                                                        tmp_path: Path) -> None:
    # No commit checkpoints (one would make its whole group commit wait); the
    # store's own checkpointer, on its own connection, does after writes.
    assert (await store.db.execute_fetchall("PRAGMA wal_autocheckpoint"))[0][0] == 0
    conv = await store.conversation_id(REF)
    for i in range(30):
        await store.save_exchange(conv, f"q{i} " * 300, f"a{i} " * 300, audit())
    checkpointer = store._checkpointer
    assert checkpointer is not None and checkpointer.checkpoints == 0
    await checkpointer.flush()
    assert checkpointer.checkpoints == 1
    with sqlite3.connect(tmp_path / "bot.db") as other:
        busy, frames, done = other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames > 0 and done == frames  # everything was already copied


def test_the_history_cache_is_bounded_by_characters_and_drops_what_left_the_window(
) -> None:
    from bot.records import StoredMessage
    from storage.history_cache import SLACK, HistoryCache

    def window(conv: int, first: int, n: int) -> list[StoredMessage]:
        return [StoredMessage(conv * 1000 + i, "user", "x" * 10)
                for i in range(first, first + n)]

    cache = HistoryCache(max_chars=250)
    cache.keep(1, window(1, 0, 10), all_known=False)
    cache.keep(2, window(2, 0, 10), all_known=False)
    assert len(cache) == 20
    cache.keep(1, window(1, 0, 10), all_known=True)  # conversation 1 is the recent one
    cache.keep(3, window(3, 0, 10), all_known=False)  # 300 characters: 2 goes
    assert dict(cache.known(2)) == {} and len(cache.known(1)) == 10
    # A window that moves on: what it left behind goes once it passes SLACK.
    big = HistoryCache()
    big.keep(1, window(1, 0, 5), all_known=False)
    for turn in range(1, SLACK + 2):
        big.add(1, window(1, 4 + turn, 1))
        big.keep(1, window(1, turn, 5), all_known=True)
    assert len(big.known(1)) <= 5 + SLACK
