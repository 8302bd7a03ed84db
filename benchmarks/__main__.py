"""`python -m benchmarks [--quick]`: measure the bot, print a table, write results.json.

Sections (each one failing prints "not available: <reason>" and leaves its
figures null, so the command always completes):

1. core      exchanges/s and overhead at 1, 10, 100 concurrent conversations
2. baseline  a bare aiosqlite exchange, and core ÷ baseline
3. history   p50 with 1,000 vs 1,000,000 stored messages
4. rss       resident memory after 10,000 users (fresh subprocess)
5. startup   `python -m bot --help` wall time
6. telegram  added latency through the Telegram adapter and emulator
7. discord   added latency through the Discord adapter and emulator
8. postgres  exchanges/s at 100 conversations on PostgreSQL, one and two processes
9. memory    planted turns that reach the prompt in long conversations (benchmarks/memory.py)
10. recall   recall's time per turn at 1k / 100k / 1M stored messages, SQLite and PostgreSQL
             (benchmarks/recall_speed.py)
11. cpu      the bot process's CPU per exchange through the Telegram / Discord emulators
             (benchmarks/process.py, `python -m bot` as a child process)
12. boot     start-up to the first getUpdates / IDENTIFY with 1,000,000 stored messages
13. trips    PostgreSQL round trips per exchange, counted (benchmarks/pgcount.py)
14. followup Telegram: added latency of a message sent 0.2 s after the previous reply

Only when asked for (`--only real-model`; llama-cpp-python needed, not in CI):
real-model   the bot against llama-cpp-python's server and LLM_PROVIDER=local with
             the Gemma 3 270M GGUF (benchmarks/real_model.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import (
    baseline,
    core,
    dbseed,
    memory,
    pgbench,
    pgcount,
    platforms,
    process,
    real_model,
    recall_speed,
    standin,
    startup,
    telegram_followup,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
SECTIONS = ("core", "paced", "baseline", "history", "rss", "startup", "telegram", "discord",
            "postgres", "memory", "recall", "cpu", "boot", "trips", "followup")
OPT_IN = ("real-model",)  # run only when named with --only
HISTORY_USERS = 10  # one conversation per worker at 10 concurrent


@dataclass(frozen=True)
class Sizes:
    core_exchanges: dict[int, int]  # concurrency → measured exchanges
    core_seconds: float  # cap per run, whatever the count
    history_exchanges: int
    history_reps: int
    platform_samples: int
    pg_exchanges: int
    rss_users: int
    help_runs: int


FULL = Sizes({1: 1500, 10: 4000, 100: 8000}, 12.0, 1200, 3, 120, 4000, 10_000, 7)
QUICK = Sizes({1: 400, 10: 1000, 100: 2000}, 5.0, 500, 1, 40, 1000, 10_000, 3)

# key → (label, unit, target text, test); the order is the table's.
Check = Callable[[float], bool] | None
ROWS: list[tuple[str, str, str, str, Check]] = [
    ("exchanges_per_s_c1", "exchanges/s, 1 conversation", "/s", "", None),
    ("exchanges_per_s_c10", "exchanges/s, 10 concurrent", "/s", "", None),
    ("exchanges_per_s_c100", "exchanges/s, 100 concurrent", "/s", "≥ 1000",
     lambda v: v >= 1000),
    ("overhead_p50_ms_c1", "overhead p50, 1 conversation", "ms", "", None),
    ("overhead_p99_ms_c1", "overhead p99, 1 conversation", "ms", "", None),
    ("overhead_p50_ms_c10", "overhead p50, 10 concurrent", "ms", "", None),
    ("overhead_p99_ms_c10", "overhead p99, 10 concurrent", "ms", "≤ 5", lambda v: v <= 5),
    ("overhead_p50_ms_c10_paced", "overhead p50, 10 concurrent, paced model", "ms", "", None),
    ("overhead_p99_ms_c10_paced", "overhead p99, 10 concurrent, paced model", "ms", "≤ 5",
     lambda v: v <= 5),
    ("overhead_p50_ms_c100", "overhead p50, 100 concurrent", "ms", "", None),
    ("overhead_p99_ms_c100", "overhead p99, 100 concurrent", "ms", "", None),
    ("loop_cpu_ms_per_exchange_c10", "event-loop CPU per exchange (c10)", "ms", "", None),
    ("baseline_exchanges_per_s_c10", "bare aiosqlite exchanges/s, 10 concurrent", "/s", "",
     None),
    ("baseline_p50_ms_c10", "bare aiosqlite p50, 10 concurrent", "ms", "", None),
    ("baseline_p99_ms_c10", "bare aiosqlite p99, 10 concurrent", "ms", "", None),
    ("core_vs_baseline", "core ÷ baseline (time per exchange, c10)", "×", "≤ 2.0",
     lambda v: v <= 2.0),
    ("history_p50_ms_1k", "p50 at 1,000 stored messages (c10)", "ms", "", None),
    ("history_p50_ms_1m", "p50 at 1,000,000 stored messages (c10)", "ms", "", None),
    ("history_p50_ratio_1m_vs_1k", "p50 ratio 1,000,000 ÷ 1,000 messages", "×", "≤ 1.3",
     lambda v: v <= 1.3),
    ("rss_mb_10k_users", "RSS after 10,000 users", "MB", "≤ 150", lambda v: v <= 150),
    ("help_seconds", "`python -m bot --help` (median)", "s", "≤ 0.3", lambda v: v <= 0.3),
    ("added_latency_p50_ms_telegram", "Telegram added latency p50", "ms", "≤ 30",
     lambda v: v <= 30),
    ("added_latency_p99_ms_telegram", "Telegram added latency p99", "ms", "", None),
    ("added_latency_p50_ms_discord", "Discord added latency p50", "ms", "≤ 30",
     lambda v: v <= 30),
    ("added_latency_p99_ms_discord", "Discord added latency p99", "ms", "", None),
    ("exchanges_per_s_c100_postgres", "PostgreSQL exchanges/s, 100 conc., 1 process", "/s",
     "", None),
    ("exchanges_per_s_c100_postgres_2proc", "PostgreSQL exchanges/s, 100 conc., 2 processes",
     "/s", "", None),
    *((f"memory_{mode}_{ctx}_{lang}", f"memory: {label}, {ctx} tokens, {lang}", "%",
       bar if ctx == 4096 else "", (lambda v, b=cut: v >= b) if ctx == 4096 and cut else None)
      for mode, label, bar, cut in (("truncate", "truncate", "", 0.0),
                                    ("summarize", "summarize", "", 0.0),
                                    ("words", "words-only recall", "≥ 60%", 0.6),
                                    ("words_meaning", "words + meaning recall", "≥ 80%", 0.8))
      for ctx in memory.CONTEXTS for lang in ("en", "zh")),
    *((f"memory_prompt_tokens_{mode}_4096", f"memory: prompt tokens used, {mode}, 4096", "tok",
       "", None) for mode in ("truncate", "summarize", "words", "words_meaning")),
    ("recall_p50_ms_1k", "recall per turn p50, 1,000 messages", "ms", "≤ 2", lambda v: v <= 2),
    ("recall_p50_ms_100k", "recall per turn p50, 100,000 messages", "ms", "≤ 3",
     lambda v: v <= 3),
    ("recall_p50_ms_1m", "recall per turn p50, 1,000,000 messages", "ms", "≤ 5",
     lambda v: v <= 5),
    ("recall_ratio_1m_vs_1k", "recall p50 ratio 1,000,000 ÷ 1,000", "×", "≤ 2.5",
     lambda v: v <= 2.5),
    ("recall_pg_p50_ms_1k", "recall per turn p50, 1,000 messages, PostgreSQL", "ms", "≤ 2",
     lambda v: v <= 2),
    ("recall_pg_p50_ms_100k", "recall per turn p50, 100,000 messages, PostgreSQL", "ms",
     "≤ 3", lambda v: v <= 3),
    ("recall_pg_p50_ms_1m", "recall per turn p50, 1,000,000 messages, PostgreSQL", "ms",
     "≤ 5", lambda v: v <= 5),
    ("recall_pg_ratio_1m_vs_1k", "recall p50 ratio 1,000,000 ÷ 1,000, PostgreSQL", "×",
     "≤ 2.5", lambda v: v <= 2.5),
    ("cpu_ms_per_exchange_telegram", "bot CPU per exchange, Telegram (50 users × 10)", "ms",
     "≤ 5", lambda v: v <= 5),
    ("cpu_ms_per_exchange_discord", "bot CPU per exchange, Discord (50 users × 10)", "ms",
     "≤ 5", lambda v: v <= 5),
    ("startup_s_telegram_1m", "start to first getUpdates, 1,000,000 messages", "s", "≤ 1.0",
     lambda v: v <= 1.0),
    ("startup_s_discord_1m", "start to gateway IDENTIFY, 1,000,000 messages", "s", "≤ 1.0",
     lambda v: v <= 1.0),
    ("pg_round_trips_per_exchange", "PostgreSQL round trips per exchange (counted)", "n",
     "≤ 4", lambda v: v <= 4),
    ("exchanges_per_s_c100_postgres_vs_sqlite", "PostgreSQL ÷ SQLite exchanges/s, c100", "×",
     "≥ 0.8", lambda v: v >= 0.8),
    ("overhead_p99_ms_c10_model100", "overhead p99, 10 concurrent, 100 ms model", "ms", "≤ 5",
     lambda v: v <= 5),
    ("added_latency_p50_ms_telegram_back_to_back",
     "Telegram added latency p50, 0.2 s after the previous reply", "ms", "≤ 30",
     lambda v: v <= 30),
    ("added_latency_p99_ms_telegram_back_to_back",
     "Telegram added latency p99, 0.2 s after the previous reply", "ms", "", None),
]
# benchmarks/real_model.py's figures: 1/0 checks, counts and seconds.
REAL_MODEL_ROWS: list[tuple[str, str, str, str, Check]] = [
    ("real_server_turns_ok", "real server: turns answered", "n", "all 13", lambda v: v == 13),
    ("real_server_turns", "real server: turns sent", "n", "", None),
    ("real_server_window", "real server: window the bot learned", "tok", "≤ 1,024",
     lambda v: v <= 1024),
    ("real_server_digits_first_overflowed",
     "real server: 3,500 digits first (window unknown) overflowed", "yes", "no",
     lambda v: v == 0),
    ("real_server_digits_overflowed", "real server: 3,500 digits overflowed", "yes", "no",
     lambda v: v == 0),
    ("real_server_summaries_ok", "real server: summary calls ok", "n", "≥ 1", lambda v: v >= 1),
    ("real_server_summary_stored", "real server: summary stored", "yes", "yes",
     lambda v: v == 1),
    ("real_server_seconds", "real server: whole conversation", "s", "", None),
    ("local_console_answered", "local provider: console answered", "yes", "yes",
     lambda v: v == 1),
    ("local_console_digits_refused_or_fit", "local provider: 3,500 digits refused or fit",
     "yes", "yes", lambda v: v == 1),
    ("local_console_remembers_name", "local provider: remembers the name", "yes", "", None),
    ("local_console_seconds", "local provider: console run", "s", "", None),
]
ROWS += REAL_MODEL_ROWS
# The keys the issue names: always present in results.json, null when not measured.
REQUIRED = (
    "exchanges_per_s_c1", "exchanges_per_s_c10", "exchanges_per_s_c100", "overhead_p50_ms_c10",
    "overhead_p99_ms_c10", "history_p50_ratio_1m_vs_1k", "core_vs_baseline", "rss_mb_10k_users",
    "help_seconds", "added_latency_p50_ms_telegram", "added_latency_p99_ms_telegram",
    "added_latency_p50_ms_discord", "added_latency_p99_ms_discord",
    "exchanges_per_s_c100_postgres", "exchanges_per_s_c100_postgres_2proc",
    "recall_p50_ms_1k", "recall_p50_ms_100k", "recall_p50_ms_1m", "recall_ratio_1m_vs_1k",
    "recall_pg_p50_ms_1k", "recall_pg_p50_ms_100k", "recall_pg_p50_ms_1m",
    "cpu_ms_per_exchange_telegram", "cpu_ms_per_exchange_discord", "pg_round_trips_per_exchange",
    "overhead_p99_ms_c10_model100", "added_latency_p50_ms_telegram_back_to_back",
    "startup_s_telegram_1m", "startup_s_discord_1m",
)

DEFINITIONS = """\
Model: an in-process stand-in (benchmarks/standin.py) that streams a fixed 50-token reply
  instantly; nothing waits on a model, so every figure is the bot's own cost.
Exchange: one ChatService.handle(message) on real SQLite storage, from the call to the last
  reply delta (access check, ordering, history load, prompt fit, streaming, saving the two
  messages and the audit row). Closed loop: each of N concurrent conversations sends its
  next message as soon as the reply is complete; every conversation starts with 100 stored
  messages (a returning user). RATE_LIMIT_PER_MINUTE=0, LLM_CONCURRENCY>=100,
  MEMORY_STRATEGY=truncate, LOG_LEVEL=WARNING.
Overhead: wall time of one exchange minus the stand-in's own time to stream its reply
  (median measured alone: {standin_us:.1f} µs). At N concurrent it includes waiting for the
  other N-1 exchanges' CPU time (closed loop: p50 is about N × the cost of one exchange).
  Event-loop CPU per exchange: CPU time of the loop's thread ÷ exchanges, the part that
  does not depend on load (its inverse bounds one process's exchanges/s).
Baseline: bare aiosqlite per exchange (read newest 50 messages; insert 2 messages + 1 audit
  row; commit), same database, pragmas, users and closed loop; core ÷ baseline compares the
  time per exchange (inverse throughput) at 10 concurrent.
Added latency: from the emulator handing a user's message to the bot to the bot's first
  message with visible text in the emulator, minus the stand-in's time to first token; one
  message at a time, real adapter and real python-telegram-bot / discord.py."""


class Run:
    """Figures and the reasons for the missing ones, filled section by section."""

    def __init__(self, sizes: Sizes, quick: bool, tmp: Path) -> None:
        self.sizes = sizes
        self.quick = quick
        self.tmp = tmp
        self.figures: dict[str, float | None] = {}
        self.missing: dict[str, str] = {}
        self.extra: dict[str, Any] = {}
        self.standin_s = 0.0
        self.machine = machine()

    def put(self, key: str, value: float) -> None:
        self.figures[key] = round(value, 3 if abs(value) < 100 else 1)

    def unavailable(self, keys: tuple[str, ...], reason: str) -> None:
        print(f"  not available: {reason}", flush=True)
        for key in keys:
            self.figures[key] = None
            self.missing[key] = reason


# -- sections


def section_core(run: Run) -> None:
    for c, n in run.sizes.core_exchanges.items():
        users = core.users_for(c, n)
        db = dbseed.fresh_db(run.tmp / f"core-c{c}.db", users, 100)
        result = asyncio.run(core.run_service(db, users, c, n, run.sizes.core_seconds))
        over = [max(0.0, s - run.standin_s) for s in result.latencies]
        run.put(f"exchanges_per_s_c{c}", result.per_s)
        run.put(f"overhead_p50_ms_c{c}", core.quantile(over, 0.5) * 1000)
        run.put(f"overhead_p99_ms_c{c}", core.quantile(over, 0.99) * 1000)
        if c == 10:
            run.put("loop_cpu_ms_per_exchange_c10", result.loop_cpu / result.exchanges * 1000)
        print(f"  c={c:<3} {result.exchanges:>6} exchanges in {result.seconds:5.2f} s: "
              f"{result.per_s:7.0f}/s, overhead p50 {core.quantile(over, 0.5) * 1000:.2f} ms, "
              f"p99 {core.quantile(over, 0.99) * 1000:.2f} ms ({len(users)} users)", flush=True)


PACED_FIRST_TOKEN_S = 0.1  # a fast local model's time to first token


def section_core_paced(run: Run) -> None:
    """Overhead a user feels: 10 conversations at once with a model that takes time.

    The closed loop above saturates the CPU on purpose (throughput), so its
    overhead at 10 concurrent is mostly queueing behind the other nine. Here
    the model waits about PACED_FIRST_TOKEN_S (±50%) before streaming, as a
    real one does, and overhead is each exchange's wall time minus that
    exchange's own model wait.
    """
    c = 10
    n = run.sizes.core_exchanges[10] // 4
    users = core.users_for(c, n)
    db = dbseed.fresh_db(run.tmp / "core-paced.db", users, 100)
    provider = standin.PacedProvider(PACED_FIRST_TOKEN_S)
    result = asyncio.run(core.run_service(db, users, c, n, run.sizes.core_seconds, provider))
    # Latencies already exclude each exchange's own model wait.
    over = [max(0.0, s - run.standin_s) for s in result.latencies]
    run.put("overhead_p50_ms_c10_paced", core.quantile(over, 0.5) * 1000)
    run.put("overhead_p99_ms_c10_paced", core.quantile(over, 0.99) * 1000)
    run.put("overhead_p99_ms_c10_model100", core.quantile(over, 0.99) * 1000)  # the name
    print(f"  c=10 paced ({PACED_FIRST_TOKEN_S * 1000:.0f} ms to first token): "
          f"{result.exchanges} exchanges, overhead p50 {core.quantile(over, 0.5) * 1000:.2f} ms,"
          f" p99 {core.quantile(over, 0.99) * 1000:.2f} ms", flush=True)


def section_baseline(run: Run) -> None:
    c, n = 10, run.sizes.core_exchanges[10]
    users = core.users_for(c, n)  # the very users and history of the core run at c=10
    db = dbseed.fresh_db(run.tmp / "baseline.db", users, 100)
    # Three times the count: the bare exchange is quick, and a short run is noisy.
    result = asyncio.run(baseline.run_baseline(db, users, c, 3 * n, run.sizes.core_seconds))
    run.put("baseline_exchanges_per_s_c10", result.per_s)
    run.put("baseline_p50_ms_c10", result.latency_ms(0.5))
    run.put("baseline_p99_ms_c10", result.latency_ms(0.99))
    print(f"  c=10  {result.exchanges:>6} exchanges in {result.seconds:5.2f} s: "
          f"{result.per_s:7.0f}/s, p50 {result.latency_ms(0.5):.2f} ms, "
          f"p99 {result.latency_ms(0.99):.2f} ms", flush=True)
    core_rate = run.figures.get("exchanges_per_s_c10")
    if core_rate:
        run.put("core_vs_baseline", result.per_s / core_rate)
    else:
        run.unavailable(("core_vs_baseline",), "needs the core run at 10 concurrent (section "
                        "core), which did not run or complete")


def section_history(run: Run) -> None:
    small_users = [dbseed.user_id(n) for n in range(HISTORY_USERS)]
    # Spread over the big file: their rows lie among everyone else's.
    big_users = [dbseed.user_id(n * 1000) for n in range(HISTORY_USERS)]
    p50s: dict[str, list[float]] = {"1k": [], "1m": []}
    n = run.sizes.history_exchanges
    for rep in range(run.sizes.history_reps):
        small = dbseed.fresh_db(run.tmp / "history-1k.db", small_users, 100)
        r = asyncio.run(core.run_service(small, small_users, HISTORY_USERS, n,
                                         run.sizes.core_seconds))
        p50s["1k"].append(r.latency_ms(0.5))
        big, cached = dbseed.big_db(run.tmp / "history-1m.db")
        if rep == 0:
            print(f"  1,000,000-message database: {'cached' if cached else 'built'}, "
                  f"{big.stat().st_size / 2**20:.0f} MB", flush=True)
        r = asyncio.run(core.run_service(big, big_users, HISTORY_USERS, n,
                                         run.sizes.core_seconds))
        p50s["1m"].append(r.latency_ms(0.5))
        big.unlink()
        print(f"  rep {rep + 1}: p50 {p50s['1k'][-1]:.2f} ms at 1,000 messages, "
              f"{p50s['1m'][-1]:.2f} ms at 1,000,000", flush=True)
    small_p50, big_p50 = statistics.median(p50s["1k"]), statistics.median(p50s["1m"])
    run.put("history_p50_ms_1k", small_p50)
    run.put("history_p50_ms_1m", big_p50)
    run.put("history_p50_ratio_1m_vs_1k", big_p50 / small_p50)


def section_rss(run: Run) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.rss", "--users", str(run.sizes.rss_users)],
        cwd=HERE.parent, capture_output=True, text=True, timeout=400, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"benchmarks.rss exited {done.returncode}: {done.stderr[-400:]}")
    out = json.loads(lines[-1])
    if "error" in out:
        raise RuntimeError(out["error"])
    run.put("rss_mb_10k_users", out["rss_mb"])
    run.extra["rss_mb_before_users"] = out["rss_mb_before"]
    print(f"  {out['users']:,} users in {out['seconds']} s: RSS {out['rss_mb_before']} MB "
          f"before the first message, {out['rss_mb']} MB after", flush=True)


def section_startup(run: Run) -> None:
    median, times = startup.help_seconds(run.sizes.help_runs)
    run.put("help_seconds", median)
    print("  runs: " + ", ".join(f"{t:.3f}" for t in times) + " s", flush=True)


def _platform(run: Run, name: str) -> None:
    keys = (f"added_latency_p50_ms_{name}", f"added_latency_p99_ms_{name}")
    got = platforms.run(name, run.sizes.platform_samples)
    if isinstance(got, str):
        run.unavailable(keys, got)
        return
    run.put(keys[0], got.p50_ms)
    run.put(keys[1], got.p99_ms)
    print(f"  {got.samples} messages: p50 {got.p50_ms:.2f} ms, p99 {got.p99_ms:.2f} ms "
          f"(stand-in's own first token: {got.standin_ttft_ms * 1000:.1f} µs, subtracted)",
          flush=True)


def section_telegram(run: Run) -> None:
    _platform(run, "telegram")


def section_discord(run: Run) -> None:
    _platform(run, "discord")


def section_postgres(run: Run) -> None:
    keys = ("exchanges_per_s_c100_postgres", "exchanges_per_s_c100_postgres_2proc")
    got = pgbench.measure(run.sizes.pg_exchanges)
    if isinstance(got, str):
        run.unavailable(keys, got)
        return
    run.put(keys[0], got[0])
    run.put(keys[1], got[1])
    sqlite_rate = run.figures.get("exchanges_per_s_c100")
    if sqlite_rate:
        run.put("exchanges_per_s_c100_postgres_vs_sqlite", got[0] / sqlite_rate)
    run.extra["postgres_connections_total"] = pgbench.TOTAL_POOL
    print(f"  one process: {got[0]:.0f}/s; two processes: {got[1]:.0f}/s "
          f"({pgbench.TOTAL_POOL} database connections in all, each run; per process "
          "LLM_CONCURRENCY = DB_POOL_SIZE - 2)", flush=True)


def section_memory(run: Run) -> None:
    report = memory.run(run.tmp / "memory", log=print)
    for key, value in report.figures.items():
        run.put(key, value)
    if report.meaning_error:
        run.unavailable(tuple(k for k in SECTION_KEYS["memory"] if "words_meaning" in k),
                        f"meaning needs the bench extra: {report.meaning_error}")


def section_real_model(run: Run) -> None:
    for key, value in real_model.run(log=print).items():
        run.put(key, value)


def section_recall(run: Run) -> None:
    reps = 50 if run.quick else 200
    got = recall_speed.measure(reps)
    for key, value in got.items():
        run.put(key, value)
    print("  SQLite: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()), flush=True)
    try:
        pg = recall_speed.measure_pg(reps)
    except Exception as exc:
        run.unavailable(tuple(k for k in SECTION_KEYS["recall"] if "_pg_" in k),
                        f"PostgreSQL recall: {type(exc).__name__}: {exc}")
        return
    for key, value in pg.items():
        run.put(key, value)
    print("  PostgreSQL: " + ", ".join(f"{k} {v:.2f}" for k, v in pg.items()), flush=True)


def section_cpu(run: Run) -> None:
    users, messages = (process.USERS, 3) if run.quick else (process.USERS, process.MESSAGES)
    for name, measure in (("telegram", process.telegram_cpu), ("discord", process.discord_cpu)):
        got = asyncio.run(measure(users, messages))
        run.put(f"cpu_ms_per_exchange_{name}", got.ms_per_exchange)
        run.extra[f"api_calls_per_exchange_{name}"] = {
            k: round(v, 2) for k, v in sorted(got.calls_per_exchange.items())}
        print(f"  {name}: {got.ms_per_exchange:.2f} ms CPU per exchange ({got.exchanges} "
              f"exchanges, {users} users, in {got.seconds:.1f} s; API calls per exchange "
              f"{run.extra[f'api_calls_per_exchange_{name}']})", flush=True)


def section_boot(run: Run) -> None:
    got = process.measure_startup(run.tmp, 1 if run.quick else 3)
    for key, value in got.items():
        run.put(key, value)
    print("  " + ", ".join(f"{k} {v:.3f} s" for k, v in got.items()), flush=True)


def section_trips(run: Run) -> None:
    per, kinds = pgcount.measure(200 if run.quick else 600)
    run.put("pg_round_trips_per_exchange", per)
    run.extra["pg_round_trips_by_kind"] = {k: round(v, 2) for k, v in kinds.items()}
    print(f"  {per:.2f} round trips per exchange ({run.extra['pg_round_trips_by_kind']})",
          flush=True)


def section_followup(run: Run) -> None:
    got = asyncio.run(telegram_followup.measure(5 if run.quick else 15, 3.0, gap=0.2))
    run.put("added_latency_p50_ms_telegram_back_to_back", got["followup_p50_ms"])
    run.put("added_latency_p99_ms_telegram_back_to_back", got["followup_p99_ms"])
    print(f"  {got['pairs']} follow-ups 0.2 s after a reply: p50 {got['followup_p50_ms']} ms, "
          f"p99 {got['followup_p99_ms']} ms", flush=True)


SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "core": (*(f"{kind}_c{c}" for c in (1, 10, 100)
               for kind in ("exchanges_per_s", "overhead_p50_ms", "overhead_p99_ms")),
             "loop_cpu_ms_per_exchange_c10"),
    "paced": ("overhead_p50_ms_c10_paced", "overhead_p99_ms_c10_paced",
              "overhead_p99_ms_c10_model100"),
    "baseline": ("baseline_exchanges_per_s_c10", "baseline_p50_ms_c10", "baseline_p99_ms_c10",
                 "core_vs_baseline"),
    "history": ("history_p50_ms_1k", "history_p50_ms_1m", "history_p50_ratio_1m_vs_1k"),
    "rss": ("rss_mb_10k_users",),
    "startup": ("help_seconds",),
    "telegram": ("added_latency_p50_ms_telegram", "added_latency_p99_ms_telegram"),
    "discord": ("added_latency_p50_ms_discord", "added_latency_p99_ms_discord"),
    "postgres": ("exchanges_per_s_c100_postgres", "exchanges_per_s_c100_postgres_2proc",
                 "exchanges_per_s_c100_postgres_vs_sqlite"),
    "memory": tuple(f"memory_{mode}_{ctx}_{lang}"
                    for mode in ("truncate", "summarize", "words", "words_meaning")
                    for ctx in memory.CONTEXTS for lang in ("en", "zh", "all")),
    "recall": ("recall_p50_ms_1k", "recall_p50_ms_100k", "recall_p50_ms_1m",
               "recall_ratio_1m_vs_1k", "recall_pg_p50_ms_1k", "recall_pg_p50_ms_100k",
               "recall_pg_p50_ms_1m", "recall_pg_ratio_1m_vs_1k"),
    "cpu": ("cpu_ms_per_exchange_telegram", "cpu_ms_per_exchange_discord"),
    "boot": ("startup_s_telegram_1m", "startup_s_discord_1m"),
    "trips": ("pg_round_trips_per_exchange",),
    "followup": ("added_latency_p50_ms_telegram_back_to_back",
                 "added_latency_p99_ms_telegram_back_to_back"),
    "real-model": tuple(key for key, *_ in REAL_MODEL_ROWS),
}
RUNNERS: dict[str, Callable[[Run], None]] = {
    "core": section_core, "paced": section_core_paced, "baseline": section_baseline,
    "history": section_history,
    "rss": section_rss, "startup": section_startup, "telegram": section_telegram,
    "discord": section_discord, "postgres": section_postgres,
    "memory": section_memory, "recall": section_recall, "cpu": section_cpu,
    "boot": section_boot, "trips": section_trips, "followup": section_followup,
    "real-model": section_real_model,
}
TITLES = {
    "core": "core throughput and overhead (SQLite)",
    "paced": "overhead at 10 concurrent with a model that takes 100 ms (SQLite)",
    "baseline": "baseline: bare aiosqlite exchange",
    "history": "history size: 1,000 vs 1,000,000 stored messages",
    "rss": "memory after 10,000 users (fresh subprocess)",
    "startup": "start-up: python -m bot --help",
    "telegram": "added latency through Telegram (adapter + emulator)",
    "discord": "added latency through Discord (adapter + emulator)",
    "postgres": "PostgreSQL at 100 concurrent conversations",
    "memory": "memory: planted turns in the prompt, long multi-session conversations",
    "recall": "recall per turn at 1k / 100k / 1M stored messages (SQLite and PostgreSQL, words)",
    "cpu": "bot process CPU per exchange, Telegram and Discord emulators, Ollama stand-in",
    "boot": "start-up to first getUpdates / IDENTIFY, 1,000,000 stored messages",
    "trips": "PostgreSQL round trips per exchange (counted)",
    "followup": "Telegram: a message 0.2 s after the previous reply's last edit",
    "real-model": "real model: llama-cpp-python server (n_ctx 512, or REAL_MODEL_CTX) and "
                  "LLM_PROVIDER=local, Gemma 3 270M",
}


# -- output


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # Other work on the machine skews every figure; the load says how busy it was.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cores": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_1m_at_start": load}


def _shown(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "×":
        return f"{value:.2f}×"
    if unit == "%":
        return f"{value * 100:.0f}%"
    if unit == "tok":
        return f"{value:,.0f} tokens"
    if unit == "n":
        return f"{value:.2f}"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "n":
        return f"{value:g}"
    if unit == "yes":
        return "yes" if value else "no"
    if unit == "s":
        return f"{value:.1f} s"
    return f"{value:.3f} s"


def table(run: Run) -> str:
    rows = [("figure", "value", "target", "met?")]
    for key, label, unit, target, check in ROWS:
        if key not in run.figures:
            continue
        value = run.figures[key]
        if check is None:
            met = ""
        elif value is None:
            met = "n/a"
        else:
            met = "yes" if check(value) else "NO"
        rows.append((label, _shown(value, unit), target, met))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def results_json(run: Run, when: str) -> dict[str, Any]:
    out: dict[str, Any] = {key: run.figures.get(key) for key in REQUIRED}
    for key, *_ in ROWS:
        if key not in out and key in run.figures:
            out[key] = run.figures[key]
    out.update(run.extra)
    out["not_available"] = run.missing
    out["quick"] = run.quick
    out["standin"] = (f"in-process, fixed {standin.REPLY_TOKENS}-token reply streamed "
                      f"instantly ({run.standin_s * 1e6:.1f} µs per reply)")
    out["machine"] = run.machine
    out["when"] = when
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer samples per figure (same definitions), about a minute")
    parser.add_argument("--only", default="",
                        help=f"comma-separated sections to run: {','.join(SECTIONS + OPT_IN)}; "
                             "results.json is then left alone unless --output is given")
    parser.add_argument("--output", type=Path, default=None,
                        help=f"where to write the figures (default {RESULTS})")
    parser.add_argument("--merge", action="store_true",
                        help="with --only: update the chosen sections' figures in "
                             "results.json (or --output), keeping every other figure")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS + OPT_IN]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from "
                     f"{', '.join(SECTIONS + OPT_IN)}")
    output = args.output or (None if args.only and not args.merge else RESULTS)

    core.quiet_logging()
    started = time.perf_counter()
    when = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        run = Run(QUICK if args.quick else FULL, args.quick, Path(tmp))
        run.standin_s = asyncio.run(standin.own_time_s())
        info = run.machine
        print(f"Machine: {info['cores']} cores, {info['cpu_model']}, Python {info['python']}, "
              f"load average {info['load_avg_1m_at_start']:.2f}"
              f"{' (quick run)' if args.quick else ''}")
        print(DEFINITIONS.format(standin_us=run.standin_s * 1e6), flush=True)
        for i, name in enumerate(chosen, 1):
            print(f"\n[{i}/{len(chosen)}] {TITLES[name]}", flush=True)
            t0 = time.perf_counter()
            try:
                RUNNERS[name](run)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                run.unavailable(tuple(k for k in SECTION_KEYS[name] if k not in run.figures),
                                reason)
                traceback.print_exc(limit=4)
            print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)

    print(f"\nResults ({time.perf_counter() - started:.0f} s in all"
          f"{', quick run' if args.quick else ''}):\n")
    print(table(run))
    if output is not None:
        figures = results_json(run, when)
        if args.merge and output.exists():
            # Only the chosen sections' keys change; the rest stay as last measured.
            keys = {k for name in chosen for k in SECTION_KEYS.get(name, ())} | set(run.figures)
            kept = json.loads(output.read_text())
            missing = {k: v for k, v in (kept.get("not_available") or {}).items()
                       if k not in keys}
            kept.update({k: figures[k] for k in sorted(keys) if k in figures})
            kept["not_available"] = {**missing, **run.missing}
            figures = kept
        output.write_text(json.dumps(figures, indent=2, ensure_ascii=False) + "\n")
        print(f"\nwritten to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
