"""Recall on the turn: older messages by words (and meaning), fitted into RECALL_TOKENS.

The words side asks the store's index (storage/recall_index.py) for the new
message's terms, within this conversation and only among messages older than
the recent window. The meaning side, when EMBED_MODEL is set, embeds the new
message (the one embedding on the turn's path, under EMBED_TIMEOUT: slow or
down means words alone) and compares it with the conversation's vectors
cached in memory. Stored messages are embedded after their exchange is
stored, in the background (batched, in the model slots behind replies).

The summary is not embedded, on purpose: there is one running summary per
conversation, and whenever it exists (MEMORY_STRATEGY=summarize) it goes into
every prompt whole, before the recalled block, so ranking it by meaning could
only ever re-add what the prompt already carries. The messages it folded stay
stored, indexed and embedded, and recall reaches them by their exact words.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from bot.embeddings import Embedder
from bot.recall import Recalled, VectorCache, fit_recalled, query_terms, reciprocal_rank_fusion
from bot.recall.vectors import Loader, to_blob
from bot.settings import Settings
from bot.slots import ModelSlots
from bot.store import Store
from bot.tokens import TokenFactors

log = logging.getLogger(__name__)

CANDIDATES = 50  # per ranking, before fusion
FUSED_HITS = 25  # hits handed to fitting (the top 25 of the retrieval research)
EMBED_BATCH = 64  # stored messages per background embedding request
EMBED_PASS = 512  # at most this many messages embedded per pass (the rest: next pass)
LAST_KEPT = 1000  # conversations whose last recall /memory can show
NOTHING = Recalled([], "", 0, [])


@dataclass(frozen=True, slots=True)
class LastRecall:
    """What went into a conversation's last prompt by recall (for /memory)."""

    recalled: Recalled
    by_meaning: bool


def make_embedder(settings: Settings, timeout: float) -> Embedder | None:
    if not settings.EMBED_MODEL:
        return None
    key = settings.OPENAI_API_KEY.get_secret_value() if settings.OPENAI_API_KEY else None
    return Embedder("ollama" if settings.embed_provider == "ollama" else "openai",
                    settings.EMBED_MODEL, host=settings.OLLAMA_HOST,
                    base_url=settings.OPENAI_BASE_URL, api_key=key, timeout=timeout,
                    batch=EMBED_BATCH)


class Recaller:
    """One per service: the vector cache, the embedders, the last recall per conversation."""

    def __init__(self, settings: Settings, store: Store, slots: ModelSlots) -> None:
        self.settings = settings
        self.store = store
        self.slots = slots
        self.cache = VectorCache()
        # The turn's embedding has a short timeout; the background's a model call's.
        self.query_embedder = make_embedder(settings, settings.EMBED_TIMEOUT)
        self.store_embedder = make_embedder(settings, settings.LLM_TIMEOUT)
        self._last: OrderedDict[int, LastRecall] = OrderedDict()
        self._embedding: dict[int, asyncio.Task[None]] = {}  # conversation → its pass
        self._again: set[int] = set()  # conversations with messages stored during a pass
        self._embedded_upto: dict[int, int] = {}  # conversation → newest id looked at

    @property
    def on(self) -> bool:
        return self.settings.recall_on

    @property
    def model(self) -> str:
        return self.settings.EMBED_MODEL

    # -- on the turn
    async def recall(self, conversation_id: int, text: str, before_id: int, budget: int,
                     counter: Callable[[str], int],
                     factors: TokenFactors | None = None) -> Recalled:
        """The recalled block for `text` among messages older than before_id, within
        `budget` tokens; nothing (never an error) when recall is off or fails."""
        if not self.on or budget <= 0 or before_id <= 1:
            return NOTHING
        by_meaning = False
        try:
            terms = query_terms(text)
            words_task = self.store.recall_search(conversation_id, terms, before_id,
                                                  CANDIDATES)
            if self.query_embedder is not None:
                words, similar = await asyncio.gather(
                    words_task, self._similar(conversation_id, text, before_id))
            else:
                words, similar = await words_task, []
            by_meaning = bool(similar)
            rankings = [[i for i, _ in words]]
            if similar:
                rankings.append(similar)
            fused = [i for i, _ in reciprocal_rank_fusion(rankings, limit=FUSED_HITS)]
            if not fused:
                result = NOTHING
            else:
                arounds = await self.store.recall_around(conversation_id, fused, before_id)
                result = fit_recalled(arounds, budget, counter=counter, factors=factors)
        except Exception:
            log.warning("recall failed for conversation %s; the window alone", conversation_id,
                        exc_info=True)
            result = NOTHING
        self._remember(conversation_id, LastRecall(result, by_meaning))
        return result

    async def _similar(self, conversation_id: int, text: str, before_id: int) -> list[int]:
        """Ids most similar to `text` by the cached vectors ([] when embedding fails)."""
        assert self.query_embedder is not None
        refresh = self.cache.refresh(conversation_id, self.model, self._loader(conversation_id))
        vector, _ = await asyncio.gather(self.query_embedder.embed_one(text), refresh)
        if vector is None:
            return []
        # Only similarities that stand out from the conversation's background: a
        # model that can't tell the language's sentences apart adds nothing, and
        # its near-random top hits would displace strong word hits in the fusion.
        return [i for i, _ in self.cache.search(conversation_id, vector, before_id, CANDIDATES,
                                                model=self.model, outliers_only=True)]

    def _loader(self, conversation_id: int) -> Loader:
        async def load(after_id: int) -> list[tuple[int, bytes]]:
            return await self.store.vectors_since(conversation_id, self.model, after_id)
        return load

    def _remember(self, conversation_id: int, last: LastRecall) -> None:
        self._last[conversation_id] = last
        self._last.move_to_end(conversation_id)
        while len(self._last) > LAST_KEPT:
            self._last.popitem(last=False)

    def last(self, conversation_id: int) -> LastRecall | None:
        return self._last.get(conversation_id)

    # -- after the exchange is stored
    def stored(self, conversation_id: int) -> None:
        """New messages were stored: embed them in the background (one pass per
        conversation at a time; messages stored meanwhile get the next pass)."""
        if self.store_embedder is None or not self.on:
            return
        running = self._embedding.get(conversation_id)
        if running is not None and not running.done():
            self._again.add(conversation_id)
            return
        task = asyncio.create_task(self._embed_pass(conversation_id))
        self._embedding[conversation_id] = task
        task.add_done_callback(lambda t, c=conversation_id: self._pass_done(c, t))

    def _pass_done(self, conversation_id: int, task: asyncio.Task[None]) -> None:
        if self._embedding.get(conversation_id) is task:
            del self._embedding[conversation_id]
        if conversation_id in self._again and not task.cancelled():
            self._again.discard(conversation_id)
            self.stored(conversation_id)

    async def _embed_pass(self, conversation_id: int) -> None:
        assert self.store_embedder is not None
        try:
            after = self._embedded_upto.get(conversation_id, 0)
            todo = await self.store.messages_without_vectors(
                self.model, after, EMBED_PASS, [conversation_id])
            if not todo:
                return
            async with self.slots.background():  # replies go first
                vectors = await self.store_embedder.embed([t[2] for t in todo])
            if vectors is None:
                return  # tried again after the next exchange
            await self.store.save_vectors(self.model, [
                (mid, cid, to_blob(v)) for (mid, cid, _), v in zip(todo, vectors, strict=True)])
            self._embedded_upto[conversation_id] = todo[-1][0]
            if len(todo) == EMBED_PASS:
                self._again.add(conversation_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("embedding the messages of conversation %s failed", conversation_id,
                        exc_info=True)

    async def wait_idle(self) -> None:
        """Until no embedding pass runs (tests, benchmarks)."""
        while self._embedding:
            await asyncio.gather(*self._embedding.values(), return_exceptions=True)

    def forget(self, conversation_id: int) -> None:
        """After /reset or forget: nothing cached of it may come back."""
        task = self._embedding.pop(conversation_id, None)
        if task is not None:
            task.cancel()
        self._again.discard(conversation_id)
        self._embedded_upto.pop(conversation_id, None)
        self.cache.drop(conversation_id)
        self._last.pop(conversation_id, None)

    async def aclose(self) -> None:
        tasks = list(self._embedding.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for embedder in (self.query_embedder, self.store_embedder):
            if embedder is not None:
                with contextlib.suppress(Exception):
                    await embedder.close()
