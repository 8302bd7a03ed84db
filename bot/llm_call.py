"""One model call: retries before any text, timeouts, and cancellation.

The provider's stream runs in its own task feeding a queue, so that the
caller can wait with a deadline (first token, then a stall limit, and a
limit on the whole reply), and so
that shutdown can stop the call without tearing down the adapter's task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from bot.i18n import N_
from bot.providers.base import NO_OPTIONS, CallOptions, Provider, ProviderError, Usage

log = logging.getLogger(__name__)


class CallCancelled(Exception):
    """The call was stopped from outside (shutdown)."""


class CallStopped(CallCancelled):
    """The user stopped the reply (/stop); the model's connection was closed."""


@dataclass(frozen=True, slots=True)
class CallLimits:
    first_token: float  # seconds until the first text
    stall: float  # seconds between two pieces of text
    retries: int  # attempts after the first, only before any text
    backoff: float = 0.5  # first retry delay; doubles each time
    reply: float | None = None  # seconds the whole call may take (LLM_REPLY_TIMEOUT)


class _End:
    pass


class _Expired:
    """The wait for the model ran out (put in the queue by the one timer)."""


def _first_wait(backoff: float) -> Callable[[RetryCallState], Awaitable[None]]:
    """The first attempt ran outside tenacity: wait before tenacity's first one too."""

    async def wait_once(state: RetryCallState) -> None:
        if state.attempt_number == 1:
            await asyncio.sleep(backoff)

    return wait_once


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retryable


async def stream_reply(
    provider: Provider,
    model: str,
    messages: list[dict[str, Any]],
    *,
    num_ctx: int,
    max_tokens: int,
    limits: CallLimits,
    running: set[asyncio.Task[None]],
    options: CallOptions = NO_OPTIONS,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[str | Usage]:
    """Yield text deltas then one Usage; raise ProviderError or CallCancelled.

    `running` holds the feeding task while it runs, so that shutdown can
    cancel it. Past `limits.reply` seconds the call stops with a
    ProviderError of kind "reply_timeout" (the text so far stays shown).
    Setting `stop` ends the call at once with CallStopped, even while the model
    is still thinking: the feeding task is cancelled, which closes the stream
    and with it the connection (Ollama and OpenAI-compatible servers stop
    generating when it closes).
    """
    loop = asyncio.get_running_loop()
    deadline = None if limits.reply is None else loop.time() + limits.reply
    queue: asyncio.Queue[object] = asyncio.Queue()
    # One timer for the waits, not one per token: it re-arms itself from the time
    # the model last sent something, and puts _Expired in the queue once the wait
    # (first token, then stall, and the whole reply's limit) runs out.
    last = loop.time()  # when the model last sent something
    got_text = False
    timer: asyncio.TimerHandle | None = None

    def expires_at() -> float:
        at = last + (limits.stall if got_text else limits.first_token)
        return at if deadline is None else min(at, deadline)

    def check() -> None:
        nonlocal timer
        at = expires_at()
        if loop.time() < at:
            timer = loop.call_at(at, check)
        else:
            timer = None
            queue.put_nowait(_Expired())

    async def first_of(stream: AsyncIterator[str | Usage]) -> AsyncIterator[str | Usage]:
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise ProviderError(
                N_("The model returned an empty reply. Please try again."),
                detail="stream ended before any text", retryable=True,
            ) from None
        except BaseException:
            await stream.aclose()  # type: ignore[attr-defined]
            raise
        return _chain(first, stream)

    def attempt() -> AsyncIterator[str | Usage]:
        return provider.stream(model, messages, num_ctx=num_ctx, max_tokens=max_tokens,
                               options=options)

    async def open_stream() -> AsyncIterator[str | Usage]:
        try:
            return await first_of(attempt())
        except ProviderError as exc:
            if not (exc.retryable and limits.retries):
                raise
        # Retried only until the first text: a stream that showed text is
        # never started again (the user would see it twice). The retrying
        # machinery is built only once something failed.
        async for retry in AsyncRetrying(
            stop=stop_after_attempt(limits.retries),
            wait=wait_exponential(multiplier=limits.backoff, max=8),
            retry=retry_if_exception(_retryable),
            reraise=True,
            before=_first_wait(limits.backoff),
        ):
            with retry:
                return await first_of(attempt())
        raise AssertionError("unreachable")

    async def feed() -> None:
        nonlocal last
        try:
            stream = await open_stream()
            try:
                async for item in stream:
                    last = loop.time()
                    queue.put_nowait(item)
            finally:
                await stream.aclose()
            queue.put_nowait(_End())
        except asyncio.CancelledError:
            queue.put_nowait(CallCancelled())
            raise
        except ProviderError as exc:
            queue.put_nowait(exc)
        except Exception as exc:  # a provider bug must still end the turn clearly
            log.exception("model call failed unexpectedly")
            queue.put_nowait(ProviderError(
                N_("Something went wrong talking to the model. Please try again."),
                detail=f"{type(exc).__name__}: {exc}",
            ))

    task = asyncio.create_task(feed())
    running.add(task)
    task.add_done_callback(running.discard)
    watcher: asyncio.Task[None] | None = None
    if stop is not None:
        async def watch() -> None:
            await stop.wait()
            task.cancel()  # closes the model's stream now, not at its next token
            queue.put_nowait(CallStopped())  # wakes the reader below

        watcher = asyncio.create_task(watch())
    timer = loop.call_at(expires_at(), check)
    try:
        while True:
            if stop is not None and stop.is_set():
                raise CallStopped()
            if deadline is not None and loop.time() >= deadline:
                raise _reply_timeout(limits.reply or 0.0)
            item = queue.get_nowait() if not queue.empty() else await queue.get()
            if isinstance(item, _Expired):
                if deadline is not None and loop.time() >= deadline - 0.001:
                    raise _reply_timeout(limits.reply or 0.0) from None
                wait = limits.stall if got_text else limits.first_token
                if got_text:
                    raise ProviderError(
                        N_("The model stopped responding in the middle of the reply."),
                        detail=f"no new token for {wait:g} s",
                    ) from None
                raise ProviderError(
                    N_("The model didn't start replying within {seconds:g} seconds. "
                       "Please try again later."), params={"seconds": wait},
                    detail=f"no first token within {wait:g} s",
                ) from None
            if isinstance(item, _End):
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, str) and not got_text:
                got_text = True
                # The stall limit may be shorter than the first token's: re-armed now.
                if timer is not None:
                    timer.cancel()
                timer = loop.call_at(expires_at(), check)
            yield item  # type: ignore[misc]
    finally:
        if timer is not None:
            timer.cancel()
        if watcher is not None:
            watcher.cancel()
        # Once: a second cancel would interrupt the stream's own close, and leave
        # the model's connection open (the server would go on generating).
        if not task.done() and not task.cancelling():
            task.cancel()


def _reply_timeout(seconds: float) -> ProviderError:
    return ProviderError(
        N_("The reply took longer than {seconds:g} seconds, so I stopped it here."),
        params={"seconds": seconds},
        detail=f"reply not finished within {seconds:g} s (LLM_REPLY_TIMEOUT)",
        kind="reply_timeout",
    )


async def _chain(
    first: str | Usage, rest: AsyncIterator[str | Usage]
) -> AsyncIterator[str | Usage]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
