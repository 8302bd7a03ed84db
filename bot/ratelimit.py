"""Per-user rate limits in one process, with state bounded by recent users.

A moving window, like the PostgreSQL store's shared one: at most `limit`
messages in any `window` seconds. Only users who sent something within the
last window are kept (one small array of at most `limit` timestamps each), and
never more than `max_users` of them: past that the least recently active user
is forgotten, which only lets that user through sooner. The library this
replaces (limits' MemoryStorage) kept one key per user ever seen.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable

DEFAULT_MAX_USERS = 100_000  # about 30 MB at the default 20 a minute, if all are active at once


class MovingWindowLimiter:
    """`hit(key, limit)`: 0 if allowed (and counted), else seconds until allowed."""

    def __init__(self, window: float = 60.0, max_users: int = DEFAULT_MAX_USERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window
        self._max_users = max(1, max_users)
        self._clock = clock
        # Ordered by last hit (a hit moves its key to the end): the front is the stalest.
        self._events: dict[str, array[float]] = {}

    def __len__(self) -> int:
        return len(self._events)

    def hit(self, key: str, limit: int) -> float:
        now = self._clock()
        self._forget_idle(now)
        events = self._events.pop(key, None)
        if events is None:
            events = array("d")
        start = now - self._window
        drop = 0
        while drop < len(events) and events[drop] <= start:
            drop += 1
        del events[:drop]
        if len(events) >= limit:
            wait = max(0.1, events[len(events) - limit] + self._window - now)
        else:
            events.append(now)
            wait = 0.0
        if events:
            self._events[key] = events
            if len(self._events) > self._max_users:
                del self._events[next(iter(self._events))]
        return wait

    def _forget_idle(self, now: float) -> None:
        """Drop users whose newest message has left the window (amortised O(1))."""
        start = now - self._window
        while self._events:
            key = next(iter(self._events))
            if self._events[key][-1] > start:
                return
            del self._events[key]


class NoticeOnce:
    """One "too fast" notice per blocked stretch, remembered only while it lasts."""

    def __init__(self, window: float = 60.0, max_users: int = DEFAULT_MAX_USERS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._window = window  # no wait is longer than the window
        self._max_users = max(1, max_users)
        self._clock = clock
        self._until: dict[str, tuple[float, float]] = {}  # key → (told at, blocked until)

    def __len__(self) -> int:
        return len(self._until)

    def first(self, key: str, wait: float) -> bool:
        """True if this user has not been told during the current wait."""
        now = self._clock()
        # In order of telling, and every wait ends within a window of it.
        while self._until:
            oldest = next(iter(self._until))
            told, until = self._until[oldest]
            if told > now - self._window and until > now:
                break
            del self._until[oldest]
        seen = self._until.get(key)
        if seen is not None and seen[1] > now:
            return False
        self._until.pop(key, None)
        self._until[key] = (now, now + min(wait, self._window))
        if len(self._until) > self._max_users:
            del self._until[next(iter(self._until))]
        return True
