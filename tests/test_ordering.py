"""Strict order per conversation, whatever is cancelled while waiting."""

from __future__ import annotations

import asyncio
import gc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.ordering import ConversationOrder


async def _hold(order: ConversationOrder, key: str, inside: list[str], name: str,
                release: asyncio.Event, log: list[str],
                entered: asyncio.Event | None = None) -> None:
    async with order.turn(key):
        assert not inside, f"{name} entered while {inside} ran"
        inside.append(name)
        log.append(name)
        if entered is not None:
            entered.set()
        try:
            await release.wait()
        finally:
            inside.remove(name)


async def _entered(event: asyncio.Event) -> None:
    async with asyncio.timeout(2):
        await event.wait()


async def test_a_turn_cancelled_while_waiting_lets_no_later_turn_overlap() -> None:
    order = ConversationOrder()
    inside: list[str] = []
    log: list[str] = []
    gates = {n: asyncio.Event() for n in "abc"}
    entered = {n: asyncio.Event() for n in "ac"}
    a = asyncio.create_task(_hold(order, "k", inside, "a", gates["a"], log, entered["a"]))
    await _entered(entered["a"])
    b = asyncio.create_task(_hold(order, "k", inside, "b", gates["b"], log))
    await asyncio.sleep(0)
    b.cancel()  # b leaves the queue while a still runs
    with pytest.raises(asyncio.CancelledError):
        await b
    c = asyncio.create_task(_hold(order, "k", inside, "c", gates["c"], log, entered["c"]))
    for _ in range(5):
        await asyncio.sleep(0)
    assert log == ["a"] and not c.done()  # c waits for a, not beside it
    gates["a"].set()
    await _entered(entered["c"])
    gates["c"].set()
    async with asyncio.timeout(2):
        await asyncio.gather(a, c)
    assert log == ["a", "c"]
    del a, b, c
    await asyncio.sleep(0)
    gc.collect()
    assert len(order) == 0  # nothing kept once no turn is in flight


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.booleans()), min_size=1, max_size=12))
def test_turns_never_overlap_and_keep_arrival_order(plan: list[tuple[int, bool]]) -> None:
    """Any mix of keys and cancellations: per key, the survivors run in arrival order, alone."""

    async def run() -> None:
        order = ConversationOrder()
        inside: dict[str, list[str]] = {str(k): [] for k in range(3)}
        log: list[str] = []
        release = asyncio.Event()
        tasks: list[tuple[str, str, bool, asyncio.Task[None]]] = []
        for i, (k, cancel) in enumerate(plan):
            key, name = str(k), f"{k}:{i}"
            task = asyncio.create_task(_hold(order, key, inside[key], name, release, log))
            tasks.append((key, name, cancel, task))
            await asyncio.sleep(0)
        for _, _, cancel, task in tasks:
            if cancel:
                task.cancel()
        await asyncio.sleep(0)
        release.set()
        async with asyncio.timeout(5):
            await asyncio.gather(*(t for *_, t in tasks), return_exceptions=True)
        arrival = [name for _, name, _, _ in tasks]
        survivors = {name for _, name, _, t in tasks if not t.cancelled()}
        for key in inside:
            mine = [n for n in log if n.startswith(key + ":")]
            assert mine == sorted(mine, key=arrival.index)  # arrival order
            assert survivors & set(arrival) <= set(log)  # every turn not cancelled ran
        del tasks, task  # a finished task's traceback holds its frames, and so the lock
        await asyncio.sleep(0)  # the loop's last callback of a cancelled task lets go of it
        gc.collect()  # only this example's objects: the rest are frozen (see below)
        assert len(order) == 0

    # A full collection in a worker that imported the whole bot costs ~0.15 s; frozen,
    # the objects that existed before the example are not scanned, and the example's
    # own cycles (cancelled tasks' tracebacks) are still collected.
    gc.freeze()
    try:
        asyncio.run(run())
    finally:
        gc.unfreeze()
