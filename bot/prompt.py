"""Fitting a conversation into the context window."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    messages: list[dict[str, str]]
    history_used: int  # stored messages that went in
    oldest_used_id: int | None  # id of the oldest stored message that went in
    dropped: int  # loaded stored messages that did not fit
    summary_used: bool
    tokens: int  # estimated, after calibration


def build_prompt(
    system: str,
    history: Sequence[StoredMessage],
    new_text: str,
    budget: int,
    *,
    summary: str | None = None,
    factor: float = 1.0,
    counter: Callable[[str], int] = count_tokens,
) -> Prompt:
    """System prompt, summary, as many newest messages as fit, the new message.

    Oldest whole messages go first; the system prompt and the new message
    always stay. `factor` is the model's calibration of the estimate.
    """

    def cost(text: str) -> int:
        return math.ceil((counter(text) + MESSAGE_OVERHEAD) * factor)

    fixed = math.ceil(PROMPT_OVERHEAD * factor) + cost(system)
    new_cost = cost(new_text)
    if fixed + new_cost > budget:
        raise TooLong(fixed + new_cost, budget - fixed)
    used = fixed + new_cost
    head = [{"role": "system", "content": system}]
    summary_used = False
    if summary:
        text = f"{SUMMARY_HEADER}\n{summary}"
        if used + cost(text) <= budget:
            head.append({"role": "system", "content": text})
            used += cost(text)
            summary_used = True
    kept: list[StoredMessage] = []
    for msg in reversed(history):
        c = cost(msg.content)
        if used + c > budget:
            break
        kept.append(msg)
        used += c
    kept.reverse()
    # A reply without the question it answers misleads the model.
    while kept and kept[0].role == "assistant":
        used -= cost(kept[0].content)
        kept.pop(0)
    messages = head + [{"role": m.role, "content": m.content} for m in kept]
    messages.append({"role": "user", "content": new_text})
    return Prompt(
        messages=messages,
        history_used=len(kept),
        oldest_used_id=kept[0].id if kept else None,
        dropped=len(history) - len(kept),
        summary_used=summary_used,
        tokens=used,
    )
