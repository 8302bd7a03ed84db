"""The in-process rate limiter: a moving window, state bounded by recent users."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bot.ratelimit import MovingWindowLimiter, NoticeOnce


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limit_per_window_and_the_wait_until_the_oldest_leaves() -> None:
    clock = Clock()
    limiter = MovingWindowLimiter(60, clock=clock)
    assert [limiter.hit("u", 3) for _ in range(3)] == [0, 0, 0]
    clock.now += 20
    assert limiter.hit("u", 3) == 40  # the first leaves the window in 40 s
    assert limiter.hit("v", 3) == 0  # per user
    clock.now += 40
    assert limiter.hit("u", 3) == 0


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 30)), max_size=60),
       st.integers(1, 4))
def test_matches_a_moving_window_of_every_message(
        plan: list[tuple[str, float]], limit: int) -> None:
    clock = Clock()
    limiter = MovingWindowLimiter(60, clock=clock)
    allowed: dict[str, list[float]] = {}
    for key, gap in plan:
        clock.now += gap
        recent = [t for t in allowed.get(key, []) if t > clock.now - 60]
        wait = limiter.hit(key, limit)
        if len(recent) < limit:
            assert wait == 0
            recent.append(clock.now)
        else:
            assert wait == max(0.1, recent[-limit] + 60 - clock.now)
        allowed[key] = recent


def test_state_is_only_users_inside_their_window_and_never_above_the_cap() -> None:
    clock = Clock()
    limiter = MovingWindowLimiter(60, max_users=5_000, clock=clock)
    for u in range(10_000):
        assert limiter.hit(f"telegram:{u}", 20) == 0
        clock.now += 0.0001
    assert len(limiter) == 5_000  # the cap: the least recently active are forgotten
    clock.now += 61
    assert limiter.hit("telegram:late", 20) == 0
    assert len(limiter) == 1  # everyone else's window is over


def test_one_notice_per_blocked_stretch_and_bounded() -> None:
    clock = Clock()
    notices = NoticeOnce(60, max_users=1000, clock=clock)
    assert notices.first("u", 10) is True
    assert notices.first("u", 10) is False
    clock.now += 11
    assert notices.first("u", 10) is True  # a new stretch, a new notice
    for u in range(5000):
        notices.first(f"x{u}", 30)
    assert len(notices) == 1000
    clock.now += 61
    assert notices.first("late", 5) is True
    assert len(notices) == 1
