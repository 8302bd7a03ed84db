"""Model slots: replies first, one call at a time with one slot, nothing lost to cancellation."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.slots import ModelSlots, Priority


async def _run(slots: ModelSlots, priority: Priority, name: str, order: list[str],
               release: asyncio.Event, peak: list[int]) -> None:
    async with slots.hold(priority):
        order.append(name)
        peak[0] = max(peak[0], slots.in_use)
        await release.wait()


async def test_a_waiting_reply_goes_before_background_work_that_waited_longer() -> None:
    slots = ModelSlots(1)
    order: list[str] = []
    peak = [0]
    gates = {n: asyncio.Event() for n in ("first", "summary", "reply")}
    first = asyncio.create_task(_run(slots, Priority.REPLY, "first", order, gates["first"], peak))
    await asyncio.sleep(0)
    summary = asyncio.create_task(
        _run(slots, Priority.BACKGROUND, "summary", order, gates["summary"], peak))
    await asyncio.sleep(0)
    reply = asyncio.create_task(_run(slots, Priority.REPLY, "reply", order, gates["reply"], peak))
    await asyncio.sleep(0)
    assert (slots.waiting(Priority.REPLY), slots.waiting(Priority.BACKGROUND)) == (1, 1)
    for name in ("first", "reply", "summary"):
        gates[name].set()
    async with asyncio.timeout(2):
        await asyncio.gather(first, summary, reply)
    assert order == ["first", "reply", "summary"]
    assert peak == [1] and slots.in_use == 0 and slots.waiting() == 0


async def test_background_work_never_starts_while_a_reply_waits() -> None:
    slots = ModelSlots(2)
    order: list[str] = []
    peak = [0]
    hold = asyncio.Event()
    tasks = [asyncio.create_task(_run(slots, p, n, order, hold, peak)) for p, n in (
        (Priority.REPLY, "r1"), (Priority.REPLY, "r2"), (Priority.REPLY, "r3"),
        (Priority.BACKGROUND, "s1"), (Priority.REPLY, "r4"))]
    await asyncio.sleep(0)
    assert order == ["r1", "r2"]
    hold.set()
    async with asyncio.timeout(2):
        await asyncio.gather(*tasks)
    assert order == ["r1", "r2", "r3", "r4", "s1"]
    assert peak == [2]


async def test_a_slot_granted_to_a_cancelled_waiter_is_passed_on() -> None:
    slots = ModelSlots(1)
    await slots.acquire(Priority.REPLY)
    waiter = asyncio.create_task(slots.acquire(Priority.REPLY))
    nxt = asyncio.create_task(slots.acquire(Priority.BACKGROUND))
    await asyncio.sleep(0)
    slots.release()  # granted to `waiter` ...
    waiter.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    async with asyncio.timeout(2):
        await nxt  # the slot was not lost
    assert slots.in_use == 1
    slots.release()
    assert slots.in_use == 0


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 3),
       plan=st.lists(st.tuples(st.sampled_from(list(Priority)), st.booleans()), max_size=12))
def test_never_more_than_capacity_and_no_slot_lost(
        capacity: int, plan: list[tuple[Priority, bool]]) -> None:
    async def run() -> None:
        slots = ModelSlots(capacity)
        order: list[str] = []
        peak = [0]
        hold = asyncio.Event()
        tasks = []
        for i, (priority, _) in enumerate(plan):
            tasks.append(asyncio.create_task(_run(slots, priority, str(i), order, hold, peak)))
            await asyncio.sleep(0)
        for task, (_, cancel) in zip(tasks, plan, strict=True):
            if cancel:
                task.cancel()
        await asyncio.sleep(0)
        hold.set()
        async with asyncio.timeout(5):
            await asyncio.gather(*tasks, return_exceptions=True)
        assert peak[0] <= capacity
        assert slots.in_use == 0 and slots.waiting() == 0
        survivors = {str(i) for i, t in enumerate(tasks) if not t.cancelled()}
        assert survivors <= set(order)
        # Once slots ran short, every reply that waited started before any background call
        # that waited (those that got a slot at once are the first `capacity`).
        queued = [int(n) for n in order[capacity:]]
        kinds = [plan[i][0] for i in queued]
        assert kinds == sorted(kinds)

    asyncio.run(run())
