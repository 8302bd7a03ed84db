"""Markdown → Telegram HTML: always parseable by Telegram's rules, nothing lost.

The emulator's parser (Telegram's HTML rules, stricter about a bare `&`) is the
judge: what it accepts, the real Bot API accepts.
"""

from __future__ import annotations

import random

import pytest

from adapters.telegram.format import markdown_to_html
from bot.render import split_markdown, utf16_len
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


@pytest.mark.parametrize(("markdown", "text", "entities"), [
    ("**bold and `code and <tag> & stuff", "**bold and `code and <tag> & stuff", []),
    ("a < b && c > d; x &lt; y", "a < b && c > d; x &lt; y", []),
    ("</span> <blockquote> <b>not a tag</b>", "</span> <blockquote> <b>not a tag</b>", []),
    ("**a _b** c_", "a _b c_", [("bold", "a _b")]),
    ("[x](http://a\"b) and [y](javascript:alert(1))", "x and [y](javascript:alert(1))",
     [("text_link", "x")]),
    ("see 【source】 here", "see 【source】 here", []),
    ("_ _ __ * ** *** ~~ || `", "_ _ __ * ** *** ~~ || `", []),
])
def test_special_characters_and_broken_markup_show_as_typed(
        markdown: str, text: str, entities: list[tuple[str, str]]) -> None:
    assert shown(markdown)[0] == text
    assert kinds(markdown) == entities


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


# ----------------------------------------------------------------- issue 11, items 8 and 10


def test_inline_triple_backticks_are_inline_code_for_converter_and_splitter() -> None:
    markdown = "```npm install``` is the first step.\n\nThen **run** it."
    assert kinds(markdown) == [("code", "npm install"), ("bold", "run")]
    assert shown(markdown)[0] == "npm install is the first step.\n\nThen run it."
    # The splitter agrees: no code block to close and reopen.
    chunks = split_markdown(markdown + " more" * 40, 64)
    assert kinds(chunks[0])[:1] == [("code", "npm install")]
    assert all("```" not in c for c in chunks[1:])


def test_four_backtick_and_tilde_fences_hold_shorter_fences() -> None:
    text, entities = shown("````md\n```py\nx\n```\n````\n~~~\n```\n~~~\nafter")
    assert text == "```py\nx\n```\n```\nafter"
    assert [e["type"] for e in entities] == ["pre", "pre"]


@pytest.mark.timeout(20)
def test_nested_links_convert_without_recursion() -> None:
    for depth in (340, 5000):
        markdown = "[" * depth + "deep" + "](mailto:)" * depth
        text, entities = shown(markdown)
        assert "deep" in text and entities[0]["type"] == "text_link"
    assert kinds("[[x](https://a.b)](https://c.d)") == [("text_link", "[x](https://a.b)")]


@pytest.mark.timeout(20)  # on quadratic code each of these takes from 40 s to minutes
@pytest.mark.parametrize("markdown", [
    "[" * 100_000, "[]" * 50_000, "[a](" * 25_000, "![" * 50_000, "*" * 100_000,
    "_a " * 20_000 + "a* " * 20_000, "".join("`" * k + " x " for k in range(1, 450)),
    "# " + " " * 100_000 + "x", "```" + "a" * 100_000 + "`", "<http://a" * 5_000,
])
def test_pathological_replies_convert_in_linear_time(markdown: str) -> None:
    text, _ = shown(markdown)
    assert utf16_len(text) <= utf16_len(markdown)
    if markdown.startswith("["):
        assert text == markdown  # nothing there is a link: all of it shows
