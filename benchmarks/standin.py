"""The model stand-in: a `Provider` that streams a fixed 50-token reply instantly."""

from __future__ import annotations

import asyncio
import contextvars
import random
import time
from collections.abc import AsyncGenerator

from bot.providers.base import NO_OPTIONS, CallOptions, ModelInfo, Usage

MODEL = "bench-model"
REPLY_TOKENS = 50
# 50 one-token words, so that the reply is also 50 tokens by the bot's own estimate.
_WORDS = ("Sure", " here", " is", " a", " short", " answer", " about", " that", ",", " with",
          " some", " detail")
REPLY: tuple[str, ...] = tuple(_WORDS[i % len(_WORDS)] for i in range(REPLY_TOKENS))


class InstantProvider:
    """Streams `REPLY` with no waiting at all; reports a cheap prompt-token count.

    The prompt count (characters ÷ 4) stands in for what a real server reports,
    so the core's calibration path runs as it would in production.
    """

    name = "standin"

    def __init__(self) -> None:
        self.calls = 0

    async def stream(
        self, model: str, messages: list[dict[str, str]], *, num_ctx: int, max_tokens: int,
        options: CallOptions = NO_OPTIONS,
    ) -> AsyncGenerator[str | Usage, None]:
        self.calls += 1
        for token in REPLY:
            yield token
        yield Usage(prompt_tokens=sum(len(m["content"]) for m in messages) // 4 or 1,
                    completion_tokens=REPLY_TOKENS)

    async def list_models(self) -> list[str]:
        return [MODEL]

    async def model_info(self, model: str) -> ModelInfo:
        return ModelInfo(context_length=4096)

    async def count_tokens(self, model: str, text: str) -> int | None:
        return None

    async def close(self) -> None:
        return None


# Each exchange puts a list here; the paced stand-in appends its own wait to it
# (the feed task sees the same list through its copy of the context).
MODEL_WAIT: contextvars.ContextVar[list[float]] = contextvars.ContextVar("model_wait")


class PacedProvider(InstantProvider):
    """The same reply after a model-like wait before the first token.

    Waits vary (uniformly, ±50%) so that conversations don't move in
    lockstep, and each wait is recorded for its own exchange, so overhead
    subtracts exactly that exchange's model time.
    """

    def __init__(self, first_token_s: float, seed: int = 7) -> None:
        super().__init__()
        self.first_token_s = first_token_s
        self._random = random.Random(seed)

    async def stream(
        self, model: str, messages: list[dict[str, str]], *, num_ctx: int, max_tokens: int,
        options: CallOptions = NO_OPTIONS,
    ) -> AsyncGenerator[str | Usage, None]:
        t0 = time.perf_counter()
        await asyncio.sleep(self.first_token_s * self._random.uniform(0.5, 1.5))  # the model
        box = MODEL_WAIT.get(None)
        if box is not None:
            box.append(time.perf_counter() - t0)
        async for item in super().stream(model, messages, num_ctx=num_ctx,
                                          max_tokens=max_tokens):
            yield item


async def own_time_s(samples: int = 2000) -> float:
    """Median seconds the stand-in itself takes to stream one whole reply."""
    provider = InstantProvider()
    messages = [{"role": "user", "content": "hello"}]
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        async for _item in provider.stream(MODEL, messages, num_ctx=4096, max_tokens=512):
            pass
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


async def first_token_s(samples: int = 2000) -> float:
    """Median seconds from asking the stand-in to its first token."""
    provider = InstantProvider()
    messages = [{"role": "user", "content": "hello"}]
    times = []
    for _ in range(samples):
        stream = provider.stream(MODEL, messages, num_ctx=4096, max_tokens=512)
        t0 = time.perf_counter()
        await anext(stream)
        times.append(time.perf_counter() - t0)
        await stream.aclose()
    times.sort()
    return times[len(times) // 2]
