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
    system example joins the system text.
    """

    def cost(text: str) -> int:
        return math.ceil((counter(text) + MESSAGE_OVERHEAD) * factor)

    # `sections` come before the summary (notes), `late_sections` after it (recall);
    # all of them always stay, the summary only if it fits.
    shown = [e for e in examples if e["role"] in ("user", "assistant")]
    system = "\n\n".join([system, *(e["content"] for e in examples if e["role"] == "system")])
    base_system = system_text(system, [*sections, *late_sections])
    fixed = math.ceil(PROMPT_OVERHEAD * factor) + cost(base_system) \
        + sum(cost(e["content"]) for e in shown)
    new_cost = cost(new_text)
    if fixed + new_cost > budget:
        raise TooLong(fixed + new_cost, budget - fixed)
    used = fixed + new_cost
    full_system = base_system
    summary_used = False
    if summary:
        with_summary = system_text(system, [*sections, (SUMMARY_HEADER, summary),
                                            *late_sections])
        extra = cost(with_summary) - cost(base_system)
        if used + extra <= budget:
            full_system, used, summary_used = with_summary, used + extra, True
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
    turns = alternate([*shown, *({"role": m.role, "content": m.content} for m in kept),
                       {"role": "user", "content": new_text}])
    if system_as_user:
        head = f"{full_system}\n\n{turns[0]['content']}" if full_system else turns[0]["content"]
        messages = [{"role": "user", "content": head}, *turns[1:]]
    else:
        messages = [{"role": "system", "content": full_system}, *turns]
    return Prompt(
        messages=messages,
        history_used=len(kept),
        oldest_used_id=kept[0].id if kept else None,
        dropped=len(history) - len(kept),
        summary_used=summary_used,
        tokens=used,
    )
