"""One streaming renderer for every platform.

It turns the core's stream of Markdown deltas into messages on a platform:
the first text is shown as soon as it exists, later text arrives by edits no
more often than `edit_interval`, a reply longer than the platform's `limit`
continues in further messages split at paragraph or line boundaries (never
leaving a code block open), and a message the platform refuses to parse is
sent again as plain text. Adapters supply only a `MessageSink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bot.text_fit import longest_prefix

log = logging.getLogger(__name__)

TYPING_DELAY = 0.2  # seconds before the typing indicator shows
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


class FormattingRejected(Exception):
    """The platform refused to parse the formatted text (send it plain)."""


class MessageSink(Protocol):
    """The three things a platform must do for the renderer."""

    async def send(self, text: str, *, formatted: bool) -> Any:
        """Post a new message; return a handle for later edits."""

    async def edit(self, handle: Any, text: str, *, formatted: bool) -> None:
        """Replace the text of a message sent before."""

    async def typing(self) -> None:
        """Show that a reply is on its way."""


def utf16_len(text: str) -> int:
    """Length as Telegram counts it (UTF-16 code units)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def _open_fence(lines: list[str], fence: str | None) -> str | None:
    """Return the opening fence line still open after `lines`, or None."""
    for line in lines:
        m = _FENCE.match(line)
        if not m:
            continue
        marker = m.group(1)
        if fence is None:
            fence = line.strip()
        else:
            opener = _FENCE.match(fence)
            assert opener is not None
            if marker[0] == opener.group(1)[0] and len(marker) >= len(opener.group(1)) \
                    and not m.group(2).strip():
                fence = None
    return fence


def _cut_point(text: str, end: int) -> int:
    """Where to cut text[:end]: a paragraph, else a line, else a space break."""
    window = text[:end]
    floor = end // 3  # a break too early wastes a whole message
    for sep in ("\n\n", "\n", " "):
        i = window.rfind(sep)
        if i > floor:
            return i + len(sep)
    return end


def split_markdown(text: str, limit: int, measure: Callable[[str], int] = len) -> list[str]:
    """Split Markdown into chunks of at most `limit` (by `measure`).

    A code block cut by a split is closed at the end of one chunk and opened
    again, with the same info string, at the start of the next. Nothing else
    is added or dropped except the whitespace at the split points.
    """
    if limit < 32:
        raise ValueError("limit too small to split Markdown")
    chunks: list[str] = []
    fence: str | None = None
    rest = text
    while rest:
        prefix = f"{fence}\n" if fence else ""
        whole = prefix + rest
        if measure(whole) <= limit:
            chunks.append(whole)
            break
        budget = limit - measure(prefix) - measure("\n```")
        end = longest_prefix(rest, budget, measure)
        cut = _cut_point(rest, end) if end < len(rest) else end
        if cut <= 0:
            cut = max(1, end)
        piece, rest = rest[:cut].rstrip(), rest[cut:].lstrip("\n")
        new_fence = _open_fence(piece.split("\n"), fence)
        chunk = prefix + piece
        if new_fence:
            chunk += "\n```" if new_fence.startswith("`") else "\n~~~"
        if chunk.strip():
            chunks.append(chunk)
        fence = new_fence
        if fence and not rest.strip():
            break
    return chunks


@dataclass
class _Shown:
    handle: Any
    text: str
    formatted: bool


class StreamRenderer:
    """Renders one reply stream through a sink; one instance per reply."""

    def __init__(
        self,
        sink: MessageSink,
        *,
        limit: int,
        edit_interval: float = 1.0,
        measure: Callable[[str], int] = len,
        typing_interval: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._limit = limit
        self._interval = edit_interval
        self._measure = measure
        self._typing_interval = typing_interval
        self._clock = clock
        self._text = ""
        self._shown: list[_Shown] = []
        self.edits = 0  # how many edits were made, for tests and benchmarks

    @property
    def text(self) -> str:
        return self._text

    async def run(self, deltas: AsyncIterator[str]) -> list[str]:
        """Consume the stream; return the texts of the messages shown."""
        changed = asyncio.Event()
        done = asyncio.Event()

        async def read() -> None:
            try:
                async for delta in deltas:
                    if delta:
                        self._text += delta
                        changed.set()
            finally:
                done.set()
                changed.set()
                aclose = getattr(deltas, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()

        reader = asyncio.create_task(read())
        typing = asyncio.create_task(self._keep_typing(changed, done))
        try:
            last_flush = float("-inf")
            while not done.is_set():
                await changed.wait()
                changed.clear()
                if done.is_set():
                    break
                wait = last_flush + self._interval - self._clock()
                if wait > 0 and self._shown:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), wait)
                    if done.is_set():
                        break
                try:
                    await self._flush()
                except FormattingRejected:
                    raise
                except Exception:  # an edit lost mid-stream is retried by the next flush
                    log.warning("intermediate edit failed", exc_info=True)
                last_flush = self._clock()
            await reader  # re-raise what the stream raised, if anything
            # The final edit keeps the interval too (platforms count edits).
            wait = last_flush + self._interval - self._clock()
            if wait > 0 and self._shown:
                await asyncio.sleep(wait)
            await self._flush()
        finally:
            typing.cancel()
            if not reader.done():
                reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await typing
        return [s.text for s in self._shown]

    async def _keep_typing(self, changed: asyncio.Event, done: asyncio.Event) -> None:
        # A refusal or an ignored message ends the stream at once: don't
        # show "typing" for a reply that will never come.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), TYPING_DELAY)
        while not self._text and not done.is_set():
            try:
                await self._sink.typing()
            except Exception:
                log.debug("typing indicator failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self._typing_interval)

    async def _flush(self) -> None:
        if not self._text.strip():
            return
        chunks = split_markdown(self._text, self._limit, self._measure)
        for i, chunk in enumerate(chunks):
            if i < len(self._shown):
                shown = self._shown[i]
                if shown.text != chunk:
                    await self._edit(shown, chunk)
            else:
                self._shown.append(await self._send(chunk))

    async def _send(self, text: str) -> _Shown:
        try:
            return _Shown(await self._sink.send(text, formatted=True), text, True)
        except FormattingRejected:
            log.info("platform refused formatting; sending plain text")
            return _Shown(await self._sink.send(text, formatted=False), text, False)

    async def _edit(self, shown: _Shown, text: str) -> None:
        self.edits += 1
        if shown.formatted:
            try:
                await self._sink.edit(shown.handle, text, formatted=True)
                shown.text = text
                return
            except FormattingRejected:
                log.info("platform refused formatting; editing as plain text")
                shown.formatted = False
        await self._sink.edit(shown.handle, text, formatted=False)
        shown.text = text
