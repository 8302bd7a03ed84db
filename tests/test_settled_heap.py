"""bot.app.settled_heap: start-up's objects frozen out of the collector while the bot runs."""

from __future__ import annotations

import gc

from bot.app import settled_heap


def test_start_up_objects_are_frozen_while_the_bot_runs_and_thawed_after() -> None:
    before = gc.get_freeze_count()
    built_at_start = [{"table": i} for i in range(100)]
    with settled_heap():
        frozen = gc.get_freeze_count()
        assert frozen >= before + len(built_at_start)
        gc.collect()  # a full collection leaves the frozen ones alone
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0
    assert built_at_start[99] == {"table": 99}
