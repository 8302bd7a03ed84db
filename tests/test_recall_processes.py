"""Recall isolation across OS processes: two `python -m bot console` on one PostgreSQL.

Each process serves one user (the console's user is the login name) against
the same database, at the same time, with recall by words and by meaning on.
Bob's facts reach Bob's prompts; Alice asks the same questions in her own
process and none of Bob's words, by either ranking, reaches hers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

from bot.records import AuditRecord
from bot.reindex import reindex
from bot.store import ConversationRef
from storage import open_store
from tests.conftest import SettingsFactory
from tests.fakes.model_server import ModelServer
from tests.pg import pg_url  # noqa: F401  (a fresh database per test)
from tests.test_console import bot_env, run_bot

EMBED = "all-minilm"
FILLER = 40  # exchanges each: the facts lie well before the 1024-token window
CODE_FACT = "My garage door code is 4417, keep it safe."
MEANING_FACT = "I nearly slipped on the zebra crossing outside the bakery on Elm."
WORDS_Q = "What is my garage door code?"
MEANING_Q = "Were those pedestrian stripes repainted?"  # no word in common with the fact


async def _seed(url: str) -> dict[str, int]:
    """Bob's facts far back in a long history; Alice's long history of other things."""
    store = open_store(url, pool_size=2)
    await store.open()
    try:
        convs = {}
        for user in ("alice", "bob"):
            ref = ConversationRef(key=f"console:{user}@dm", platform="console", user_id=user,
                                  place="dm")
            conv = convs[user] = await store.conversation_id(ref)
            texts = [CODE_FACT, MEANING_FACT] if user == "bob" else []
            texts += [f"Today {user} mostly worked on the quarterly report ({i})."
                      for i in range(FILLER)]
            for text in texts:
                await store.save_exchange(conv, text, "Sounds good.", AuditRecord(
                    platform="console", user_id=user, chat_id="console",
                    conversation=ref.key, user_input=text))
        return convs
    finally:
        await store.close()


async def test_two_processes_never_recall_each_others_messages(
    pg_url: str, model_server: ModelServer, make_settings: SettingsFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    model_server.models.append(EMBED)
    same = [1.0] + [0.0] * 31
    model_server.embeddings.phrases = {"zebra crossing": same, "pedestrian stripes": same}
    convs = await _seed(pg_url)
    settings = make_settings(DATABASE_URL=pg_url, EMBED_MODEL=EMBED)
    store = open_store(pg_url, pool_size=2)
    await store.open()
    try:
        assert await reindex(settings, store, stream=_Null()) == 0  # every message's vector
    finally:
        await store.close()
    env = {"CONTEXT_TOKENS": "1024", "REPLY_TOKENS": "256", "MEMORY_STRATEGY": "truncate",
           "EMBED_MODEL": EMBED, "DATABASE_URL": pg_url, "RATE_LIMIT_PER_MINUTE": "0"}
    script = f"{WORDS_Q}\n{MEANING_Q}\n"
    async with asyncio.timeout(20):
        (code_a, out_a, err_a), (code_b, out_b, err_b) = await asyncio.gather(
            run_bot(["console"], bot_env(tmp_path, model_server, USER="alice",
                                         LOGNAME="alice", **env), script),
            run_bot(["console"], bot_env(tmp_path, model_server, USER="bob", LOGNAME="bob",
                                         **env), script))
    assert (code_a, code_b) == (0, 0), err_a + err_b
    # What each user saw: the stand-in's echo of their own questions.
    assert out_a.splitlines() == out_b.splitlines() == [f"You said: {WORDS_Q}",
                                                         f"You said: {MEANING_Q}"]
    # What crossed the wire: the prompts, told apart by each user's own history.
    chats = [r for r in model_server.requests if r.messages[-1]["content"] in (WORDS_Q,
                                                                                MEANING_Q)]
    prompts = {"alice": [], "bob": []}
    for rec in chats:
        whole = "\n".join(m["content"] for m in rec.messages)
        owner = "alice" if "Today alice" in whole else "bob"
        assert f"Today {'bob' if owner == 'alice' else 'alice'}" not in whole
        prompts[owner].append(whole)
    assert len(prompts["alice"]) == len(prompts["bob"]) == 2
    words_b, meaning_b = sorted(prompts["bob"], key=lambda p: p.endswith(MEANING_Q))
    assert "4417" in words_b  # Bob's own fact, by words, from his process
    assert "zebra crossing" in meaning_b  # and by meaning alone
    for prompt in prompts["alice"]:
        assert "4417" not in prompt and "zebra" not in prompt
    # What reached the database: both processes' turns, Bob's with recalled messages.
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT user_id, recalled FROM audit WHERE user_input = ANY($1)"
                                " ORDER BY id", [WORDS_Q, MEANING_Q])
        stored = await conn.fetchval("SELECT count(*) FROM messages WHERE conversation_id = $1",
                                     convs["alice"])
    finally:
        await conn.close()
    assert sorted(r["user_id"] for r in rows) == ["alice", "alice", "bob", "bob"]
    assert all(r["recalled"] > 0 for r in rows if r["user_id"] == "bob")
    assert stored == 2 * FILLER + 4  # Alice's history and her two new exchanges, no one else's


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        return None

    def isatty(self) -> bool:
        return False
