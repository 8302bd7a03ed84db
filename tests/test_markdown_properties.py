"""Property tests (Hypothesis) for the Markdown splitter and the Telegram converter.

For any Markdown and any limit of at least 16: no part is over the limit, each
part's code fences are balanced, the text comes through in order with nothing
lost or repeated, and the Bot API emulator's HTML parser (Telegram's rules)
accepts every part. The fence rule both share is checked against CommonMark
itself (markdown-it-py).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import regex
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from adapters.telegram.format import markdown_to_html
from bot.render import fence_after, fence_opener, split_markdown, utf16_len
from tests.fakes.telegram_api import parse_html

WORDS = ["alpha", "beta", "gamma", "我们", "кот", "naïve", "x1", "😀", "👨‍👩‍👧", "🇩🇪", "é",
         "e\u0301"]
MARKUP = [" ", " ", "  ", "\n", "\n", "\n\n", "*", "**", "***", "_", "__", "~~", "||", "`",
          "``", "```", "~~~", "\\", "[", "]", "(", ")", "](https://e.org/1)", "<https://e.org>",
          "<", ">", "&", "&amp;", "# ", "> ", "- ", "!", "\n```py\n", "\n```\n", "\n````md\n",
          "\n````\n", "\n~~~\n", "\u200b", "\ufffd", "\t"]
markdown = st.lists(st.sampled_from(WORDS + MARKUP) | st.text(max_size=3),
                    max_size=80).map("".join)
MEASURES: dict[str, Callable[[str], int]] = {"len": len, "utf16": utf16_len}
FENCE_RUN = re.compile(r"`+|~+")


def longest_fence_run(text: str) -> int:
    return max((len(m.group(0)) for m in FENCE_RUN.finditer(text)), default=0)


def content(text: str) -> str:
    """The text without whitespace and fence characters (which the splitter adds)."""
    return re.sub(r"[\s`~]", "", text)


def assert_nothing_lost_or_repeated(text: str, parts: list[str]) -> None:
    """The parts are the text in order, give or take whitespace at the cuts, closing
    fences, and a reopening fence line (marker and language) at a part's start."""
    source = content(text)

    @functools.cache
    def matches(k: int, p: int) -> bool:
        if k == len(parts):
            return p == len(source)
        options = [parts[k]]
        first, newline, remainder = parts[k].partition("\n")
        if k and newline and fence_opener(first) is not None:
            options.append(remainder)  # the fence reopened for a cut code block
        return any(source.startswith(c := content(o), p) and matches(k + 1, p + len(c))
                   for o in options)

    assert matches(0, 0), parts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=markdown, limit=st.integers(16, 400), measure=st.sampled_from(sorted(MEASURES)))
@example(text="```" + "x" * 5000 + "\nprint(1)\n```\nafter", limit=4096, measure="utf16")
@example(text="``` a `b` " * 30, limit=16, measure="len")
@example(text="```npm install``` is the first step " * 10, limit=40, measure="len")
def test_split_parts_fit_balance_and_keep_the_text(text: str, limit: int, measure: str) -> None:
    size = MEASURES[measure]
    parts = split_markdown(text, limit, size)
    assert all(size(p) <= limit for p in parts)
    assert all(p.strip() for p in parts)
    assert_nothing_lost_or_repeated(text, parts)
    clusters = set(regex.findall(r"\X", text))  # a cut cluster would leave a new fragment
    assert all(set(regex.findall(r"\X", p)) <= clusters | {"`", "~", "\n"} for p in parts)
    if 4 * (longest_fence_run(text) + 1) <= limit:  # room to close and reopen any fence
        for part in parts[:-1]:
            assert fence_after(part, None) is None, part
        if parts:
            assert (fence_after(parts[-1], None) is None) == (fence_after(text, None) is None)
    for part in parts:
        visible, _ = parse_html(markdown_to_html(part))  # raises where Telegram would refuse
        assert utf16_len(visible) <= utf16_len(part)
    # No flood: every part but the last carries a fair share of the limit.
    assert len(parts) <= size(text) // (limit // 6) + 2


def letters(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum())


def is_subsequence(small: str, big: str) -> bool:
    it = iter(big)
    return all(ch in it for ch in small)


@settings(max_examples=400, deadline=None)
@given(text=markdown)
@example(text="[" * 340 + "deep" + "](mailto:)" * 340)
@example(text="```npm install``` is the first step")
def test_converter_output_parses_and_shows_all_the_words(text: str) -> None:
    visible, _ = parse_html(markdown_to_html(text))
    assert utf16_len(visible) <= utf16_len(text)
    # Nothing invented or repeated: what shows is a subsequence of what was written...
    assert is_subsequence(letters(visible), letters(text))
    # ...and nothing lost, except what Markdown hides: link targets and fence info strings.
    hidden = re.sub(r"\]\((?:https?://|tg://|mailto:)[^\s()<>]*\)", "]", text)
    hidden = "\n".join(line for line in hidden.split("\n") if fence_opener(line) is None)
    assert is_subsequence(letters(hidden), letters(visible))


_COMMONMARK = MarkdownIt("commonmark")


def commonmark_fence_open_at_end(text: str) -> bool:
    """Whether CommonMark leaves a fenced code block open at the end of `text`."""
    sentinel = "zzsentinelzz"
    tokens = _COMMONMARK.parse(text + "\n\n" + sentinel)
    return not any(t.type == "inline" and t.content == sentinel for t in tokens)


fence_doc = st.lists(st.sampled_from(
    ["alpha", " ", "\n", "```", "````", "~~~", "~~~~", "`", "py", "x`y", "   ", "    ", "\t",
     "```npm install```", "~~~ a`b"]), max_size=40).map("".join)


@settings(max_examples=400, deadline=None)
@given(text=fence_doc)
def test_the_shared_fence_rule_is_commonmark(text: str) -> None:
    # Containers (lists, quotes) nest fences differently; this rule is for the top level.
    assume(not re.search(r"^\s*([-*+>]|\d+[.)])", text, re.M))
    assert (fence_after(text, None) is not None) == commonmark_fence_open_at_end(text)
