"""Where an exchange's time goes: `python -m benchmarks.profile_core [-c 10] [-n 3000]`.

Runs the core benchmark's closed loop once (same stand-in, settings and
seeded history) and prints:

* main-thread CPU per exchange (the event loop's own work; its inverse is the
  most one process can do, whatever the concurrency);
* SQLite round trips per exchange (each is a hand-off to aiosqlite's thread
  and back, serialised on the store's one connection);
* cProfile's top functions by own time and by cumulative time, or with
  `--pyinstrument` (if installed; it is not a dependency) its call tree.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import io
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosqlite.core

from benchmarks import core, dbseed
from storage import sqlite_hop


def _count_round_trips() -> tuple[collections.Counter[str], Callable[[], None]]:
    """Count aiosqlite's thread hand-offs by operation; returns (counts, undo)."""
    counts: collections.Counter[str] = collections.Counter()
    original = aiosqlite.core.Connection._execute

    async def counting(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # Several statements in one hand-off (storage/sqlite_hop): named by what ran.
        ran = args[1] if fn is sqlite_hop._on_thread else fn
        counts[getattr(ran, "__name__", "other")] += 1
        return await original(self, fn, *args, **kwargs)

    aiosqlite.core.Connection._execute = counting  # type: ignore[method-assign]

    def undo() -> None:
        aiosqlite.core.Connection._execute = original  # type: ignore[method-assign]

    return counts, undo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_core",
                                     description=__doc__)
    parser.add_argument("-c", "--concurrency", type=int, default=10)
    parser.add_argument("-n", "--exchanges", type=int, default=3000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--pyinstrument", action="store_true",
                        help="a pyinstrument call tree instead of cProfile (if installed)")
    args = parser.parse_args(argv)
    core.quiet_logging()
    users = core.users_for(args.concurrency, args.exchanges)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        db = dbseed.fresh_db(Path(tmp) / "profile.db", users, 100)

        # 1. Unprofiled: rate, main-thread CPU and round trips.
        counts, undo = _count_round_trips()
        cpu0 = time.thread_time()
        result = asyncio.run(core.run_service(db, users, args.concurrency, args.exchanges))
        cpu = time.thread_time() - cpu0
        undo()
        total = result.exchanges + len(users)  # the warm-up round counts too
        print(f"c={args.concurrency}: {result.per_s:.0f} exchanges/s, p50 "
              f"{result.latency_ms(0.5):.2f} ms, p99 {result.latency_ms(0.99):.2f} ms")
        print(f"main-thread CPU per exchange: {cpu / total * 1000:.3f} ms "
              f"(ceiling {total / cpu:.0f} exchanges/s for one event loop)")
        print("SQLite round trips per exchange: " + ", ".join(
            f"{name} {n / total:.1f}" for name, n in counts.most_common())
            + f"; total {sum(counts.values()) / total:.1f}")

        # 2. Profiled, on a fresh copy of the same start.
        db = dbseed.fresh_db(Path(tmp) / "profile2.db", users, 100)
        if args.pyinstrument:
            try:
                from pyinstrument import Profiler  # type: ignore[import-not-found]
            except ImportError:
                print("pyinstrument is not installed (pip install pyinstrument)",
                      file=sys.stderr)
                return 1
            profiler = Profiler(interval=0.0005)
            profiler.start()
            asyncio.run(core.run_service(db, users, args.concurrency, args.exchanges))
            profiler.stop()
            print(profiler.output_text(unicode=True, color=False))
            return 0
        prof = cProfile.Profile()
        prof.enable()
        asyncio.run(core.run_service(db, users, args.concurrency, args.exchanges))
        prof.disable()
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(order).print_stats(args.top)
            print(f"\n--- cProfile by {order} ---")
            print(out.getvalue().split("\n\n", 1)[-1].strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
