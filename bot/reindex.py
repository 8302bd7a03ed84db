"""`python -m bot reindex`: build the recall index for stored messages that lack it.

Words first (every message), then embeddings when EMBED_MODEL is set. Each
batch commits by itself and the next run looks only for what is still
missing, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from bot.progress import progress
from bot.recall.vectors import to_blob
from bot.recaller import make_embedder
from bot.settings import Settings
from bot.store import Store

WORDS_BATCH = 2000
EMBED_BATCH = 256


async def reindex(settings: Settings, store: Store, user: str | None = None, *,
                  stream: TextIO | None = None,
                  after_batch: Callable[[], None] | None = None) -> int:
    """Index (and embed) what lacks it; 0 when done, 1 when embeddings failed (run again)."""
    out = stream or sys.stderr
    conversations: list[int] | None = None
    if user is not None:
        platform, _, user_id = user.partition(":")
        conversations = await store.user_conversations(platform, user_id)
    words = await store.count_missing(None, conversations)
    with progress("words index", words, unit="messages", stream=out) as bar:
        after = 0
        while True:
            indexed, after = await store.index_unindexed(after, WORDS_BATCH, conversations)
            if not indexed:
                break
            bar.advance(indexed)
            if after_batch is not None:
                after_batch()
    embedder = make_embedder(settings, settings.LLM_TIMEOUT)
    if embedder is None:
        print(f"words index: {words:,} messages indexed (EMBED_MODEL is empty: no embeddings)",
              file=out)
        return 0
    model = settings.EMBED_MODEL
    try:
        missing = await store.count_missing(model, conversations)
        with progress(f"embeddings ({model})", missing, unit="messages",
                      stream=out) as bar:
            after = 0
            while todo := await store.messages_without_vectors(model, after, EMBED_BATCH,
                                                               conversations):
                vectors = await embedder.embed([t[2] for t in todo])
                if vectors is None:
                    print(f"error: the embedding server did not answer for {model}; what is "
                          "done is kept: run reindex again to resume", file=out)
                    return 1
                await store.save_vectors(model, [(mid, cid, to_blob(v)) for (mid, cid, _), v
                                                 in zip(todo, vectors, strict=True)])
                after = todo[-1][0]
                bar.advance(len(todo))
                if after_batch is not None:
                    after_batch()
    finally:
        await embedder.close()
    print(f"done: {words:,} messages indexed, {missing:,} embedded with {model}", file=out)
    return 0
