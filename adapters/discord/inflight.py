"""The Discord handlers still running, so that shutdown can let them finish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


class InFlight:
    """Tracks the tasks answering messages and interactions."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the current task as in flight while the block runs."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait up to `timeout` seconds for them to end; cancel the ones that don't."""
        pending = set(self._tasks)
        if not pending:
            return
        _, pending = await asyncio.wait(pending, timeout=timeout)
        if pending:
            log.warning("discord: %d replies still running at shutdown; cancelling them",
                        len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=1.0)
