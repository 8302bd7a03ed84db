"""The longest prefix of a text that fits a measure (tokens, UTF-16 units, chars)."""

from __future__ import annotations

from collections.abc import Callable


def longest_prefix(text: str, budget: int, measure: Callable[[str], int]) -> int:
    """The largest i with measure(text[:i]) <= budget; `measure` must grow with length."""
    if measure is len:
        return min(len(text), budget)
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if measure(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
