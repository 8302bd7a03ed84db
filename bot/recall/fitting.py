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
from bot.tokens import MESSAGE_OVERHEAD, count_tokens

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
) -> Recalled:
    """Hits in rank order with their neighbours, within `budget` tokens as one block.

    The first `paired` hits bring their neighbours at once (none by default);
    the rest of the hits go before the rest of the neighbours, which then
    follow in their hits' rank order.

    The block is one system message: its cost is the header, the lines and
    the message overhead, times the model's calibration `factor`.
    """

    def cost(text: str) -> int:
        return math.ceil(counter(text) * factor)

    fixed = math.ceil((counter(RECALL_HEADER) + MESSAGE_OVERHEAD) * factor)
    room = budget - fixed
    chosen: dict[int, str] = {}  # id → line
    by_id: dict[int, RecallMessage] = {}
    hits: list[int] = []
    used = 0
    bare: dict[tuple[str, str], int] = {}  # (date, role) → a line's cost without content

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
            if cut > start and cost("\n" + line[:cut]) > left:
                return False
        return True

    def take(msg: RecallMessage, clip: bool) -> bool:
        nonlocal used
        if msg.id in chosen:
            return True
        line = render_line(msg)
        if not clip and not may_fit(msg, line, room - used):
            return False
        c = cost("\n" + line)
        if used + c > room:
            if not clip:
                return False
            left = room - used - floor(msg) - cost(ELLIPSIS)
            if left < MIN_CLIP_TOKENS:
                return False
            keep = longest_prefix(msg.content, int(left / factor), counter)
            line = render_line(msg, msg.content[:keep].rstrip() + ELLIPSIS)
            c = cost("\n" + line)
            if used + c > room:
                return False
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
    return Recalled([by_id[i] for i in ids], text, fixed + used, hits)
