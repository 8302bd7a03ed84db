"""PromptPlan: one count per message per turn, and the very prompt the one-shot fit gave.

The reference below is build_prompt as it was before the plan (each call
counting every message again); the plan must give the same messages, counts
and window for any history, budget, sections, summary, examples and factor,
count each stored message at most once however many fits a turn makes, and
find the recall window's start exactly where a fit at that budget starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.prompt import SUMMARY_HEADER, PromptPlan, TooLong, build_prompt, system_text
from bot.records import StoredMessage
from bot.tokens import MESSAGE_OVERHEAD, PROMPT_OVERHEAD, TokenFactors, count_tokens


def reference(system: str, history: Sequence[StoredMessage], new_text: str, budget: int, *,
              summary: str | None = None, factor: float = 1.0,
              counter: Callable[[str], int] = count_tokens,
              sections: Sequence[tuple[str, str]] = (),
              late_sections: Sequence[tuple[str, str]] = (),
              system_as_user: bool = False,
              examples: Sequence[dict[str, str]] = ()) -> dict[str, Any]:
    def cost(text: str) -> int:
        return math.ceil((counter(text) + MESSAGE_OVERHEAD) * factor)

    shown = [e for e in examples if e["role"] in ("user", "assistant")]
    system = "\n\n".join([system, *(e["content"] for e in examples if e["role"] == "system")])
    base_system = system_text(system, [*sections, *late_sections])
    fixed = math.ceil(PROMPT_OVERHEAD * factor) + cost(base_system) \
        + sum(cost(e["content"]) for e in shown)
    new_cost = cost(new_text)
    if fixed + new_cost > budget:
        raise TooLong(fixed + new_cost, budget - fixed)
    used = fixed + new_cost
    full_system, summary_used = base_system, False
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
    while kept and kept[0].role == "assistant":
        used -= cost(kept[0].content)
        kept.pop(0)
    turns: list[dict[str, Any]] = []
    for m in [*shown, *({"role": m.role, "content": m.content} for m in kept),
              {"role": "user", "content": new_text}]:
        if turns and turns[-1]["role"] == m["role"]:
            turns[-1] = {**turns[-1], "content": f"{turns[-1]['content']}\n\n{m['content']}"}
        else:
            turns.append(dict(m))
    if system_as_user:
        head = f"{full_system}\n\n{turns[0]['content']}" if full_system else turns[0]["content"]
        messages = [{"role": "user", "content": head}, *turns[1:]]
    else:
        messages = [{"role": "system", "content": full_system}, *turns]
    return {"messages": messages, "history_used": len(kept),
            "oldest_used_id": kept[0].id if kept else None,
            "dropped": len(history) - len(kept), "summary_used": summary_used, "tokens": used}


def as_dict(prompt: Any) -> dict[str, Any]:
    return {k: getattr(prompt, k) for k in ("messages", "history_used", "oldest_used_id",
                                             "dropped", "summary_used", "tokens")}


words = st.sampled_from(["plan", "week", "的", "拉麵", "42", "ok?", "tea", "\n", "é"])
texts = st.lists(words, min_size=0, max_size=12).map(" ".join)
histories = st.lists(st.tuples(st.sampled_from(["user", "assistant"]), texts),
                     max_size=30).map(
    lambda rows: [StoredMessage(i + 1, role, text) for i, (role, text) in enumerate(rows)])
sections_st = st.lists(st.tuples(st.sampled_from(["Notes", "Recalled messages"]), texts),
                       max_size=2)
examples_st = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": texts}), max_size=3)


@settings(max_examples=300, deadline=None)
@given(history=histories, new_text=texts, budget=st.integers(0, 400),
       summary=st.none() | texts, sections=sections_st, late=sections_st,
       examples=examples_st, system_as_user=st.booleans(),
       factor=st.sampled_from([1.0, 0.7, 1.3]), model=st.sampled_from([1.0, 0.5, 2.2]))
def test_the_plan_builds_exactly_what_the_one_shot_fit_built(
        history: list[StoredMessage], new_text: str, budget: int, summary: str | None,
        sections: list[tuple[str, str]], late: list[tuple[str, str]],
        examples: list[dict[str, str]], system_as_user: bool, factor: float,
        model: float) -> None:
    counter = TokenFactors(model).count
    kw: dict[str, Any] = dict(summary=summary, factor=factor, counter=counter,
                              system_as_user=system_as_user, examples=examples)
    try:
        want = reference("Be kind.", history, new_text, budget, sections=sections,
                         late_sections=late, **kw)
    except TooLong as exc:
        try:
            build_prompt("Be kind.", history, new_text, budget, sections=sections,
                         late_sections=late, **kw)
        except TooLong as got:
            assert (got.tokens, got.limit) == (exc.tokens, exc.limit)
            return
        raise AssertionError("the plan fitted what the reference refused") from None
    assert as_dict(build_prompt("Be kind.", history, new_text, budget, sections=sections,
                                late_sections=late, **kw)) == want
    # The recall window's start: where a fit at that budget (no late sections) starts.
    plan = PromptPlan("Be kind.", history, new_text, **kw)
    try:
        at_reserve = reference("Be kind.", history, new_text, budget // 2,
                               sections=sections, **kw)
    except TooLong:
        return
    assert plan.oldest_kept(budget // 2, sections) == (at_reserve["oldest_used_id"],
                                                       at_reserve["dropped"])
    # The same plan, fitted again after the window query: still the reference's prompt.
    assert as_dict(plan.build(budget, sections, late)) == want


def test_a_turn_counts_each_stored_message_once() -> None:
    history = [StoredMessage(i, "user" if i % 2 else "assistant", f"message number {i} " * 3)
               for i in range(1, 201)]
    counted: list[str] = []

    def counter(text: str) -> int:
        counted.append(text)
        return count_tokens(text)

    plan = PromptPlan("Be kind.", history, "and now?", counter=counter)
    notes = [("Notes", "likes tea")]
    window = plan.oldest_kept(600, notes)  # recall's window, with its reserve taken
    prompts = [plan.build(b, notes, late) for b, late in (
        (900, [("Recalled messages", "older")]), (900, []), (850, []), (800, []))]
    stored = [c for c in counted if c.startswith("message number")]
    assert len(stored) == len(set(stored))  # never the same message twice
    assert window[0] is not None and prompts[0].history_used > 0
    assert prompts[0].oldest_used_id is not None and prompts[0].oldest_used_id < window[0]


# Texts whose joins could change the estimate: line breaks, spaces and tabs at either
# end, contractions, CJK, emoji, ideographic spaces (stripped), repeated marks.
edgy = st.lists(st.sampled_from(["plan", "'s", "'", "\n", "\r\n", "\r", " ", "\t", "的",
                                 "拉麵", "é", "42", "ok?", "!!", "#", "\u3000", "😀",
                                 "Week", "\x1c"]),
                max_size=10).map("".join)
edgy_sections = st.lists(st.tuples(st.sampled_from(["Notes", "Recalled messages"]), edgy),
                         max_size=3)


def observed(messages: list[dict[str, Any]]) -> tuple[int, float]:
    """What Calibration.observe measures of a prompt, measured whole."""
    from bot.tokens import measure
    base, cjk = PROMPT_OVERHEAD + MESSAGE_OVERHEAD * len(messages), 0.0
    for m in messages:
        b, c = measure(m["content"])
        base, cjk = base + b, cjk + c
    return base, cjk


@settings(max_examples=300, deadline=None)
@given(system=edgy, history=st.lists(st.tuples(st.sampled_from(["user", "assistant"]),
                                               edgy), max_size=8),
       new_text=edgy, budget=st.integers(0, 300), summary=st.none() | edgy,
       sections=edgy_sections, late=edgy_sections, system_as_user=st.booleans(),
       factor=st.sampled_from([1.0, 0.7, 1.3]), model=st.sampled_from([1.0, 0.5, 2.2]),
       cjk=st.sampled_from([1.3, 0.8, 2.1]), known=st.booleans())
def test_costing_the_system_text_by_its_parts_changes_nothing(
        system: str, history: list[tuple[str, str]], new_text: str, budget: int,
        summary: str | None, sections: list[tuple[str, str]], late: list[tuple[str, str]],
        system_as_user: bool, factor: float, model: float, cjk: float, known: bool) -> None:
    from bot.tokens import measure
    factors = TokenFactors(model, cjk)
    stored = [StoredMessage(i + 1, role, text) for i, (role, text) in enumerate(history)]
    kw: dict[str, Any] = dict(summary=summary, factor=factor,
                              system_as_user=system_as_user)
    whole = PromptPlan(system, stored, new_text, counter=factors.count, **kw)
    parts = PromptPlan(system, stored, new_text, factors=factors, **kw)
    if known:  # a section's text measured elsewhere, as fitting hands the recalled block
        for _, text in late:
            parts.know(text.strip(), measure(text.strip()))
    try:
        want = whole.build(budget, sections, late)
    except TooLong as exc:
        try:
            parts.build(budget, sections, late)
        except TooLong as got:
            assert (got.tokens, got.limit) == (exc.tokens, exc.limit)
            return
        raise AssertionError("costing by parts fitted what the whole refused") from None
    got = parts.build(budget, sections, late)
    assert as_dict(got) == as_dict(want)
    assert got.measured == observed(got.messages)
    assert want.measured is None  # without the factors nothing is measured ahead
