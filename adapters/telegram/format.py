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
backslash escapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*([^`\s]*)[^`]*$")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
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
        fence = _FENCE_OPEN.match(line)
        if fence:
            flush()
            marker = fence.group(1)
            body: list[str] = []
            i += 1
            while i < len(lines) and not _closes(lines[i], marker):
                body.append(lines[i])
                i += 1
            i += 1  # the closing fence, or past the end when still open
            blocks.append(_code_block(body, fence.group(2)))
            continue
        heading = _HEADING.match(line)
        quote = _QUOTE.match(line)
        if not line.strip():
            flush()
            blocks.append("")
        elif heading:
            flush()
            blocks.append(f"<b>{render_inline(heading.group(1))}</b>")
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


def _closes(line: str, marker: str) -> bool:
    stripped = line.strip()
    return (len(line) - len(line.lstrip(" ")) <= 3 and stripped.startswith(marker[0] * len(marker))
            and set(stripped) == {marker[0]})


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


def render_inline(text: str) -> str:
    """Inline Markdown of one paragraph → HTML."""
    tokens = _tokenize(text)
    _pair(tokens)
    return "".join(t if isinstance(t, str) else t.html() for t in tokens)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    plain: list[str] = []

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
            end = _find_backticks(text, i + run, run)
            if end < 0:
                plain.append("`" * run)
                i += run
            else:
                code = text[i + run:end]
                if code.startswith(" ") and code.endswith(" ") and code.strip():
                    code = code[1:-1]
                push(f"<code>{escape(code)}</code>")
                i = end + run
        elif ch in "[!" and (link := _link(text, i)):
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


def _find_backticks(text: str, start: int, run: int) -> int:
    """Index of the next run of exactly `run` backticks at or after start, or -1."""
    i = text.find("`", start)
    while i >= 0:
        length = _run_length(text, i)
        if length == run:
            return i
        i = text.find("`", i + length)
    return -1


def _link(text: str, i: int) -> tuple[str, int] | None:
    """`[label](url)` (or an image's `![alt](url)`) at i: (HTML, end) or None."""
    start = i + 1 if text[i] == "!" else i
    if start >= len(text) or text[start] != "[":
        return None
    depth, j = 0, start
    while j < len(text):
        if text[j] == "\\":
            j += 2
            continue
        if text[j] == "[":
            depth += 1
        elif text[j] == "]":
            depth -= 1
            if depth == 0:
                break
        elif text[j] == "\n" and j + 1 < len(text) and text[j + 1] == "\n":
            return None
        j += 1
    if j >= len(text) or not text.startswith("(", j + 1):
        return None
    url = _LINK_URL.match(text, j + 2)
    if url is None or not text.startswith(")", url.end()):
        return None
    label = text[start + 1:j]
    shown = render_inline(label) if label.strip() else escape(url.group(0))
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
    become literal. That is what keeps every produced tag pair nested.
    """
    openers: list[_Delim] = []
    for token in tokens:
        if not isinstance(token, _Delim):
            continue
        if token.can_close:
            while token.count and (k := _matching_opener(openers, token)) is not None:
                opener = openers[k]
                del openers[k + 1:]
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
                    openers.pop()
        if token.count and token.can_open:
            openers.append(token)


def _matching_opener(openers: list[_Delim], closer: _Delim) -> int | None:
    for k in range(len(openers) - 1, -1, -1):
        if openers[k].char == closer.char:
            return k
    return None
