"""The shared streaming renderer: splitting, throttled edits, plain fallback."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import regex

from bot.render import (
    FormattingRejected,
    NothingToShow,
    StreamRenderer,
    fence_after,
    split_markdown,
    utf16_len,
)

FENCE_LINE = re.compile(r"^```\w*$", re.M)


def strip_added_fences(chunks: list[str]) -> str:
    return re.sub(r"\s+", "", FENCE_LINE.sub("", "\n".join(chunks)))


@pytest.mark.parametrize("limit", [100, 2000, 4096])
def test_split_keeps_every_character_and_code_blocks_whole(limit: int) -> None:
    code = "```python\n" + "\n".join(f"print({i})  # 中文註解 {i}" for i in range(400)) + "\n```"
    text = ("Intro paragraph.\n\n" + "word " * 900 + "\n\n" + code + "\n\nThe end 🎉.")
    chunks = split_markdown(text, limit)
    assert all(len(c) <= limit for c in chunks)
    assert strip_added_fences(chunks) == re.sub(r"\s+", "", FENCE_LINE.sub("", text))
    for c in chunks:  # every chunk's fences are balanced
        assert len(FENCE_LINE.findall(c)) % 2 == 0, c[:80]
        assert fence_after(c, None) is None


def test_split_measures_utf16_for_telegram() -> None:
    text = "😀" * 5000  # two UTF-16 units each
    chunks = split_markdown(text, 4096, utf16_len)
    assert chunks == ["😀" * 2048, "😀" * 2048, "😀" * 904]


def test_split_prefers_paragraphs_then_lines() -> None:
    text = ("a" * 60 + "\n\n" + "b" * 60 + "\n" + "c" * 60)
    assert split_markdown(text, 100) == ["a" * 60, "b" * 60, "c" * 60]
    assert split_markdown(text, 130) == ["a" * 60, "b" * 60 + "\n" + "c" * 60]


# ----------------------------------------------------------------- issue 11, items 7 to 9, 13


@pytest.mark.parametrize(("limit", "measure"), [(4096, utf16_len), (2000, len), (16, len)])
def test_a_fence_line_longer_than_the_limit_never_floods(
        limit: int, measure: Callable[[str], int]) -> None:
    text = "```" + "x" * 5000 + "\nprint(1)\n```\nafter"
    chunks = split_markdown(text, limit, measure)
    assert all(measure(c) <= limit for c in chunks)
    # Every message but the last carries at least a sixth of the limit.
    assert len(chunks) <= math.ceil(measure(text) / (limit / 6)) + 1
    assert all(fence_after(c, None) is None for c in chunks)
    assert re.sub(r"[`\s]", "", "".join(chunks)) == re.sub(r"[`\s]", "", text)
    # A continuation reopens with the marker alone: the 5,000-character info is not copied.
    assert "".join(chunks).count("x") == 5000


def test_the_long_fence_line_splits_as_expected_for_discord() -> None:
    text = "```" + "x" * 5000 + "\nprint(1)\n```\nafter"
    assert split_markdown(text, 2000) == [
        "```" + "x" * 1993 + "\n```",
        "```\n" + "x" * 1992 + "\n```",
        "```\n" + "x" * 1015 + "\nprint(1)\n```\nafter",
    ]


def test_inline_triple_backticks_do_not_open_a_code_block() -> None:
    text = "```npm install``` is the first step.\n\n" + "Then run it. " * 20
    chunks = split_markdown(text, 100)
    assert chunks[0].startswith("```npm install``` is the first step.")
    assert all("```" not in c for c in chunks[1:])  # nothing reopened, nothing closed
    assert all(not c.endswith("\n```") for c in chunks)
    assert re.sub(r"\s+", "", "".join(chunks)) == re.sub(r"\s+", "", text)


@pytest.mark.parametrize(("opener", "closer"), [("````md", "````"), ("~~~", "~~~"),
                                                ("~~~~~ text", "~~~~~"), ("```py", "```")])
def test_a_split_code_block_is_closed_and_reopened_with_its_own_fence(
        opener: str, closer: str) -> None:
    # Only the opening fence's kind, at its length or more, closes it.
    inner = "```py\nnot the end\n```\n" if closer != "```" else ""
    body = "\n".join(f"line {i}" for i in range(30))
    text = f"Intro.\n{opener}\n{inner}{body}\n{closer}\nOutro."
    chunks = split_markdown(text, 120)
    assert len(chunks) >= 3
    reopen = opener.replace(" ", "")  # the marker and the language
    for c in chunks[:-1]:
        assert c.endswith("\n" + closer), c
    for c in chunks[1:]:
        assert c.startswith(reopen + "\n"), c
    assert chunks[-1].endswith(f"\n{closer}\nOutro.")
    assert all(fence_after(c, None) is None for c in chunks)


@pytest.mark.parametrize("measure", [len, utf16_len])
@pytest.mark.parametrize("cluster", ["👨‍👩‍👧‍👦", "🇩🇪", "e\u0301\u0302", "🏳️‍🌈", "👍🏽"])
def test_grapheme_clusters_are_never_split(cluster: str, measure: Callable[[str], int]) -> None:
    text = cluster * 300
    for limit in (16, 17, 23, 100, 2000):
        chunks = split_markdown(text, limit, measure)
        assert "".join(chunks) == text
        for c in chunks:
            assert measure(c) <= limit
            assert regex.findall(r"\X", c) == [cluster] * (len(c) // len(cluster)), (limit, c)


# ----------------------------------------------------------------- the renderer


class RecordingSink:
    """A platform stand-in for the renderer's own interface (not a library mock).

    `refuse` says which formatted calls the platform refuses (by call number);
    `invisible` says which formatted texts would show nothing.
    """

    def __init__(self, refuse: Callable[[int], bool] = lambda n: False,
                 invisible: Callable[[str], bool] = lambda text: False) -> None:
        self.messages: list[str] = []
        self.formatted: list[bool] = []  # per message: formatted now?
        self.calls: list[tuple[str, int, str, bool]] = []  # (kind, handle, text, formatted)
        self.events: list[tuple[float, str, int]] = []
        self.typing_calls = 0
        self.sent = asyncio.Event()
        self._refuse = refuse
        self._invisible = invisible
        self._formatted_calls = 0

    def _check(self, text: str, formatted: bool) -> None:
        if not formatted:
            return
        if self._invisible(text):
            raise NothingToShow
        self._formatted_calls += 1
        if self._refuse(self._formatted_calls):
            raise FormattingRejected("can't parse entities")

    async def send(self, text: str, *, formatted: bool) -> Any:
        self._check(text, formatted)
        self.messages.append(text)
        self.formatted.append(formatted)
        self.calls.append(("send", len(self.messages) - 1, text, formatted))
        self.events.append((time.monotonic(), "send", len(self.messages) - 1))
        self.sent.set()
        return len(self.messages) - 1

    async def edit(self, handle: Any, text: str, *, formatted: bool) -> None:
        self._check(text, formatted)
        self.messages[handle] = text
        self.formatted[handle] = formatted
        self.calls.append(("edit", handle, text, formatted))
        self.events.append((time.monotonic(), "edit", handle))

    async def typing(self) -> None:
        self.typing_calls += 1
        self.events.append((time.monotonic(), "typing", -1))


async def paced(parts: list[str], gap: float, first: float = 0) -> AsyncIterator[str]:
    await asyncio.sleep(first)  # the model's time to first token
    for p in parts:
        yield p
        await asyncio.sleep(gap)  # the model's pace, not synchronisation


async def test_first_text_is_shown_before_the_model_says_more() -> None:
    sink = RecordingSink()
    released = asyncio.Event()

    async def model() -> AsyncIterator[str]:
        yield "Hello"
        # The model says nothing more until the user has seen the first word:
        # a renderer that waits for more text (or for an interval) never gets it.
        async with asyncio.timeout(2):
            await sink.sent.wait()
        released.set()
        yield " world"

    renderer = StreamRenderer(sink, limit=4096, edit_interval=0.05)
    async with asyncio.timeout(5):
        shown = await renderer.run(model())
    assert released.is_set()
    assert sink.calls == [("send", 0, "Hello", True), ("edit", 0, "Hello world", True)]
    assert shown == ["Hello world"]


async def test_throttled_edits_keep_the_interval_and_end_on_the_final_text() -> None:
    sink = RecordingSink()
    parts = [f"word{i} " for i in range(60)]
    renderer = StreamRenderer(sink, limit=4096, edit_interval=0.1)
    started = time.monotonic()
    async with asyncio.timeout(10):
        shown = await renderer.run(paced(parts, 0.005, first=0.3))
    took = time.monotonic() - started
    assert shown == ["".join(parts)] and sink.messages == shown
    assert sink.calls[0] == ("send", 0, "word0 ", True)
    assert sink.calls[-1] == ("edit", 0, "".join(parts), True)
    assert sink.typing_calls >= 1
    edits = [t for t, kind, _ in sink.events if kind == "edit"]
    assert renderer.edits == len(edits) <= took / 0.1 + 2
    gaps = [b - a for a, b in itertools.pairwise(edits)]
    assert all(g >= 0.09 for g in gaps)  # the final edit keeps the interval too


async def test_long_reply_continues_in_exact_further_messages() -> None:
    sink = RecordingSink()
    paragraphs = [f"Paragraph {i}. " + "lorem ipsum " * 30 for i in range(40)]
    text = "\n\n".join(paragraphs)
    parts = [text[i:i + 50] for i in range(0, len(text), 50)]
    async with asyncio.timeout(10):
        shown = await StreamRenderer(sink, limit=2000, edit_interval=0).run(paced(parts, 0))
    # Each paragraph is 383 characters: five fit in a message (with the blank lines).
    groups = ["\n\n".join(paragraphs[i:i + 5]) for i in range(0, 40, 5)]
    expected = [g.rstrip() for g in groups[:-1]] + groups[-1:]
    assert shown == expected == split_markdown(text, 2000)
    assert sink.messages == expected


async def test_refused_formatting_falls_back_to_plain_text() -> None:
    sink = RecordingSink(refuse=lambda n: True)
    shown = await StreamRenderer(sink, limit=4096, edit_interval=0).run(
        paced(["**bold ", "and <tag> & more"], 0))
    assert shown == ["**bold and <tag> & more"]
    assert sink.formatted == [False]


async def test_a_refusal_is_for_that_call_only() -> None:
    sink = RecordingSink(refuse=lambda n: n == 1)  # only the very first formatted call
    async with asyncio.timeout(5):
        shown = await StreamRenderer(sink, limit=4096, edit_interval=0).run(
            paced(["**bold", "** and more"], 0.01))
    assert shown == ["**bold** and more"]
    assert sink.calls[0] == ("send", 0, "**bold", False)
    assert sink.calls[-1] == ("edit", 0, "**bold** and more", True)
    assert sink.formatted == [True]


async def test_nothing_visible_yet_means_nothing_sent_yet() -> None:
    # A sink whose formatting shows nothing for a bare opening fence, like Telegram's.
    sink = RecordingSink(invisible=lambda text: text.strip() in ("```python", "#", ">"))
    async with asyncio.timeout(5):
        shown = await StreamRenderer(sink, limit=4096, edit_interval=0).run(
            paced(["```python\n", "print(1)\n", "```"], 0.01))
    assert sink.calls[0] == ("send", 0, "```python\nprint(1)\n", True)
    assert sink.calls[-1][2:] == ("```python\nprint(1)\n```", True)
    assert shown == ["```python\nprint(1)\n```"] and sink.formatted == [True]


async def test_a_reply_that_never_shows_anything_formatted_is_sent_plain() -> None:
    sink = RecordingSink(invisible=lambda text: True)
    async with asyncio.timeout(5):
        shown = await StreamRenderer(sink, limit=4096, edit_interval=0).run(
            paced(["```", "\n```"], 0.01))
    assert shown == ["```\n```"] and sink.calls == [("send", 0, "```\n```", False)]


async def test_what_is_shown_is_cleaned_like_what_is_stored() -> None:
    sink = RecordingSink()
    async with asyncio.timeout(5):
        shown = await StreamRenderer(sink, limit=4096, edit_interval=0).run(
            paced(["Hi \ud800 the", "re\x00!"], 0))
    assert shown == sink.messages == ["Hi \ufffd there!"]


async def test_a_zero_width_reply_sends_nothing() -> None:
    sink = RecordingSink()
    async with asyncio.timeout(5):
        assert await StreamRenderer(sink, limit=4096).run(paced(["\u200b", "\u200d "], 0)) == []
    assert sink.calls == []


async def test_empty_stream_sends_nothing() -> None:
    sink = RecordingSink()
    assert await StreamRenderer(sink, limit=4096).run(paced([], 0)) == []
    assert sink.messages == [] and sink.calls == []


async def test_typing_shows_while_nothing_is_visible_and_stops_once_something_is() -> None:
    sink = RecordingSink(invisible=lambda text: text.strip() == "```python")
    renderer = StreamRenderer(sink, limit=4096, edit_interval=0, typing_interval=0.05)
    async with asyncio.timeout(5):
        await renderer.run(paced(["```python\n", "print(1)\n", "```"], 0.3))
    kinds = [kind for _, kind, _ in sink.events]
    first_send = kinds.index("send")
    assert "typing" in kinds[:first_send]  # text had come, but nothing showed yet
    assert "typing" not in kinds[first_send:]
    assert sink.calls[0] == ("send", 0, "```python\nprint(1)\n", True)


async def test_typing_is_renewed_as_often_as_the_sink_says_one_lasts() -> None:
    # A platform whose indicator lasts long (Discord's ~10 s) renews it less often;
    # the stream says nothing for 0.7 s, then its whole text.
    often, seldom = RecordingSink(), RecordingSink()
    often.typing_interval = 0.1  # type: ignore[attr-defined]
    seldom.typing_interval = 9.0  # type: ignore[attr-defined]
    async with asyncio.timeout(10):
        await asyncio.gather(*(StreamRenderer(s, limit=4096, edit_interval=0).run(
            paced(["hello"], 0, first=0.7)) for s in (often, seldom)))
    assert seldom.typing_calls == 1 and often.typing_calls >= 3
    assert often.messages == seldom.messages == ["hello"]
