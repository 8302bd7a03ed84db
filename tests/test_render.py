"""The shared streaming renderer: splitting, throttled edits, plain fallback."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.render import FormattingRejected, StreamRenderer, split_markdown, utf16_len

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


def test_split_measures_utf16_for_telegram() -> None:
    text = "😀" * 5000  # two UTF-16 units each
    chunks = split_markdown(text, 4096, utf16_len)
    assert all(utf16_len(c) <= 4096 for c in chunks)
    assert "".join(chunks) == text


def test_split_prefers_paragraphs_then_lines() -> None:
    text = ("a" * 60 + "\n\n" + "b" * 60 + "\n" + "c" * 60)
    chunks = split_markdown(text, 100)
    assert chunks[0] == "a" * 60
    assert chunks[1].startswith("b" * 60)


class RecordingSink:
    """A platform stand-in for the renderer's own interface (not a library mock)."""

    def __init__(self, refuse_formatting: bool = False) -> None:
        self.messages: list[str] = []
        self.formatted: list[bool] = []
        self.events: list[tuple[float, str, int]] = []
        self.typing_calls = 0
        self.refuse = refuse_formatting

    async def send(self, text: str, *, formatted: bool) -> Any:
        if formatted and self.refuse:
            raise FormattingRejected("can't parse entities")
        self.messages.append(text)
        self.formatted.append(formatted)
        self.events.append((time.monotonic(), "send", len(self.messages) - 1))
        return len(self.messages) - 1

    async def edit(self, handle: Any, text: str, *, formatted: bool) -> None:
        if formatted and self.refuse:
            raise FormattingRejected("can't parse entities")
        self.messages[handle] = text
        self.events.append((time.monotonic(), "edit", handle))

    async def typing(self) -> None:
        self.typing_calls += 1


async def paced(parts: list[str], gap: float, first: float = 0) -> AsyncIterator[str]:
    await asyncio.sleep(first)  # the model's time to first token
    for p in parts:
        yield p
        await asyncio.sleep(gap)  # the model's pace, not synchronisation


async def test_first_text_at_once_then_throttled_edits_and_final_text() -> None:
    sink = RecordingSink()
    parts = [f"word{i} " for i in range(60)]
    renderer = StreamRenderer(sink, limit=4096, edit_interval=0.1)
    started = time.monotonic()
    shown = await asyncio.wait_for(renderer.run(paced(parts, 0.005, first=0.3)), 10)
    took = time.monotonic() - started
    assert shown == ["".join(parts)] and sink.messages == shown
    assert sink.typing_calls >= 1
    edits = [t for t, kind, _ in sink.events if kind == "edit"]
    assert len(edits) <= took / 0.1 + 2
    gaps = [b - a for a, b in itertools.pairwise(edits)]
    assert all(g >= 0.09 for g in gaps)  # the final edit keeps the interval too


async def test_long_reply_continues_in_further_messages() -> None:
    sink = RecordingSink()
    text = "\n\n".join(f"Paragraph {i}. " + "lorem ipsum " * 30 for i in range(40))
    parts = [text[i:i + 50] for i in range(0, len(text), 50)]
    shown = await asyncio.wait_for(
        StreamRenderer(sink, limit=2000, edit_interval=0).run(paced(parts, 0)), 10)
    assert len(shown) > 1 and all(len(m) <= 2000 for m in shown)
    assert re.sub(r"\s+", "", "".join(shown)) == re.sub(r"\s+", "", text)


async def test_refused_formatting_falls_back_to_plain_text() -> None:
    sink = RecordingSink(refuse_formatting=True)
    shown = await StreamRenderer(sink, limit=4096, edit_interval=0).run(
        paced(["**bold ", "and <tag> & more"], 0))
    assert shown == ["**bold and <tag> & more"]
    assert sink.formatted == [False]


async def test_empty_stream_sends_nothing() -> None:
    sink = RecordingSink()
    assert await StreamRenderer(sink, limit=4096).run(paced([], 0)) == []
    assert sink.messages == []
