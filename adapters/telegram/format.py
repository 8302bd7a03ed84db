"""Model Markdown → Telegram HTML (parse_mode="HTML").

Written here rather than taken from chatgpt_md_converter, which drops text
(anything in 【…】), can leave its own placeholders in the output, un-escapes
a literal `</span>` and can emit misnested tags. This converter has one
promise instead: the output is always well-formed Telegram HTML with every
`<`, `>` and `&` of the text escaped, and it shows all of the text. What it
does not understand stays literal. Tags are only ever produced in balanced,
properly nested pairs, so half-streamed Markdown (an unclosed `**`, an open
code fence) renders too; an open fence is closed at the end.

Handled: fenced code blocks (with language), `inline code`, **bold**,
*italic* / _italic_, ***both***, ~~strike~~, ||spoiler||, [links](https://…),
<https://autolinks>, # headings (bold), > quotes, list bullets, and
backslash escapes. Fences are CommonMark's, decided by the same code as the
splitter's (bot.render.fence_opener), so both agree on what is a code block.

Every step is linear in the text (brackets are matched in one pass, backtick
runs are looked up, emphasis openers are kept per character, a link's label is
rendered without links inside): a reply of brackets or nested links converts
in time proportional to its length, without recursion.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from bot.render import fence_opener

_QUOTE = re.compile(r"^ {0,3}>[ \t]?(.*)$")
_BULLET = re.compile(r"^([ \t]*)[-*+][ \t]+(?=\S)")
_LANGUAGE = re.compile(r"[A-Za-z0-9_+#.-]{1,32}")
_LINK_URL = re.compile(r"(?:https?://|tg://|mailto:)[^\s()<>]*(?:\([^\s()<>]*\)[^\s()<>]*)*")
_AUTOLINK = re.compile(r"<((?:https?|tg)://[^\s<>]+|mailto:[^\s<>]+)>")
_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_DELIMS = frozenset("*_~|")
_TAGS = {"b": ("<b>", "</b>"), "i": ("<i>", "</i>"), "s": ("<s>", "</s>"),
         "spoiler": ("<tg-spoiler>", "</tg-spoiler>")}


def escape(text: str) -> str:
    """Escape text for Telegram HTML (the three characters it requires)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _escape_attr(text: str) -> str:
    return escape(text).replace('"', "&quot;")


def markdown_to_html(markdown: str) -> str:
    """Telegram HTML showing `markdown` with its formatting; always parseable."""
    blocks: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append(render_inline("\n".join(paragraph)))
            paragraph.clear()

    lines = markdown.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = fence_opener(line)
        if fence:
            flush()
            body: list[str] = []
            i += 1
            while i < len(lines) and not fence.closes(lines[i]):
                body.append(lines[i])
                i += 1
            i += 1  # the closing fence, or past the end when still open
            blocks.append(_code_block(body, fence.info.split(maxsplit=1)[0]
                                      if fence.info else ""))
            continue
        heading = _heading(line)
        quote = _QUOTE.match(line)
        if not line.strip():
            flush()
            blocks.append("")
        elif heading is not None:
            flush()
            blocks.append(f"<b>{render_inline(heading)}</b>")
        elif quote:
            flush()
            quoted = [quote.group(1)]
            while i + 1 < len(lines) and (more := _QUOTE.match(lines[i + 1])):
                quoted.append(more.group(1))
                i += 1
            blocks.append(f"<blockquote>{render_inline(chr(10).join(quoted))}</blockquote>")
        else:
            paragraph.append(_BULLET.sub(r"\1• ", line))
        i += 1
    flush()
    return "\n".join(blocks)


def _heading(line: str) -> str | None:
    """The text of an ATX heading line (`# Title #`), or None (no regex: linear)."""
    stripped = line.lstrip(" ")
    if len(line) - len(stripped) > 3:
        return None
    hashes = len(stripped) - len(stripped.lstrip("#"))
    rest = stripped[hashes:]
    if not 1 <= hashes <= 6 or not rest or rest[0] not in " \t":
        return None
    content = rest.strip(" \t")
    unclosed = content.rstrip("#")
    if not unclosed:
        return ""
    if unclosed != content and unclosed[-1] in " \t":
        return unclosed.rstrip(" \t")  # the optional closing sequence
    return content


def _code_block(body: list[str], info: str) -> str:
    code = escape("\n".join(body))
    if not code.strip():
        return ""  # a fence just opened while streaming: nothing to show yet
    if _LANGUAGE.fullmatch(info):
        return f'<pre><code class="language-{info}">{code}</code></pre>'
    return f"<pre>{code}</pre>"


# --------------------------------------------------------------------------- inline


@dataclass
class _Delim:
    """A run of `*`, `_`, `~~` or `||` that may open or close emphasis."""

    char: str
    count: int
    can_open: bool
    can_close: bool
    opens: list[str] = field(default_factory=list)  # tags opened here, outermost first
    closes: list[str] = field(default_factory=list)  # tags closed here, innermost first

    def html(self) -> str:
        closing = "".join(_TAGS[t][1] for t in self.closes)
        opening = "".join(_TAGS[t][0] for t in self.opens)
        return closing + escape(self.char * self.count) + opening


_Token = str | _Delim  # a str is finished HTML


def render_inline(text: str, *, links: bool = True) -> str:
    """Inline Markdown of one paragraph → HTML (a link's label: `links=False`)."""
    tokens = _tokenize(text, links)
    _pair(tokens)
    return "".join(t if isinstance(t, str) else t.html() for t in tokens)


class _Backticks:
    """Every maximal run of backticks in a text, by length, for O(log n) look-ups."""

    def __init__(self, text: str) -> None:
        self._starts: dict[int, list[int]] = {}
        i = text.find("`")
        while i >= 0:
            run = _run_length(text, i)
            self._starts.setdefault(run, []).append(i)
            i = text.find("`", i + run)

    def find(self, start: int, run: int) -> int:
        """Start of the next run of exactly `run` backticks at or after start, or -1."""
        starts = self._starts.get(run, [])
        k = bisect.bisect_left(starts, start)
        return starts[k] if k < len(starts) else -1


def _bracket_matches(text: str) -> dict[int, int]:
    """Each `[` → its matching `]` (escapes skipped, none across a blank line), one pass."""
    matches: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "[":
            stack.append(i)
        elif ch == "]" and stack:
            matches[stack.pop()] = i
        elif ch == "\n" and text.startswith("\n", i + 1):
            stack.clear()
        i += 1
    return matches


def _tokenize(text: str, links: bool = True) -> list[_Token]:
    tokens: list[_Token] = []
    plain: list[str] = []
    backticks = _Backticks(text) if "`" in text else None
    brackets = _bracket_matches(text) if links and "[" in text else {}

    def push(html: str | _Delim) -> None:
        if plain:
            tokens.append(escape("".join(plain)))
            plain.clear()
        tokens.append(html)

    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in _PUNCT:
            plain.append(text[i + 1])
            i += 2
        elif ch == "`":
            run = _run_length(text, i)
            assert backticks is not None
            end = backticks.find(i + run, run)
            if end < 0:
                plain.append("`" * run)
                i += run
            else:
                code = text[i + run:end]
                if code.startswith(" ") and code.endswith(" ") and code.strip():
                    code = code[1:-1]
                push(f"<code>{escape(code)}</code>")
                i = end + run
        elif ch in "[!" and brackets and (link := _link(text, i, brackets)):
            html, i = link
            push(html)
        elif ch == "<" and (auto := _AUTOLINK.match(text, i)):
            url = auto.group(1)
            push(f'<a href="{_escape_attr(url)}">{escape(url)}</a>')
            i = auto.end()
        elif ch in _DELIMS:
            run = _run_length(text, i)
            if (ch in "*_" and run <= 3) or (ch in "~|" and run == 2):
                push(_delim(text, i, run))
            else:
                plain.append(ch * run)
            i += run
        else:
            plain.append(ch)
            i += 1
    if plain:
        tokens.append(escape("".join(plain)))
    return tokens


def _run_length(text: str, i: int) -> int:
    j = i
    while j < len(text) and text[j] == text[i]:
        j += 1
    return j - i


def _link(text: str, i: int, brackets: dict[int, int]) -> tuple[str, int] | None:
    """`[label](url)` (or an image's `![alt](url)`) at i: (HTML, end) or None."""
    start = i + 1 if text[i] == "!" else i
    j = brackets.get(start, -1)
    if j < 0 or not text.startswith("(", j + 1):
        return None
    url = _LINK_URL.match(text, j + 2)
    if url is None or not text.startswith(")", url.end()):
        return None
    label = text[start + 1:j]
    # Telegram has no links in links: the label's own brackets stay literal.
    shown = render_inline(label, links=False) if label.strip() else escape(url.group(0))
    return f'<a href="{_escape_attr(url.group(0))}">{shown}</a>', url.end() + 1


def _delim(text: str, i: int, run: int) -> _Delim:
    before = text[i - 1] if i > 0 else " "
    after = text[i + run] if i + run < len(text) else " "
    left = not after.isspace() and (
        after not in _PUNCT or before.isspace() or before in _PUNCT)
    right = not before.isspace() and (
        before not in _PUNCT or after.isspace() or after in _PUNCT)
    ch = text[i]
    if ch == "_":  # no emphasis inside words: snake_case stays literal
        return _Delim(ch, run, left and (not right or before in _PUNCT),
                      right and (not left or after in _PUNCT))
    return _Delim(ch, run, left, right)


def _pair(tokens: list[_Token]) -> None:
    """Match openers with closers (a simplified CommonMark "process emphasis").

    A closer pairs with the nearest opener of its kind; openers in between
    become literal. That is what keeps every produced tag pair nested. The
    openers of each character are indexed, so a closer finds its own in O(1).
    """
    openers: list[_Delim] = []
    by_char: dict[str, list[int]] = {ch: [] for ch in _DELIMS}  # indices into openers

    def keep(n: int) -> None:  # drop openers[n:], and their index entries
        del openers[n:]
        for stack in by_char.values():
            while stack and stack[-1] >= n:
                stack.pop()

    for token in tokens:
        if not isinstance(token, _Delim):
            continue
        if token.can_close:
            while token.count and by_char[token.char]:
                k = by_char[token.char][-1]
                opener = openers[k]
                keep(k + 1)
                if token.char in "~|":
                    used, tag = 2, ("s" if token.char == "~" else "spoiler")
                else:
                    used = 2 if opener.count >= 2 and token.count >= 2 else 1
                    tag = "b" if used == 2 else "i"
                opener.count -= used
                token.count -= used
                opener.opens.insert(0, tag)
                token.closes.append(tag)
                if not opener.count:
                    keep(k)
        if token.count and token.can_open:
            by_char[token.char].append(len(openers))
            openers.append(token)
