"""Embeddings from the model server: Ollama /api/embed or OpenAI-compatible /v1/embeddings.

Batched (one request carries a list of inputs), bounded by a timeout, and
never an error for the turn: any failure returns None and recall goes on with
words alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the client libraries load only for the kind in use (openai: ~1 s)
    import ollama
    import openai

log = logging.getLogger(__name__)

Kind = Literal["ollama", "openai"]
DEFAULT_BATCH = 64


class Embedder:
    """Vectors for texts; `embed` returns None when the server can't give them."""

    def __init__(self, kind: Kind, model: str, *, host: str | None = None,
                 base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 10.0, batch: int = DEFAULT_BATCH) -> None:
        self.kind = kind
        self.model = model
        self.timeout = timeout
        self.batch = max(1, batch)
        self.failures = 0
        self._ollama: ollama.AsyncClient | None = None
        self._openai: openai.AsyncOpenAI | None = None
        if kind == "ollama":
            import ollama

            self._ollama = ollama.AsyncClient(host=host, timeout=timeout)
        else:
            import openai

            self._openai = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "not-needed",
                                              max_retries=0, timeout=timeout)

    async def embed(self, texts: Sequence[str]) -> list[list[float]] | None:
        """One vector per text, in order; None on any failure or timeout."""
        if not texts:
            return []
        out: list[list[float]] = []
        try:
            async with asyncio.timeout(self.timeout):
                for start in range(0, len(texts), self.batch):
                    chunk = list(texts[start:start + self.batch])
                    vectors = await self._request(chunk)
                    if len(vectors) != len(chunk):
                        raise ValueError(f"{len(vectors)} vectors for {len(chunk)} inputs")
                    out.extend(vectors)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            log.warning("embedding %d text(s) with %s failed: %s: %s", len(texts), self.model,
                        type(exc).__name__, exc)
            return None
        return out

    async def embed_one(self, text: str) -> list[float] | None:
        got = await self.embed([text])
        return got[0] if got else None

    async def _request(self, texts: list[str]) -> list[list[float]]:
        if self._ollama is not None:
            response = await self._ollama.embed(model=self.model, input=texts)
            return [list(v) for v in response.embeddings]
        assert self._openai is not None
        created = await self._openai.embeddings.create(model=self.model, input=texts)
        ordered = sorted(created.data, key=lambda d: d.index)
        return [list(d.embedding) for d in ordered]

    async def close(self) -> None:
        if self._openai is not None:
            await self._openai.close()
        if self._ollama is not None:
            client = getattr(self._ollama, "_client", None)
            if client is not None:
                await client.aclose()
