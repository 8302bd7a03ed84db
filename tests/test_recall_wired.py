"""Recall and notes through the real service, clients and store, on both backends.

Older messages reach the prompt by words (English, Chinese) and by meaning
(the stand-in's vectors made similar on purpose), within the budget by the
server's own count, never across users or places; /reset, forget and
/forget N remove what they should; a failing embedding server leaves replies
working by words; reindex builds what a database made before recall lacks.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import aiosqlite
import asyncpg
import pytest

from bot import operator_commands
from bot.app import open_service
from bot.notes import MAX_NOTE_CHARS, MAX_NOTES
from bot.records import AuditRecord
from bot.reindex import reindex
from bot.service import ChatService
from bot.tokens import count_messages
from storage import open_store
from storage.dialect import POSTGRES, SQLITE
from storage.migrations import MIGRATIONS
from tests.backends import db_url_both_backends  # noqa: F401  (SQLite and PostgreSQL)
from tests.conftest import SettingsFactory, ask, incoming
from tests.fakes.model_server import ModelServer, Recorded

EMBED = "all-minilm"
FILLER_EN = "Today I mostly worked on the quarterly report, then cooked pasta for dinner."
FILLER_ZH = "今天主要在寫季度報告，晚上煮了義大利麵當晚餐。"


def chats(server: ModelServer) -> list[Recorded]:
    return [r for r in server.requests if not r.messages[0]["content"].startswith(
        ("You keep the memory", "Shorten this"))]


def system_of(rec: Recorded) -> str:
    return rec.messages[0]["content"]


def window_of(rec: Recorded) -> str:
    return "\n".join(m["content"] for m in rec.messages[1:])


async def conv_of(svc: ChatService, **kw: Any) -> int:
    return await svc.store.conversation_id(svc.conversation_ref(incoming("x", **kw)))


async def fill(svc: ChatService, conv: int, n: int, text: str, user: str = "1") -> None:
    """`n` stored exchanges, as the service stores them (indexed in the same transaction)."""
    ref_key = f"console:{user}@dm"
    for i in range(n):
        await svc.store.save_exchange(conv, f"{text} ({i})", f"Sounds good ({i}).", AuditRecord(
            platform="console", user_id=user, chat_id=f"dm-{user}", conversation=ref_key,
            user_input=text))


async def index_rows(db_url: str, conv: int) -> tuple[int, int]:
    """(words-index rows, vectors) of one conversation, read from the database itself."""
    if db_url.startswith("sqlite"):
        async with aiosqlite.connect(db_url.removeprefix("sqlite:///")) as db:
            cur = await db.execute("SELECT count(*) FROM recall_fts WHERE conv = ?",
                                   (f"c{conv}",))
            words = (await cur.fetchone())[0]  # type: ignore[index]
            cur = await db.execute("SELECT count(*) FROM recall_vectors WHERE "
                                   "conversation_id = ?", (conv,))
            return int(words), int((await cur.fetchone())[0])  # type: ignore[index]
    conn = await asyncpg.connect(db_url)  # its query parameters become server settings
    try:
        words = await conn.fetchval("SELECT count(*) FROM recall_terms WHERE "
                                    "conversation_id = $1", conv)
        # The postings the search reads follow the tsvectors (triggers), deletions too.
        assert await conn.fetchval("SELECT count(DISTINCT message_id) FROM recall_postings "
                                   "WHERE conversation_id = $1", conv) == await conn.fetchval(
            "SELECT count(*) FROM recall_terms WHERE conversation_id = $1"
            " AND length(terms) > 0", conv)
        vectors = await conn.fetchval("SELECT count(*) FROM recall_vectors WHERE "
                                      "conversation_id = $1", conv)
        return int(words), int(vectors)
    finally:
        await conn.close()


@pytest.mark.parametrize(("fact", "filler", "question", "answer_words"), [
    ("By the way, my sister moved to Tainan last spring.", FILLER_EN,
     "Where does my sister live now?", "Tainan"),
    ("我妹妹去年春天搬到台南了。", FILLER_ZH, "我妹妹現在住在哪裡？", "台南"),
], ids=["english", "chinese"])
async def test_a_fact_200_turns_back_reaches_the_prompt_by_words(
    model_server: ModelServer, make_settings: SettingsFactory, fact: str, filler: str,
    question: str, answer_words: str,
) -> None:
    settings = make_settings(CONTEXT_TOKENS=1024, REPLY_TOKENS=256, MEMORY_STRATEGY="truncate")
    budget = settings.prompt_budget
    async with open_service(settings) as svc:
        await ask(svc, fact)
        conv = await conv_of(svc)
        await fill(svc, conv, 200, filler)
        reply = await ask(svc, question)
        memory = await ask(svc, "/memory")
        audit = [r for r in await svc.store.audit_log(5) if r["kind"] == "chat"][-1]
    rec = chats(model_server)[-1]
    assert reply  # the user got an answer
    # The fact is in the one system message's recall section, not in the window.
    assert fact in system_of(rec) and "## Recalled messages" in system_of(rec)
    assert fact not in window_of(rec)
    assert system_of(rec).index("## Recalled messages") > 0
    assert audit["recalled"] >= 1 and audit["history_messages"] > 0
    # Within the budget by the bot's estimate and by the server's own count.
    assert count_messages(rec.messages) <= budget
    assert rec.prompt_tokens <= budget
    assert answer_words in memory and "Recalled for the last reply" in memory


async def test_a_fact_reaches_the_prompt_by_meaning_alone(
    model_server: ModelServer, make_settings: SettingsFactory,
) -> None:
    model_server.models.append(EMBED)
    same = [1.0] + [0.0] * 31
    # No word in common: only the stand-in's vectors make them similar.
    model_server.embeddings.phrases = {"zebra crossing": same, "pedestrian stripes": same}
    fact = "I nearly slipped on the zebra crossing outside the bakery."
    settings = make_settings(CONTEXT_TOKENS=1024, REPLY_TOKENS=256, MEMORY_STRATEGY="truncate",
                             EMBED_MODEL=EMBED)
    async with open_service(settings) as svc:
        await ask(svc, fact)
        conv = await conv_of(svc)
        await fill(svc, conv, 200, FILLER_EN)
        svc.recaller.stored(conv)  # the backlog, as after any exchange
        async with asyncio.timeout(30):
            await svc.recaller.wait_idle()
        words_only = await svc.store.recall_search(conv, ["pedestrian", "stripe"], 10**9, 5)
        await ask(svc, "Were those pedestrian stripes repainted?")
        async with asyncio.timeout(30):
            await svc.recaller.wait_idle()
        _, vectors = await index_rows(settings.DATABASE_URL, conv)
    rec = chats(model_server)[-1]
    assert words_only == []  # words alone could not find it
    assert fact in system_of(rec) and fact not in window_of(rec)
    assert vectors == 404  # every stored message has its vector
    embeds = model_server.embeddings.requests
    # Stored messages go in batches (a list of inputs); the turn embeds only the question.
    assert any(isinstance(r["input"], list) and len(r["input"]) > 1 for r in embeds)
    q = "Were those pedestrian stripes repainted?"
    assert [r["input"] for r in embeds[-2:]] == [[q], [q, f"You said: {q}"]]


async def test_recall_never_crosses_users_or_places(
    model_server: ModelServer, make_settings: SettingsFactory, db_url: str,
) -> None:
    settings = make_settings(CONTEXT_TOKENS=1024, REPLY_TOKENS=256, MEMORY_STRATEGY="truncate",
                             DB_POOL_SIZE=8)
    secret = "My garage door code is 4417, keep it safe."
    # Two stores on one database (on PostgreSQL: two pools, as two processes have).
    async with open_service(settings) as one, open_service(settings) as two:
        await ask(two, secret, user="2")  # another user
        await ask(two, secret, user="1", place="group-9")  # the same user, another place
        await ask(one, "I painted the fence on Sunday.", user="1")
        conv = await conv_of(one, user="1")
        await fill(one, conv, 120, FILLER_EN)
        await ask(one, "What is my garage door code?", user="1")
    rec = chats(model_server)[-1]
    assert "4417" not in system_of(rec) and "4417" not in window_of(rec)
    assert rec.messages[-1]["content"] == "What is my garage door code?"


async def test_reset_forget_and_forget_n_remove_index_entries_vectors_and_notes(
    model_server: ModelServer, make_settings: SettingsFactory,
) -> None:
    model_server.models.append(EMBED)
    settings = make_settings(MEMORY_STRATEGY="truncate", EMBED_MODEL=EMBED)
    async with open_service(settings) as svc:
        await ask(svc, "/remember I am vegetarian")
        await ask(svc, "/remember My cat is called Miso")
        await ask(svc, "hello there")
        conv = await conv_of(svc)
        async with asyncio.timeout(30):
            await svc.recaller.wait_idle()
        before = await index_rows(settings.DATABASE_URL, conv)
        listed = await ask(svc, "/memory")
        gone = await ask(svc, "/forget 1")
        await ask(svc, "what do I eat?")
        after_forget_n = system_of(chats(model_server)[-1])
        reset = await ask(svc, "/reset")
        after_reset = await index_rows(settings.DATABASE_URL, conv)
        notes_after_reset = await svc.store.notes(conv)
        # forget (the operator's command) on a fresh exchange of another user
        await ask(svc, "my bike is blue", user="7")
        other = await conv_of(svc, user="7")
        async with asyncio.timeout(30):
            await svc.recaller.wait_idle()
        await ask(svc, "/remember bikes", user="7")
        other_before = await index_rows(settings.DATABASE_URL, other)
    assert before == (2, 2)
    assert "1. I am vegetarian" in listed and "2. My cat is called Miso" in listed
    assert "Deleted note 1" in gone
    assert "vegetarian" not in after_forget_n and "My cat is called Miso" in after_forget_n
    assert "forgot" in reset
    assert after_reset == (0, 0) and notes_after_reset == []
    assert other_before == (2, 2)
    assert await operator_commands.forget(settings, "console:7") == 0
    assert await index_rows(settings.DATABASE_URL, other) == (0, 0)
    store = open_store(settings.DATABASE_URL, pool_size=2)
    await store.open()
    try:
        assert await store.notes(other) == []
    finally:
        await store.close()


async def test_notes_reach_every_prompt_and_have_limits(
    model_server: ModelServer, make_settings: SettingsFactory,
) -> None:
    async with open_service(make_settings()) as svc:
        empty = await ask(svc, "/remember")
        noted = await ask(svc, "/remember I'm allergic to peanuts")
        too_long = await ask(svc, "/remember " + "x" * (MAX_NOTE_CHARS + 1))
        await ask(svc, "what should I cook?")
        for i in range(MAX_NOTES - 1):
            await ask(svc, f"/remember note number {i}")
        full = await ask(svc, "/remember one too many")
        bad = await ask(svc, "/forget 99")
        not_a_number = await ask(svc, "/forget peanuts")
        conv = await conv_of(svc)
        stored = await svc.store.notes(conv)
    assert "Tell me what to remember" in empty
    assert "Noted (note 1)" in noted
    assert f"at most {MAX_NOTE_CHARS}" in too_long
    assert f"already have {MAX_NOTES} notes" in full
    assert "There is no note 99" in bad and "Which note?" in not_a_number
    assert len(stored) == MAX_NOTES and stored[0].text == "I'm allergic to peanuts"
    system = system_of(chats(model_server)[-1])
    assert "## Notes the user asked you to keep\n1. I'm allergic to peanuts" in system


@pytest.mark.parametrize("fault", ["http500", "hang"])
async def test_an_embedding_server_that_fails_leaves_replies_working_by_words(
    model_server: ModelServer, make_settings: SettingsFactory, fault: str,
) -> None:
    model_server.models.append(EMBED)
    settings = make_settings(CONTEXT_TOKENS=1024, REPLY_TOKENS=256, MEMORY_STRATEGY="truncate",
                             EMBED_MODEL=EMBED, EMBED_TIMEOUT=0.5, LLM_TIMEOUT=1.0,
                             LLM_STALL_TIMEOUT=1.0)
    fact = "Note to self: the garage door code is 4417."
    async with open_service(settings) as svc:
        model_server.embeddings.fault = fault
        await ask(svc, fact)
        conv = await conv_of(svc)
        await fill(svc, conv, 150, FILLER_EN)
        async with asyncio.timeout(10):
            reply = await ask(svc, "What was the code for the garage again?")
            await svc.recaller.wait_idle()
        audit = [r for r in await svc.store.audit_log(5) if r["kind"] == "chat"][-1]
    assert reply and "⚠️" not in reply
    assert audit["status"] == "ok" and audit["recalled"] >= 1
    assert fact in system_of(chats(model_server)[-1])
    assert model_server.embeddings.requests  # it was asked, and failed


async def test_reindex_builds_what_an_old_database_lacks_interrupted_and_resumed(
    model_server: ModelServer, make_settings: SettingsFactory, db_url: str,
) -> None:
    model_server.models.append(EMBED)
    # A database made before recall: the migrations up to 006, rows written then.
    pre = [m for m in MIGRATIONS if m.name < "009_recall"]
    if db_url.startswith("sqlite"):
        from storage.sqlite_store import migrate as sqlite_migrate
        path = db_url.removeprefix("sqlite:///")
        import os
        os.makedirs(os.path.dirname(path), exist_ok=True)
        async with aiosqlite.connect(path, isolation_level=None) as db:
            await sqlite_migrate(db, pre)
            await _old_rows(db, SQLITE.name)
    else:
        from storage.postgres_store import migrate as pg_migrate
        conn = await asyncpg.connect(db_url)  # search_path and all, as the store connects
        try:
            await pg_migrate(conn, pre)
            await _old_rows(conn, POSTGRES.name)
        finally:
            await conn.close()
    settings = make_settings(EMBED_MODEL=EMBED, DB_POOL_SIZE=6)
    store = open_store(db_url, pool_size=6)
    await store.open()  # applies 007 and 008: the rows stay, unindexed
    batches = 0

    def interrupt() -> None:
        nonlocal batches
        batches += 1
        if batches == 1:
            raise KeyboardInterrupt  # the operator pressed ^C after the first batch

    try:
        assert await store.table_counts() == {**{t: 0 for t in await store.table_counts()},
                                              "conversations": 2, "messages": 2400,
                                              "audit": 0}
        assert await store.count_missing(None) == 2400
        import bot.reindex as reindex_module
        reindex_module.WORDS_BATCH = 1000
        out = io.StringIO()
        with pytest.raises(KeyboardInterrupt):
            await reindex(settings, store, stream=out, after_batch=interrupt)
        assert await store.count_missing(None) == 1400  # the first batch was kept
        code = await reindex(settings, store, "console:a", stream=out)
        assert code == 0
        conv_a = (await store.user_conversations("console", "a"))[0]
        conv_b = (await store.user_conversations("console", "b"))[0]
        assert await store.count_missing(None, [conv_a]) == 0
        assert await store.count_missing(EMBED, [conv_a]) == 0
        assert await store.count_missing(EMBED, [conv_b]) == 1200  # --user: only a's
        model_server.embeddings.fault = "http500"
        assert await reindex(settings, store, stream=out) == 1  # b's embeddings fail
        assert await store.count_missing(None) == 0  # words were all done
        model_server.embeddings.fault = None
        asked = len(model_server.embeddings.requests)
        assert await reindex(settings, store, stream=out) == 0
        resumed = model_server.embeddings.requests[asked:]
        assert sum(len(r["input"]) for r in resumed) == 1200  # only what was missing
        assert await store.count_missing(EMBED) == 0
        hits = await store.recall_search(conv_b, ["tainan"], 10**9, 5)
        assert len(hits) == 1
    finally:
        await store.close()
        reindex_module.WORDS_BATCH = 2000
    text = out.getvalue()
    assert "words index:" in text and "embeddings (all-minilm)" in text
    assert "run reindex again to resume" in text


async def _old_rows(conn: Any, dialect: str) -> None:
    """Two conversations of 1,200 messages each, as the bot of 006 wrote them."""
    t = "2026-01-01T00:00:00.000Z"
    sqlite = dialect == SQLITE.name

    async def run(sql: str, *args: Any) -> None:
        if sqlite:
            await conn.execute(sql.replace("$1", "?").replace("$2", "?").replace("$3", "?")
                               .replace("$4", "?"), args)
        else:
            await conn.execute(sql, *args)

    for key, user in (("console:a@dm", "a"), ("console:b@dm", "b")):
        await run("INSERT INTO conversations (key, platform, user_id, place, created_at) "
                  "VALUES ($1, 'console', $2, 'dm', $3)", key, user, t)
    rows = [(1 + n % 2, "user" if n % 4 < 2 else "assistant",
             "My sister moved to Tainan." if n == 5 else f"filler message {n}", t)
            for n in range(2400)]
    sql = "INSERT INTO messages (conversation_id, role, content, created_at) VALUES "
    if sqlite:
        await conn.execute("BEGIN")
        await conn.executemany(sql + "(?, ?, ?, ?)", rows)
        await conn.execute("COMMIT")
    else:
        await conn.executemany(sql + "($1, $2, $3, $4)", rows)


async def test_the_summary_reaches_every_prompt_whole_and_is_not_embedded(
    model_server: ModelServer, make_settings: SettingsFactory,
) -> None:
    # bot/recaller.py: one running summary, always in the prompt, so no vector for it;
    # the messages it folded are still recalled by their own words and vectors.
    model_server.models.append(EMBED)
    settings = make_settings(CONTEXT_TOKENS=1024, REPLY_TOKENS=256, MEMORY_STRATEGY="summarize",
                             EMBED_MODEL=EMBED)
    summary = "The user is a nurse in Hualien who keeps two cats, Miso and Pepper."
    fact = "By the way, my sister moved to Tainan last spring."
    async with open_service(settings) as svc:
        await ask(svc, fact)
        conv = await conv_of(svc)
        await fill(svc, conv, 120, FILLER_EN)
        context = await svc.store.turn_context(conv, "console", "1", 10**6, with_summary=False)
        # As the summariser writes it: everything but the last 40 messages folded in.
        assert await svc.store.save_summary(conv, summary, context.history[-41].id)
        svc.recaller.stored(conv)
        async with asyncio.timeout(30):
            await svc.recaller.wait_idle()
        await ask(svc, "Where does my sister live now?")
        async with asyncio.timeout(30):
            await svc.recaller.wait_idle()
        _, vectors = await index_rows(settings.DATABASE_URL, conv)
        stored = await svc.store.count_messages(conv)
    rec = chats(model_server)[-1]
    assert summary in system_of(rec)  # the gist, whole, in the prompt
    assert fact in system_of(rec) and "## Recalled messages" in system_of(rec)  # exact words
    assert fact not in window_of(rec)
    sent = [t for r in model_server.embeddings.requests for t in (
        r["input"] if isinstance(r["input"], list) else [r["input"]])]
    assert summary not in sent and fact in sent  # messages embedded, the summary not
    assert vectors == stored  # one vector per message, none for the summary


async def test_recall_starts_where_the_personas_window_ends(
    tmp_path: Any, model_server: ModelServer, make_settings: SettingsFactory,
) -> None:
    # A persona whose system prompt is far longer than SYSTEM_PROMPT: the window the
    # prompt keeps is shorter than SYSTEM_PROMPT's would be, and recall must start
    # where the persona's window ends, or a message between the two ends is in
    # neither the window nor the recall block.
    long_system = "You are a careful, friendly assistant. " * 40
    (tmp_path / "personas.toml").write_text(f'[long]\nsystem = "{long_system}"\n',
                                            encoding="utf-8")
    fact = "By the way, my sister moved to Tainan last spring."
    settings = make_settings(CONTEXT_TOKENS=2048, REPLY_TOKENS=256, RECALL_TOKENS=110,
                             MEMORY_STRATEGY="truncate",
                             PERSONAS_FILE=str(tmp_path / "personas.toml"))
    lost = []
    async with open_service(settings) as svc:
        for n in range(20, 60, 2):
            user = str(100 + n)
            await ask(svc, "/persona long", user=user)
            await ask(svc, fact, user=user)
            conv = await conv_of(svc, user=user)
            await fill(svc, conv, n, FILLER_EN, user=user)
            await ask(svc, "Where does my sister live now?", user=user)
            rec = chats(model_server)[-1]
            assert system_of(rec).startswith(long_system.strip())
            if fact not in system_of(rec) and fact not in window_of(rec):
                lost.append(n)
    assert lost == []
