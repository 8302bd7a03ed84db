"""One streaming renderer for every platform.

It turns the core's stream of Markdown deltas into messages on a platform:
the first visible text is shown as soon as it exists, later text arrives by
edits no more often than `edit_interval`, a reply longer than the platform's
`limit` continues in further messages split at paragraph or line boundaries
(never leaving a code block open, never inside a grapheme cluster), and a
message the platform refuses to parse is sent plain for that one call. What
is shown is cleaned as what is stored (bot.sanitize.storable). Adapters supply
only a `MessageSink`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import regex

from bot.sanitize import is_blank, storable
from bot.text_fit import longest_prefix

log = logging.getLogger(__name__)

TYPING_DELAY = 0.2  # seconds before the typing indicator shows
TYPING_INTERVAL = 4.0  # seconds between typing actions while nothing shows (Telegram: ~5 s each)
MIN_LIMIT = 16  # the smallest message size the splitter promises to handle
_GRAPHEME = regex.compile(r"\X", regex.DOTALL)
_REGIONAL = regex.compile(r"\p{Regional_Indicator}")
_GRAPHEME_LOOKBACK = 256  # characters; far longer than any real cluster
_LANGUAGE_MAX = 32  # longer "languages" are not reopened (the converter ignores them too)


class FormattingRejected(Exception):
    """The platform refused to parse the formatted text (send it plain)."""


class NothingToShow(Exception):
    """The formatted text would show nothing (an opened fence, a bare `# `): not yet."""


class MessageSink(Protocol):
    """The three things a platform must do for the renderer."""

    async def send(self, text: str, *, formatted: bool) -> Any:
        """Post a new message; return a handle for later edits.

        Raise NothingToShow when the text would show nothing, FormattingRejected
        when the platform refuses its formatting.
        """

    async def edit(self, handle: Any, text: str, *, formatted: bool) -> None:
        """Replace the text of a message sent before (raising as `send` does)."""

    async def typing(self) -> None:
        """Show that a reply is on its way."""


def utf16_len(text: str) -> int:
    """Length as Telegram counts it (UTF-16 code units)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


# --------------------------------------------------------------------------- fences


@dataclass(frozen=True, slots=True)
class Fence:
    """An opening code fence (CommonMark): its marker run and its info string."""

    marker: str  # "```", "````", "~~~", ...
    info: str

    def closes(self, line: str) -> bool:
        """Whether `line` closes this fence: the same character, at least as many, alone."""
        indent = _indent(line)
        if indent > 3:
            return False
        rest = line[indent:]
        run = _run(rest, self.marker[0])
        return run >= len(self.marker) and not rest[run:].strip(" \t")

    def reopen_line(self) -> str:
        """The line that opens this block again in a continuation message."""
        words = self.info.split(maxsplit=1)
        language = words[0] if words and len(words[0]) <= _LANGUAGE_MAX else ""
        return self.marker + language


def _indent(line: str) -> int:
    """Leading spaces, counted up to 4 (enough to decide; a long line costs nothing)."""
    n = 0
    while n < 4 and n < len(line) and line[n] == " ":
        n += 1
    return n


def _run(text: str, ch: str) -> int:
    """How many `ch` open `text`."""
    n = 0
    while n < len(text) and text[n] == ch:
        n += 1
    return n


def fence_opener(line: str) -> Fence | None:
    """The fence `line` opens, or None (CommonMark: ≤ 3 spaces, ≥ 3 of ` or ~,
    and a backtick fence's info string has no backtick, so ```x``` is inline code)."""
    indent = _indent(line)
    if indent > 3:
        return None
    rest = line[indent:]
    if not rest or rest[0] not in "`~":
        return None
    run = _run(rest, rest[0])
    if run < 3:
        return None
    info = rest[run:]
    if rest[0] == "`" and "`" in info:
        return None
    return Fence(rest[:run], info.strip())


def fence_after(text: str, fence: Fence | None) -> Fence | None:
    """The fence still open after `text`, given the one open before it."""
    for line in text.split("\n"):
        if fence is None:
            fence = fence_opener(line)
        elif fence.closes(line):
            fence = None
    return fence


# --------------------------------------------------------------------------- splitting


def _grapheme_floor(text: str, i: int) -> int:
    """The largest grapheme-cluster boundary ≤ i (a line start is always one).

    Segmentation starts a little before i, not at the line start, so a long line
    costs no more per cut; the first cluster found there may be a partial one,
    so its end is not trusted. A run of regional indicators (flags) pairs from
    its own start, so it is scanned whole.
    """
    if i <= 0 or i >= len(text):
        return max(0, min(i, len(text)))
    line = text.rfind("\n", 0, i) + 1
    start = max(line, i - _GRAPHEME_LOOKBACK)
    while start > line and _REGIONAL.match(text, start - 1):
        start -= 1
    best = start if start == line else -1
    for k, m in enumerate(_GRAPHEME.finditer(text, start)):
        if m.end() > i:
            break
        if k or start == line:
            best = m.end()
    if best < 0:  # one cluster longer than the look-back: segment the whole line
        best = line
        for m in _GRAPHEME.finditer(text, line):
            if m.end() > i:
                break
            best = m.end()
    return best


def _cut_point(text: str, end: int) -> int:
    """Where to cut text[:end]: a paragraph, else a line, else a space, else a grapheme."""
    window = text[:end]
    floor = end // 3  # a break too early wastes a whole message
    for sep in ("\n\n", "\n", " "):
        i = window.rfind(sep)
        if i > floor:
            return _grapheme_floor(text, i + len(sep))
    cut = _grapheme_floor(text, end)
    return cut if cut > 0 else end  # one cluster longer than a message: cut it


def _reopen(fence: Fence, limit: int, measure: Callable[[str], int]) -> str | None:
    """The reopening line for a continuation, or None when it leaves too little room."""
    closer = measure("\n" + fence.marker)
    for line in (fence.reopen_line(), fence.marker):
        if measure(line + "\n") + closer <= limit // 2:
            return line
    # A marker of a quarter of the limit: the continuation goes without one (it is
    # then read afresh, which the fence state below follows) rather than overflow.
    return None


def _line_kind(line: str, fence: Fence | None) -> bool:
    """What a line does to the fence state: opens one (none open) or closes it."""
    return fence_opener(line) is not None if fence is None else fence.closes(line)


def _keeps_lines(rest: str, cut: int, fence: Fence | None) -> bool:
    """Whether cutting rest at `cut` leaves the cut line's meaning as it was.

    A cut inside a line makes two lines: neither half may open or close a code
    block that the whole line did not (```` ``` a `b` ```` cut after "``` a").
    """
    if cut <= 0 or cut >= len(rest) or rest[cut - 1] == "\n":
        return True
    start = rest.rfind("\n", 0, cut) + 1
    end = rest.find("\n", cut)
    end = len(rest) if end < 0 else end
    state = fence_after(rest[:start - 1], fence) if start else fence
    whole, head, tail = rest[start:end], rest[start:cut].rstrip(), rest[cut:end]
    if _line_kind(head, state) != _line_kind(whole, state):
        return False
    return not _line_kind(tail, fence_after(head, state))


def split_markdown(text: str, limit: int, measure: Callable[[str], int] = len) -> list[str]:
    """Split Markdown into chunks of at most `limit` (by `measure`).

    A code block cut by a split is closed at the end of one chunk with the
    marker that opened it and opened again, with its language, at the start of
    the next. Nothing else is added or dropped except the whitespace at the
    split points. Every chunk but the last carries at least a sixth of the
    limit, so one reply never turns into a flood of tiny messages. No chunk is
    ever over the limit: a fence marker too long to close and reopen within
    it is the one thing left unbalanced.
    """
    if limit < MIN_LIMIT:
        raise ValueError(f"limit too small to split Markdown (at least {MIN_LIMIT})")
    chunks: list[str] = []
    fence: Fence | None = None
    rest = text
    while rest:
        reopen = _reopen(fence, limit, measure) if fence else None
        if reopen is None:
            fence = None
        prefix = f"{reopen}\n" if reopen is not None else ""
        whole = prefix + rest
        if measure(whole) <= limit:
            if whole.strip():
                chunks.append(whole)
            break
        # Room for the closing marker: first guess the open one's, then the one
        # actually open at the cut (a longer marker may have opened inside).
        reserve = measure("\n" + fence.marker) if fence else 0
        while True:
            budget = max(1, limit - measure(prefix) - reserve)
            # Platforms count each character as one unit or more: no prefix
            # longer than the budget can fit, so only that much is measured.
            end = longest_prefix(rest[:budget], budget, measure)
            cut = _cut_point(rest, end) if end < len(rest) else end
            cut = max(cut, 1)
            if not _keeps_lines(rest, cut, fence):
                line_start = rest.rfind("\n", 0, cut) + 1
                if line_start > 0:
                    cut = line_start
            piece = rest[:cut].rstrip()
            new_fence = fence_after(piece, fence)
            if new_fence is not None and new_fence is not fence:
                # Don't end a message on a bare opening fence: start the next with it.
                last = piece.rfind("\n")
                if last > end // 3 and fence_opener(piece[last + 1:]) == new_fence \
                        and fence_after(piece[:last], fence) is None:
                    cut = last + 1
                    piece = rest[:cut].rstrip()
                    new_fence = None
            needed = measure("\n" + new_fence.marker) if new_fence else 0
            if measure(prefix + piece) + needed <= limit or budget == 1:
                break
            reserve = max(reserve + 1, needed)
        rest = rest[cut:].lstrip("\n")
        chunk = prefix + piece
        if new_fence and measure(chunk + "\n" + new_fence.marker) <= limit:
            chunk += "\n" + new_fence.marker
        if chunk.strip() and (piece.strip() or not new_fence):
            chunks.append(chunk)
        fence = new_fence
        if fence and not rest.strip():
            break
    return chunks


# --------------------------------------------------------------------------- streaming


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
        typing_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._limit = limit
        self._interval = edit_interval
        self._measure = measure
        # How long one typing action shows: the sink may say (Discord's last ~10 s).
        self._typing_interval = typing_interval if typing_interval is not None \
            else getattr(sink, "typing_interval", TYPING_INTERVAL)
        self._clock = clock
        self._text = ""
        self._shown: list[_Shown] = []
        self._held = False  # text has come, but none of it would show yet
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
            last_flush = float("-inf")  # the last flush that reached the platform
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
                    if await self._flush(final=False):
                        last_flush = self._clock()
                except Exception:  # an edit lost mid-stream is retried by the next flush
                    log.warning("intermediate edit failed", exc_info=True)
                    last_flush = self._clock()
            await reader  # re-raise what the stream raised, if anything
            # The final edit keeps the interval too (platforms count edits).
            wait = last_flush + self._interval - self._clock()
            if wait > 0 and self._shown:
                await asyncio.sleep(wait)
            await self._flush(final=True)
        finally:
            typing.cancel()
            if not reader.done():
                reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await typing
        return [s.text for s in self._shown]

    async def _keep_typing(self, changed: asyncio.Event, done: asyncio.Event) -> None:
        # A refusal or an ignored message ends the stream at once: don't
        # show "typing" for a reply that will never come. Typing goes on until
        # something is visible (a reply that opens with a fence shows nothing yet).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), TYPING_DELAY)
        while not self._shown and not done.is_set():
            if not self._text or self._held:  # not while the first message is on its way
                try:
                    await self._sink.typing()
                except Exception:
                    log.debug("typing indicator failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self._typing_interval)

    async def _flush(self, *, final: bool) -> bool:
        """Bring the platform up to date; True when a call reached it."""
        text = storable(self._text)  # shown as it is stored: no NUL, no lone surrogate
        if is_blank(text):
            return False
        called = False
        chunks = split_markdown(text, self._limit, self._measure)
        for i, chunk in enumerate(chunks):
            if i < len(self._shown):
                shown = self._shown[i]
                if shown.text != chunk:
                    await self._edit(shown, chunk)
                    called = True
                continue
            sent = await self._send(chunk, final=final)
            self._held = sent is None and not self._shown
            if sent is None:
                if final:
                    continue  # nothing to show at all in this chunk
                break  # nothing visible yet: later chunks wait for it
            self._shown.append(sent)
            called = True
        return called

    async def _send(self, text: str, *, final: bool) -> _Shown | None:
        try:
            return _Shown(await self._sink.send(text, formatted=True), text, True)
        except NothingToShow:
            if not final:
                return None
            log.info("formatted text shows nothing; sending plain text")
        except FormattingRejected:
            log.info("platform refused formatting; sending plain text")
        try:
            return _Shown(await self._sink.send(text, formatted=False), text, False)
        except NothingToShow:
            return None

    async def _edit(self, shown: _Shown, text: str) -> None:
        # Each edit tries formatting again: a refusal is for that text, not for good.
        self.edits += 1
        try:
            await self._sink.edit(shown.handle, text, formatted=True)
            shown.formatted = True
        except (FormattingRejected, NothingToShow):
            log.info("formatting refused or empty; editing as plain text")
            await self._sink.edit(shown.handle, text, formatted=False)
            shown.formatted = False
        shown.text = text
