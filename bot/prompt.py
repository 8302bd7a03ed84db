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

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bot.records import StoredMessage
from bot.tokens import MESSAGE_OVERHEAD, PROMPT_OVERHEAD, count_tokens

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
        system_as_user: bool = False,
        examples: Sequence[dict[str, str]] = (),
    ) -> None:
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
        self._costs: list[int] = []  # history's costs, newest first, as far as needed
        self._texts: dict[str, int] = {}  # system texts already costed

    def _cost(self, text: str) -> int:
        if self._factor == 1.0:
            return self._counter(text) + MESSAGE_OVERHEAD
        return math.ceil((self._counter(text) + MESSAGE_OVERHEAD) * self._factor)

    def _text_cost(self, text: str) -> int:
        cost = self._texts.get(text)
        if cost is None:
            cost = self._texts[text] = self._cost(text)
        return cost

    def _history_cost(self, k: int) -> int:
        """The cost of the k-th newest stored message (0: the newest)."""
        costs = self._costs
        history = self._history
        while len(costs) <= k:
            costs.append(self._cost(history[-1 - len(costs)].content))
        return costs[k]

    def _window(self, budget: int, sections: Sequence[tuple[str, str]],
                late_sections: Sequence[tuple[str, str]]) -> tuple[str, bool, int, int]:
        """(system text, summary used, messages kept, tokens used) within `budget`."""
        base_system = system_text(self._system, [*sections, *late_sections])
        fixed = self._base + self._text_cost(base_system)
        used = fixed + self._new_cost
        if used > budget:
            raise TooLong(used, budget - fixed)
        full_system = base_system
        summary_used = False
        if self._summary:
            with_summary = system_text(self._system, [
                *sections, (SUMMARY_HEADER, self._summary), *late_sections])
            extra = self._text_cost(with_summary) - self._text_cost(base_system)
            if used + extra <= budget:
                full_system, used, summary_used = with_summary, used + extra, True
        history = self._history
        costs = self._costs  # inlined _history_cost: this loop runs per message
        kept = 0
        while kept < len(history):
            if kept == len(costs):
                costs.append(self._cost(history[-1 - kept].content))
            c = costs[kept]
            if used + c > budget:
                break
            used += c
            kept += 1
        # A reply without the question it answers misleads the model.
        while kept and history[len(history) - kept].role == "assistant":
            kept -= 1
            used -= self._history_cost(kept)
        return full_system, summary_used, kept, used

    def oldest_kept(self, budget: int, sections: Sequence[tuple[str, str]] = ()) \
            -> tuple[int | None, int]:
        """(id of the oldest stored message the window keeps within `budget`, how many
        loaded messages it leaves out), without building the messages."""
        _, _, kept, _ = self._window(budget, sections, ())
        history = self._history
        return (history[len(history) - kept].id if kept else None), len(history) - kept

    def build(self, budget: int, sections: Sequence[tuple[str, str]] = (),
              late_sections: Sequence[tuple[str, str]] = ()) -> Prompt:
        """System text, summary, as many newest messages as fit, the new message."""
        full_system, summary_used, kept, used = self._window(budget, sections, late_sections)
        history = self._history
        window = history[len(history) - kept:] if kept else ()
        # Strictly alternating turns: consecutive turns of one role merge.
        turns: list[dict[str, Any]] = []
        for role, content in itertools.chain(
                ((e["role"], e["content"]) for e in self._shown),
                ((m.role, m.content) for m in window), (("user", self._new_text),)):
            if turns and turns[-1]["role"] == role:
                turns[-1]["content"] = f"{turns[-1]['content']}\n\n{content}"
            else:
                turns.append({"role": role, "content": content})
        if self._system_as_user:
            first = turns[0]["content"]
            head = f"{full_system}\n\n{first}" if full_system else first
            messages = [{"role": "user", "content": head}, *turns[1:]]
        else:
            messages = [{"role": "system", "content": full_system}, *turns]
        return Prompt(
            messages=messages,
            history_used=kept,
            oldest_used_id=window[0].id if kept else None,
            dropped=len(history) - kept,
            summary_used=summary_used,
            tokens=used,
        )


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
