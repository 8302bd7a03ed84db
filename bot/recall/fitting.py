"""Fitting recalled messages into RECALL_TOKENS: hits with their neighbours, one block.

A hit is the message a ranking found; an answer often spans two turns, so the
message before and after it come too when they fit (a user's message first
brings the reply to it, a reply first brings the question). Hits go in first,
in rank order, and neighbours only in the room the hits leave: a neighbour is
context, a hit is evidence, and pairing the best hits measured worse in the
memory benchmark (at 4096 tokens words-only 64% → 78% English, 78% → 87%
Chinese once hits go first: a reply is two to four times a question's length,
so each pair cost two or three lower hits). The block keeps
each message's date and speaker and lists them oldest first, under a header
that tells the model what it is reading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from bot.text_fit import longest_prefix
from bot.tokens import (
    MESSAGE_OVERHEAD,
    TokenFactors,
    after_space,
    count_tokens,
    measure,
    measure_fresh,
)

Measured = tuple[int, float]  # tokens.measure's (base tokens, CJK units)

RECALL_HEADER = ("Earlier messages from this conversation that may be relevant, oldest first "
                 "('user' is the person you are talking to, 'you' are your own replies):")
SPEAKERS = {"user": "user", "assistant": "you"}
MIN_CLIP_TOKENS = 24  # a clipped hit shorter than this says too little to be worth it
ELLIPSIS = " …"


# Named tuples, not frozen dataclasses: a turn's recall builds up to 75 of these
# from rows, and a frozen dataclass costs about three times as much to create.
class RecallMessage(NamedTuple):
    id: int
    role: str  # "user" or "assistant"
    content: str
    created_at: str  # ISO 8601; the date is its first ten characters


class Around(NamedTuple):
    """A hit and its neighbours in the conversation (None at either end)."""

    hit: RecallMessage
    before: RecallMessage | None = None
    after: RecallMessage | None = None


@dataclass(frozen=True, slots=True)
class Recalled:
    messages: list[RecallMessage]  # what went in, oldest first
    text: str  # the block ("" when nothing fits)
    tokens: int  # its cost, as the prompt counts it (calibrated)
    hit_ids: list[int]  # the hits that went in, in rank order
    # tokens.measure of `text`, when fitting had the counter's factors and could
    # add it up from its lines (PromptPlan.know: the block is not measured again).
    measured: tuple[int, float] | None = None

    @property
    def ids(self) -> list[int]:
        return [m.id for m in self.messages]


def render_line(msg: RecallMessage, content: str | None = None) -> str:
    speaker = SPEAKERS.get(msg.role, msg.role)
    return f"[{msg.created_at[:10]}] {speaker}: {content if content is not None else msg.content}"


def fit_recalled(
    ranked: Sequence[Around],
    budget: int,
    *,
    factor: float = 1.0,
    counter: Callable[[str], int] = count_tokens,
    paired: int = 0,
    factors: TokenFactors | None = None,
) -> Recalled:
    """Hits in rank order with their neighbours, within `budget` tokens as one block.

    The first `paired` hits bring their neighbours at once (none by default);
    the rest of the hits go before the rest of the neighbours, which then
    follow in their hits' rank order.

    The block is one system message: its cost is the header, the lines and
    the message overhead, times the model's calibration `factor`. With the
    counter's `factors` (counter is then factors.count) the block's measure comes
    along (Recalled.measured), and a line is measured from its content's measure
    (cached: the same message's, in the window or recalled before).
    """
    # One-off texts (prefixes tried, clipped lines) are counted past the cache:
    # they would push out the lines and messages that recur every turn.
    fresh = counter
    if factors is not None:
        counter, fresh = factors.count, factors.count_fresh

    def cost(text: str) -> int:
        return math.ceil(counter(text) * factor)

    fixed = math.ceil((counter(RECALL_HEADER) + MESSAGE_OVERHEAD) * factor)
    room = budget - fixed
    chosen: dict[int, str] = {}  # id → line
    by_id: dict[int, RecallMessage] = {}
    hits: list[int] = []
    used = 0
    bare: dict[tuple[str, str], int] = {}  # (date, role) → a line's cost without content
    heads: dict[tuple[str, str], Measured] = {}  # (date, role) → "\n[date] speaker:"
    line_measures: dict[int, Measured] = {}  # id → its line's measure (with factors)

    def line_measure(msg: RecallMessage) -> Measured:
        # measure("\n" + render_line(msg)): the head ends in ":", which nothing after
        # the space joins, and after_space is the rest's (tokens.after_space).
        key = (msg.created_at[:10], msg.role)
        head = heads.get(key)
        if head is None:
            head = heads[key] = measure(f"\n[{key[0]}] {SPEAKERS.get(msg.role, msg.role)}:")
        b, c = after_space(msg.content)
        return head[0] + b, head[1] + c

    def floor(msg: RecallMessage) -> int:
        # A line with its content costs at least the line without: the counter
        # grows with the text (as longest_prefix needs), and this is its prefix.
        key = (msg.created_at[:10], msg.role)
        if key not in bare:
            bare[key] = cost("\n" + render_line(msg, ""))
        return bare[key]

    def may_fit(msg: RecallMessage, line: str, left: int) -> bool:
        # Once the hits have filled the room, most neighbours don't fit, and a cold
        # count costs about 20 µs a line: a line whose beginning alone costs more
        # than what is left is out without counting the rest. Cut before a space
        # (not inside a word, whose fragment can cost more than the word) the
        # beginning's pieces are the line's, so it costs no more than the line.
        # Its text must cost `need` more than date and speaker: first two
        # characters a token (rare words, CJK), then eight (English runs four).
        bare_cost = floor(msg)
        if bare_cost > left:
            return False
        start = len(line) - len(msg.content)
        need = left - bare_cost + 1
        for chars in (2 * need, 8 * need):
            end = start + chars
            if end >= len(line):  # short enough to count whole
                return True
            cut = line.rfind(" ", start, end + 1)
            while cut > start and line[cut - 1] == " ":
                cut -= 1
            if cut > start and math.ceil(fresh("\n" + line[:cut]) * factor) > left:
                return False
        return True

    def take(msg: RecallMessage, clip: bool) -> bool:
        nonlocal used
        if msg.id in chosen:
            return True
        line = render_line(msg)
        m = None
        if factors is not None:
            # The content's measure is cached (the window's, an earlier turn's) or
            # will be: cheaper than may_fit's one-off prefixes, and the same answer
            # (a prefix that does not fit means the line does not).
            m = line_measure(msg)
            c = math.ceil(factors.of(m) * factor)
        elif not clip and not may_fit(msg, line, room - used):
            return False
        else:
            c = cost("\n" + line)
        if used + c > room:
            if not clip:
                return False
            left = room - used - floor(msg) - cost(ELLIPSIS)
            if left < MIN_CLIP_TOKENS:
                return False
            keep = longest_prefix(msg.content, int(left / factor), fresh)
            line = render_line(msg, msg.content[:keep].rstrip() + ELLIPSIS)
            if factors is not None:
                m = measure_fresh("\n" + line)
                c = math.ceil(factors.of(m) * factor)
            else:
                c = cost("\n" + line)
            if used + c > room:
                return False
        if m is not None:
            line_measures[msg.id] = m
        chosen[msg.id], by_id[msg.id] = line, msg
        used += c
        return True

    def neighbours(item: Around) -> list[RecallMessage]:
        # A user's message first brings the reply to it; a reply, its question.
        order = (item.after, item.before) if item.hit.role == "user" else (item.before,
                                                                          item.after)
        return [m for m in order if m is not None]

    # The best hits come with their neighbours; then the other hits alone; then,
    # in what room is left, the other hits' neighbours.
    for rank, item in enumerate(ranked):
        if room - used <= 0:
            break
        if take(item.hit, clip=True):
            hits.append(item.hit.id)
            if rank < paired:
                for neighbour in neighbours(item):
                    take(neighbour, clip=False)
    for item in ranked[paired:]:
        if item.hit.id in chosen:
            for neighbour in neighbours(item):
                take(neighbour, clip=False)
    if not chosen:
        return Recalled([], "", 0, [])
    ids = sorted(chosen)
    text = RECALL_HEADER + "".join("\n" + chosen[i] for i in ids)
    # The lines' costs add up to at least the whole block's: the estimate's pieces
    # never span a line break except to merge (which only saves), so no recount.
    block = _block_measure([chosen[i] for i in ids], [line_measures[i] for i in ids]) \
        if factors is not None else None
    return Recalled([by_id[i] for i in ids], text, fixed + used, hits, block)


def _block_measure(lines: list[str], measures: list[Measured]) -> Measured | None:
    """tokens.measure of the block from its lines' (each with its line break):
    exact when no line ends in whitespace (a line break would join the next
    line's, and the prompt strips the block's end), see tokens.joined."""
    base, cjk = measure(RECALL_HEADER)
    for line, (b, c) in zip(lines, measures, strict=True):
        if line[-1:].isspace() or not line:
            return None
        base += b
        cjk += c
    return base, cjk
