"""Property: the prompt with recall never exceeds the budget by the server's own count.

Over generated conversations (lengths, English, Chinese and mixed text, notes,
a summary or none), the prompt the model stand-in receives is within the
budget as the stand-in counts it (its own BPE-like tokenizer and chat
template, not the bot's estimate), and the recalled block within RECALL_TOKENS.
One service and one stand-in serve every example, each example a new user,
so what the bot learned of the server's counts carries over as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.app import open_service
from bot.memory import SHORTEN_INSTRUCTIONS, SUMMARY_INSTRUCTIONS
from bot.records import AuditRecord
from bot.service import ChatService
from bot.settings import Settings, load_settings
from tests.conftest import incoming
from tests.fakes.model_server import ModelServer

EN = ("sister", "moved", "Tainan", "garage", "code", "4417", "ramen", "dog", "Mochi",
      "the", "quarterly", "report", "dinner", "pasta", "weekend", "trip", "rent")
ZH = ("妹妹", "搬到", "台南", "車庫", "密碼", "拉麵", "小狗", "麻糬", "報告", "晚餐", "週末",
      "旅行", "房租", "了", "的", "，", "。")
WORDS = st.sampled_from(EN + ZH + ("🙂", "ŝ", "\u200b", "https://example.com/a?b=c"))
TEXT = st.one_of(st.lists(WORDS, min_size=1, max_size=60).map(" ".join),
                 st.lists(WORDS, min_size=1, max_size=80).map("".join),
                 st.text(min_size=1, max_size=300).filter(str.strip))
# A question always has something to answer (a blank one gets a notice, not the model).
QUESTION = st.tuples(st.lists(st.sampled_from(EN + ZH[:13]), min_size=1, max_size=12),
                     st.text(max_size=200)).map(lambda p: " ".join(p[0]) + p[1])


@dataclass
class World:
    runner: asyncio.Runner
    server: ModelServer
    service: ChatService
    settings: Settings
    users: int = 0
    recalled: int = 0  # examples whose prompt carried a recalled block


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with asyncio.Runner() as runner, contextlib.ExitStack() as stack:
        server = ModelServer()
        runner.run(server.__aenter__())
        stack.callback(lambda: runner.run(server.__aexit__(None, None, None)))
        config = load_settings(None, **{
            "DATABASE_URL": f"sqlite:///{tmp_path / 'bot.db'}", "OLLAMA_HOST": server.url,
            "LLM_RETRIES": 0, "RATE_LIMIT_PER_MINUTE": 0, "LLM_TIMEOUT": 10.0,
            "CONTEXT_TOKENS": 1024, "REPLY_TOKENS": 256, "MEMORY_STRATEGY": "summarize",
            "RECALL": "on"})
        opened = open_service(config)
        service = runner.run(opened.__aenter__())
        stack.callback(lambda: runner.run(opened.__aexit__(None, None, None)))
        world = World(runner, server, service, config)
        yield world
    # The property held with recall at work, not only on short histories.
    assert world.recalled > 0


async def _example(w: World, history: list[tuple[str, str]], notes: list[str],
                   summary: str | None, question: str) -> tuple[Any, int, int]:
    w.users += 1
    user = f"u{w.users}"
    svc = w.service
    conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x", user=user)))
    for said, replied in history:
        await svc.store.save_exchange(conv, said, replied, AuditRecord(
            platform="console", user_id=user, chat_id=f"dm-{user}",
            conversation=f"console:{user}@dm", user_input=said))
    for note in notes:
        await svc.store.add_note(conv, note)
    if summary is not None and history:
        newest = (await svc.store.turn_context(conv, "console", user, 2, with_summary=False)
                  ).history[-1].id
        await svc.store.save_summary(conv, summary, newest - 2)
    seen = len(w.server.requests)
    reply = await svc.handle(incoming(question, user=user))
    async with contextlib.aclosing(reply.deltas()) as deltas:
        async for _ in deltas:
            pass
    last = svc.recaller.last(conv)
    sent = [r for r in w.server.requests[seen:] if not r.messages[0]["content"].startswith(
        (SUMMARY_INSTRUCTIONS[:40], SHORTEN_INSTRUCTIONS[:30]))]  # the chat call, not summaries
    return sent[-1] if sent else None, last.recalled.tokens if last else 0, len(sent)


@given(history=st.lists(st.tuples(TEXT, TEXT), max_size=40), notes=st.lists(TEXT, max_size=3),
       summary=st.none() | TEXT, question=QUESTION)
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_prompt_with_recall_never_exceeds_the_budget_by_the_servers_count(
        world: World, history: list[tuple[str, str]], notes: list[str], summary: str | None,
        question: str) -> None:
    rec, recalled_tokens, calls = world.runner.run(_example(world, history, notes, summary,
                                                            question))
    assert calls == 1 and rec is not None  # the question reached the model once
    assert rec.prompt_tokens <= world.settings.prompt_budget  # by the stand-in's own count
    assert recalled_tokens <= world.settings.recall_tokens
    if recalled_tokens and "## Recalled messages" in rec.messages[0]["content"]:
        world.recalled += 1
