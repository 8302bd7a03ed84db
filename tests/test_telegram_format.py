"""Markdown → Telegram HTML: always parseable by Telegram's rules, nothing lost.

The emulator's parser (Telegram's HTML rules, stricter about a bare `&`) is the
judge: what it accepts, the real Bot API accepts.
"""

from __future__ import annotations

import random

import pytest

from adapters.telegram.format import markdown_to_html
from bot.render import utf16_len
from tests.fakes.telegram_api import parse_html


def shown(markdown: str) -> tuple[str, list[dict[str, object]]]:
    """What a Telegram user sees for the model's Markdown."""
    return parse_html(markdown_to_html(markdown))


def kinds(markdown: str) -> list[tuple[str, str]]:
    text, entities = shown(markdown)
    data = text.encode("utf-16-le")
    spans = [(int(str(e["offset"])), int(str(e["length"]))) for e in entities]
    return [(str(e["type"]), data[2 * start:2 * (start + length)].decode("utf-16-le"))
            for e, (start, length) in zip(entities, spans, strict=True)]


@pytest.mark.parametrize("markdown", [
    "**bold and `code and <tag> & stuff",
    "a < b && c > d; x &lt; y",
    "</span> <blockquote> <b>not a tag</b>",
    "**a _b** c_",
    "[x](http://a\"b) and [y](javascript:alert(1))",
    "see 【source】 here",
    "_ _ __ * ** *** ~~ || `",
])
def test_special_characters_and_broken_markup_show_as_typed(markdown: str) -> None:
    text, _ = shown(markdown)
    for piece in ("<tag>", "&", "<", "</span>", "【source】", "javascript:alert(1)"):
        if piece in markdown:
            assert piece in text


def test_formatting_that_converts_cleanly() -> None:
    assert kinds("**bold** *it* _it2_ ~~gone~~ ||hidden|| `x<y`") == [
        ("bold", "bold"), ("italic", "it"), ("italic", "it2"), ("strikethrough", "gone"),
        ("spoiler", "hidden"), ("code", "x<y")]
    assert sorted(kinds("***both***")) == [("bold", "both"), ("italic", "both")]
    assert kinds("[docs](https://example.org/a_(b)?q=1&r=2)") == [("text_link", "docs")]
    assert shown("[docs](https://example.org/?q=1&r=2)")[1][0]["url"] == \
        "https://example.org/?q=1&r=2"
    assert kinds("# Title\n\n> quoted **line**") == [
        ("bold", "Title"), ("blockquote", "quoted line"), ("bold", "line")]


def test_words_with_underscores_stay_words() -> None:
    assert shown("call snake_case_name or __init__ now")[0] == \
        "call snake_case_name or init now"
    assert shown("2 * 3 * 4")[0] == "2 * 3 * 4"


def test_code_blocks_keep_their_text_and_language() -> None:
    markdown = "Look:\n```python\nif a < b and c & d:\n\n\n    print('**no**')\n```\ndone"
    text, entities = shown(markdown)
    assert text == "Look:\nif a < b and c & d:\n\n\n    print('**no**')\ndone"
    [pre] = entities
    assert pre["type"] == "pre" and pre["language"] == "python"


def test_an_open_code_fence_is_closed_for_streaming() -> None:
    text, entities = shown("Here:\n```js\nlet x = 1 <")
    assert text == "Here:\nlet x = 1 <" and entities[0]["type"] == "pre"


def test_lists_get_bullets() -> None:
    assert shown("- one\n* two\n  + three")[0] == "• one\n• two\n  • three"


def test_every_prefix_of_a_streamed_reply_parses() -> None:
    reply = ("# Plan\n\nHere is **the _plan_** with `code` and a [link](https://x.org).\n\n"
             "- step *one*\n- step ~~two~~\n\n> a quote & more\n\n```python\nx = 1 < 2\n```\n"
             "我叫小明 ||秘密|| done.")
    for end in range(1, len(reply) + 1):
        parse_html(markdown_to_html(reply[:end]))  # raises if Telegram would refuse it


def test_random_markdown_always_parses_and_never_grows() -> None:
    # Telegram's 4096 limit applies to the visible text: the renderer measures the
    # Markdown, so the visible text must never be longer than it.
    pieces = [*"ab *_~|`[]()<>&#\n\\!-", "**", "```", "```py\n", "\n```\n", "http://x.y",
              "> ", "# ", "||", "~~", "我", "😀", "&amp;", "](https://e.org)"]
    rng = random.Random(20240611)
    for _ in range(3000):
        markdown = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        text, _ = shown(markdown)
        assert utf16_len(text) <= utf16_len(markdown), markdown
