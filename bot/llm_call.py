"""One model call: retries before any text, timeouts, and cancellation.

The task that reads the reply reads the provider's stream itself (profiled, a
task feeding a queue cost a second task switch for every streamed token: ~7 %
of the bot's CPU per exchange). What must interrupt its wait for the model
does so by cancelling that wait, and only that wait (as `asyncio.timeout`
does, never while the reader is busy with a token): one timer for the
deadlines (first token, then a stall limit, and a limit on the whole reply),
the user's stop, and shutdown (through a guard task in `running`).
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


def _first_wait(backoff: float) -> Callable[[RetryCallState], Awaitable[None]]:
    """The first attempt ran outside tenacity: wait before tenacity's first one too."""

    async def wait_once(state: RetryCallState) -> None:
        if state.attempt_number == 1:
            await asyncio.sleep(backoff)

    return wait_once


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ProviderError) and exc.retryable


class _Watch:
    """Interrupts one task's wait for the model: deadlines, the user's stop, shutdown.

    The reason is kept in `pending`; the task is cancelled only while it waits
    in the model's stream (`waiting`), and the cancellation is turned back into
    the reason there (`cancelled`). Otherwise the task finds it before its next read
    (`check`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: CallLimits) -> None:
        self._loop = loop
        self._limits = limits
        self.deadline = None if limits.reply is None else loop.time() + limits.reply
        self.now = loop.time
        self.last = loop.time()  # when the reader last began to wait for the model
        self.got_text = False
        self.pending: BaseException | None = None
        self.task: asyncio.Task[Any] | None = None  # the task waiting in the stream, if any
        self._cancelled = False  # this watch cancelled that wait
        self.base = 0  # the task's cancellation requests when its wait began
        self.closed = False
        # One timer, not one per token: it re-arms itself from when the reader last
        # began to wait, and interrupts once the wait runs out.
        self._timer: asyncio.TimerHandle | None = loop.call_at(self._expires_at(), self._check)

    def _expires_at(self) -> float:
        limits = self._limits
        at = self.last + (limits.stall if self.got_text else limits.first_token)
        return at if self.deadline is None else min(at, self.deadline)

    def _check(self) -> None:
        now, at = self._loop.time(), self._expires_at()
        if now < at:
            self._timer = self._loop.call_at(at, self._check)
            return
        if self.task is None and (self.deadline is None or now < self.deadline):
            # The reader is busy with what came, not waiting for the model (whose
            # text waits in the socket): a stall counts from its next wait.
            limit = self._limits.stall if self.got_text else self._limits.first_token
            again = now + limit if self.deadline is None else min(now + limit, self.deadline)
            self._timer = self._loop.call_at(again, self._check)
            return
        self._timer = None
        self.interrupt(self._expired())

    def _expired(self) -> ProviderError:
        if self.deadline is not None and self._loop.time() >= self.deadline - 0.001:
            return _reply_timeout(self._limits.reply or 0.0)
        limits = self._limits
        if self.got_text:
            return ProviderError(
                N_("The model stopped responding in the middle of the reply."),
                detail=f"no new token for {limits.stall:g} s")
        wait = limits.first_token
        return ProviderError(
            N_("The model didn't start replying within {seconds:g} seconds. "
               "Please try again later."), params={"seconds": wait},
            detail=f"no first token within {wait:g} s")

    def texted(self) -> None:
        """The first text came: the stall limit (maybe shorter) counts from now."""
        self.got_text = True
        self.last = self._loop.time()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._expires_at(), self._check)

    def interrupt(self, reason: BaseException) -> None:
        if self.closed:
            return
        if self.pending is None:
            self.pending = reason
        if self.task is not None and not self._cancelled:
            self._cancelled = True
            self.task.cancel()

    def check(self) -> None:
        """Raise the reason the call ends, if it has one (the timer sets the deadline's)."""
        if self.pending is not None:
            raise self.pending

    def waiting(self) -> asyncio.Task[Any]:
        """The current task now waits in the model's stream (interruptible until `woke`)."""
        task = asyncio.current_task()
        assert task is not None
        self.task, self.base = task, task.cancelling()
        self.last = self.now()
        return task

    def woke(self) -> None:
        self.task = None

    def cancelled(self, task: asyncio.Task[Any]) -> None:
        """The wait was cancelled: raise the reason if this watch cancelled it (and
        no one else did too); return to let the cancellation go on."""
        if self._cancelled:
            self._cancelled = False
            if task.uncancel() <= self.base and self.pending is not None:
                raise self.pending from None

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()


async def _until(stop: asyncio.Event | None) -> None:
    if stop is None:
        await asyncio.get_running_loop().create_future()  # until cancelled (shutdown)
    else:
        await stop.wait()


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

    `running` holds a guard task while the call runs, so that shutdown can
    cancel it (the call then ends with CallCancelled). Past `limits.reply`
    seconds the call stops with a ProviderError of kind "reply_timeout" (the
    text so far stays shown). Setting `stop` ends the call at once with
    CallStopped, even while the model is still thinking: the wait for the
    model is cancelled, which closes the stream and with it the connection
    (Ollama and OpenAI-compatible servers stop generating when it closes).
    """
    watch = _Watch(asyncio.get_running_loop(), limits)

    def guarded(task: asyncio.Task[None]) -> None:
        watch.interrupt(CallCancelled() if task.cancelled() else CallStopped())

    guard = asyncio.create_task(_until(stop))
    running.add(guard)
    guard.add_done_callback(running.discard)
    guard.add_done_callback(guarded)

    async def first_of(stream: AsyncIterator[str | Usage]) \
            -> tuple[str | Usage, AsyncIterator[str | Usage]]:
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
        return first, stream

    def attempt() -> AsyncIterator[str | Usage]:
        return provider.stream(model, messages, num_ctx=num_ctx, max_tokens=max_tokens,
                               options=options)

    async def open_stream() -> tuple[str | Usage, AsyncIterator[str | Usage]]:
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

    stream: AsyncIterator[str | Usage] | None = None
    try:
        if stop is not None and stop.is_set():
            raise CallStopped()
        watch.check()
        task = watch.waiting()
        try:
            item, stream = await open_stream()
        except asyncio.CancelledError:
            watch.cancelled(task)
            raise
        except (ProviderError, CallCancelled):
            raise
        except Exception as exc:  # a provider bug must still end the turn clearly
            raise _unexpected(exc) from exc
        finally:
            watch.woke()
        while True:
            if isinstance(item, str) and not watch.got_text:
                watch.texted()
            yield item
            if watch.pending is not None:
                raise watch.pending
            if stop is not None and stop.is_set():
                raise CallStopped()
            # watch.waiting(), inlined: this runs for every token (and one task reads
            # the stream: asyncio.current_task() costs more than the rest of this).
            watch.task = task
            watch.base, watch.last = task.cancelling(), watch.now()
            try:
                item = await anext(stream)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                watch.cancelled(task)
                raise
            except (ProviderError, CallCancelled):
                raise
            except Exception as exc:
                raise _unexpected(exc) from exc
            finally:
                watch.task = None
    finally:
        watch.close()
        guard.cancel()
        if stream is not None:
            await stream.aclose()  # type: ignore[attr-defined]


def _unexpected(exc: Exception) -> ProviderError:
    log.error("model call failed unexpectedly", exc_info=exc)
    return ProviderError(
        N_("Something went wrong talking to the model. Please try again."),
        detail=f"{type(exc).__name__}: {exc}",
    )


def _reply_timeout(seconds: float) -> ProviderError:
    return ProviderError(
        N_("The reply took longer than {seconds:g} seconds, so I stopped it here."),
        params={"seconds": seconds},
        detail=f"reply not finished within {seconds:g} s (LLM_REPLY_TIMEOUT)",
        kind="reply_timeout",
    )
