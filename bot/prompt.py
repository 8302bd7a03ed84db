"""Fitting a conversation into the context window, in a shape every chat template takes.

Some chat templates drop every system message but the first (or all of
them: Gemma's), others refuse two system messages or two user turns in a
row (Mistral's). So a prompt is exactly one system message, holding the
system prompt and every other instruction in labelled sections (summary,
notes, recall), then strictly alternating user/assistant turns ending with
the user. With `system_as_user` the system text goes at the head of the
first user message instead, for templates without a system role.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bot.records import StoredMessage
from bot.tokens import (
    MESSAGE_OVERHEAD,
    PROMPT_OVERHEAD,
    TokenFactors,
    count_tokens,
    joined,
    measure,
)

Measured = tuple[int, float]  # tokens.measure's (base tokens, CJK units)

SUMMARY_HEADER = "Summary of the earlier conversation with this user:"


class TooLong(Exception):
    """The new message alone does not fit the budget."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"{tokens} tokens > {limit}")
        self.tokens = tokens
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Prompt:
    messages: list[dict[str, Any]]
    history_used: int  # stored messages that went in
    oldest_used_id: int | None  # id of the oldest stored message that went in
    dropped: int  # loaded stored messages that did not fit
    summary_used: bool
    tokens: int  # estimated, after calibration
    # The messages' tokens.measure with the prompt's overheads (what
    # Calibration.observe adds up), when the plan had the counter's factors.
    measured: Measured | None = None


def system_text(system: str, sections: Sequence[tuple[str, str]]) -> str:
    """The one system message: the system prompt, then each (title, text) section."""
    parts = [system.strip()] if system.strip() else []
    parts += [f"## {title}\n{text.strip()}" for title, text in sections if text.strip()]
    return "\n\n".join(parts)


def alternate(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge consecutive turns of one role, so user and assistant alternate."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"] and m["role"] != "system":
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{m['content']}"}
        else:
            out.append(dict(m))
    return out


class PromptPlan:
    """One turn's prompt, each part costed once: the window's start for recall and
    every fit after it (without the recall block, the notes, at a lower target)
    reuse the same counts, so a stored message is counted once per turn."""

    def __init__(
        self,
        system: str,
        history: Sequence[StoredMessage],
        new_text: str,
        *,
        summary: str | None = None,
        factor: float = 1.0,
        counter: Callable[[str], int] = count_tokens,
        factors: TokenFactors | None = None,
        system_as_user: bool = False,
        examples: Sequence[dict[str, str]] = (),
    ) -> None:
        # With the counter's factors (counter is then factors.count), the system
        # text is costed from its parts' measures: the recalled block is new text
        # every turn, and measuring it again inside the whole costs a fifth of a turn.
        self._factors = factors
        if factors is not None:
            counter = factors.count
        self._counter = counter
        self._factor = factor
        self._history = history
        self._new_text = new_text
        self._summary = summary
        self._system_as_user = system_as_user
        self._shown = [e for e in examples if e["role"] in ("user", "assistant")]
        self._system = "\n\n".join(
            [system, *(e["content"] for e in examples if e["role"] == "system")])
        self._base = math.ceil(PROMPT_OVERHEAD * factor) \
            + sum(self._cost(e["content"]) for e in self._shown)
        self._new_cost = self._cost(new_text)
        # Running totals of the history's costs, newest first, as far as needed:
        # _spent[k] is what the k newest stored messages cost together.
        self._spent: list[int] = [0]
        self._texts: dict[str, int] = {}  # system texts already costed
        self._known: dict[str, Measured] = {}  # texts measured elsewhere (see `know`)
        self._system_measured = self._measure(self._system.strip()) \
            if factors is not None and self._system.strip() else None

    def know(self, text: str, measured: Measured | None) -> None:
        """`text` (a section's, already stripped) has this tokens.measure: e.g. the
        recalled block, which fitting measured line by line."""
        if measured is not None and self._factors is not None:
            self._known[text] = measured

    def _measure(self, text: str) -> Measured:
        known = self._known.get(text)
        return known if known is not None else measure(text)

    def _system_parts(self, sections: Sequence[tuple[str, str]]) -> Measured:
        """tokens.measure of system_text(self._system, sections), from its parts:
        each part starts and ends with other than a line break (stripped; a
        section starts with "## "), so `joined` is exact."""
        parts = [] if self._system_measured is None else [self._system_measured]
        for title, text in sections:
            body = text.strip()
            if body:
                # "## title\n" ends in a line break and the body starts with none.
                head_b, head_c = measure(f"## {title}\n")
                b, c = self._measure(body)
                parts.append((head_b + b, head_c + c))
        return joined(parts)

    def _system_cost(self, sections: Sequence[tuple[str, str]]) -> tuple[str, int,
                                                                        Measured | None]:
        """(system text, its cost, its measure when the plan has the factors)."""
        text = system_text(self._system, sections)
        if self._factors is None:
            return text, self._text_cost(text), None
        m = self._system_parts(sections)
        c = self._factors.of(m) + MESSAGE_OVERHEAD
        return text, c if self._factor == 1.0 else math.ceil(c * self._factor), m

    def _cost(self, text: str) -> int:
        if self._factor == 1.0:
            return self._counter(text) + MESSAGE_OVERHEAD
        return math.ceil((self._counter(text) + MESSAGE_OVERHEAD) * self._factor)

    def _text_cost(self, text: str) -> int:
        cost = self._texts.get(text)
        if cost is None:
            cost = self._texts[text] = self._cost(text)
        return cost

    def _spend_up_to(self, room: int) -> None:
        """Cost older messages until their running total passes `room` (or none are left)."""
        spent = self._spent
        history = self._history
        counter, factor = self._counter, self._factor
        total = spent[-1]
        while total <= room and len(spent) <= len(history):
            # A few at a time: a window stops well before a long history's start.
            done = len(spent) - 1
            for m in reversed(history[max(0, len(history) - done - 16):len(history) - done]):
                c = counter(m.content) + MESSAGE_OVERHEAD
                total += c if factor == 1.0 else math.ceil(c * factor)
                spent.append(total)

    def _window(self, budget: int, sections: Sequence[tuple[str, str]],
                late_sections: Sequence[tuple[str, str]]
                ) -> tuple[str, Measured | None, bool, int, int]:
        """(system text, its measure, summary used, messages kept, tokens used)
        within `budget`."""
        base_system, base_cost, full_measured = self._system_cost(
            [*sections, *late_sections])
        fixed = self._base + base_cost
        used = fixed + self._new_cost
        if used > budget:
            raise TooLong(used, budget - fixed)
        full_system = base_system
        summary_used = False
        if self._summary:
            with_summary, summary_cost, summary_measured = self._system_cost([
                *sections, (SUMMARY_HEADER, self._summary), *late_sections])
            extra = summary_cost - base_cost
            if used + extra <= budget:
                full_system, used, summary_used = with_summary, used + extra, True
                full_measured = summary_measured
        history = self._history
        room = budget - used
        self._spend_up_to(room)
        spent = self._spent
        # The most newest messages whose costs fit the room together.
        kept = bisect.bisect_right(spent, room) - 1
        # A reply without the question it answers misleads the model.
        while kept and history[len(history) - kept].role == "assistant":
            kept -= 1
        return full_system, full_measured, summary_used, kept, used + spent[kept]

    def oldest_kept(self, budget: int, sections: Sequence[tuple[str, str]] = ()) \
            -> tuple[int | None, int]:
        """(id of the oldest stored message the window keeps within `budget`, how many
        loaded messages it leaves out), without building the messages."""
        _, _, _, kept, _ = self._window(budget, sections, ())
        history = self._history
        return (history[len(history) - kept].id if kept else None), len(history) - kept

    def build(self, budget: int, sections: Sequence[tuple[str, str]] = (),
              late_sections: Sequence[tuple[str, str]] = ()) -> Prompt:
        """System text, summary, as many newest messages as fit, the new message."""
        full_system, system_measured, summary_used, kept, used = self._window(
            budget, sections, late_sections)
        history = self._history
        window = history[len(history) - kept:] if kept else ()
        turns = [{"role": e["role"], "content": e["content"]} for e in self._shown]
        turns += [{"role": m.role, "content": m.content} for m in window]
        turns.append({"role": "user", "content": self._new_text})
        roles = [t["role"] for t in turns]
        if any(map(operator.eq, roles, itertools.islice(roles, 1, None))):
            turns = _alternating(turns)
        if self._system_as_user:
            first = turns[0]["content"]
            head = f"{full_system}\n\n{first}" if full_system else first
            messages = [{"role": "user", "content": head}, *turns[1:]]
        else:
            messages = [{"role": "system", "content": full_system}, *turns]
        measured = None if system_measured is None \
            else self._prompt_measure(system_measured, messages)
        return Prompt(
            messages=messages,
            history_used=kept,
            oldest_used_id=window[0].id if kept else None,
            dropped=len(history) - kept,
            summary_used=summary_used,
            tokens=used,
            measured=measured,
        )

    def _prompt_measure(self, system: Measured, messages: list[dict[str, Any]]) -> Measured:
        """What Calibration.observe would measure of the built prompt. Only the
        system text is new (its parts' sum); the turns' texts were measured by the
        costing (cached), a merged or system-as-user one is measured whole (rare)."""
        base, cjk = PROMPT_OVERHEAD + MESSAGE_OVERHEAD * len(messages), 0.0
        rest = messages
        if not self._system_as_user:
            base, cjk = base + system[0], cjk + system[1]
            rest = messages[1:]
        for m in rest:
            b, c = measure(m["content"])
            base += b
            cjk += c
        return base, cjk


def _alternating(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Strictly alternating turns: consecutive turns of one role merge."""
    out: list[dict[str, Any]] = []
    for t in turns:
        if out and out[-1]["role"] == t["role"]:
            out[-1]["content"] = f"{out[-1]['content']}\n\n{t['content']}"
        else:
            out.append(t)
    return out


def build_prompt(
    system: str,
    history: Sequence[StoredMessage],
    new_text: str,
    budget: int,
    *,
    summary: str | None = None,
    factor: float = 1.0,
    counter: Callable[[str], int] = count_tokens,
    sections: Sequence[tuple[str, str]] = (),
    late_sections: Sequence[tuple[str, str]] = (),
    system_as_user: bool = False,
    examples: Sequence[dict[str, str]] = (),
) -> Prompt:
    """System text, summary, as many newest messages as fit, the new message.

    Oldest whole messages go first; the system prompt, the sections and the
    new message always stay, the summary if it fits. `counter` is the
    model's (calibrated) estimate; `factor` an extra multiplier on it.
    `examples` (a persona's Modelfile MESSAGE lines) always stay, right
    after the system text: user/assistant turns before the history, and a
    system example joins the system text. `sections` come before the summary
    (notes), `late_sections` after it (recall). One PromptPlan, used once.
    """
    return PromptPlan(system, history, new_text, summary=summary, factor=factor,
                      counter=counter, system_as_user=system_as_user,
                      examples=examples).build(budget, sections, late_sections)
