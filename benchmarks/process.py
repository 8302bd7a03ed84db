"""The bot as its own process (`python -m bot`): CPU per exchange and start-up time.

The bot runs as a child process, exactly as an operator starts it, against the
Telegram or Discord emulator and the Ollama stand-in (tests/fakes), which run
in this (the parent) process, so that the child's CPU time is the bot's alone.

* `cpu_ms_per_exchange_{telegram,discord}`: the child's CPU time (user + system,
  /proc/<pid>/stat via psutil) per exchange, over USERS users × MESSAGES
  messages each (users in parallel, each user's next message once the reply to
  the previous one is complete), every reply streamed as REPLY_TOKENS tokens
  by the Ollama stand-in over HTTP. Measured from after a warm-up exchange per
  user to the last complete reply.
* `startup_s_{telegram,discord}_1m`: from spawning `python -m bot` on a database
  of 1,000,000 stored messages to the emulator receiving the first getUpdates
  (Telegram) or gateway IDENTIFY (Discord).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks import dbseed
from benchmarks.standin import REPLY

ROOT = Path(__file__).resolve().parent.parent
USERS = 50
MESSAGES = 10
REPLY_TOKENS = len(REPLY)
REPLY_TEXT = "".join(REPLY)
TOKEN_DELAY = 0.002  # seconds between streamed tokens: each arrives on its own
MODEL = "llama3.2"
DISCORD_TOKEN = "MTEwMDAwMDAwMDAwMDAwMDAwMQ.GxYzAb.emulator-only-discord-token-0123456789"
TELEGRAM_USER0 = 5_000_001
DISCORD_USER0 = 2_100_000_000_000_000_001


@dataclass
class Cpu:
    ms_per_exchange: float
    exchanges: int
    seconds: float
    calls_per_exchange: dict[str, float]  # platform API calls the bot made, by method


def _env(db: Path, model_url: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "TELEGRAM_", "DISCORD_", "DATABASE_", "LLM_"))}
    env.update({
        "DATABASE_URL": f"sqlite:///{db}", "LLM_PROVIDER": "ollama", "OLLAMA_HOST": model_url,
        "LLM_MODEL": MODEL, "RATE_LIMIT_PER_MINUTE": "0", "LOG_LEVEL": "WARNING",
        "MEMORY_STRATEGY": "truncate", "PYTHONPATH": str(ROOT), **extra})
    return env


@contextlib.asynccontextmanager
async def _bot(db: Path, model_url: str, extra: dict[str, str],
               workdir: Path) -> AsyncIterator[subprocess.Popen[bytes]]:
    # cwd: an empty directory, so that no .env is read.
    # BENCH_SPY_STARTUP=<file>: py-spy samples the bot from its first instruction.
    spy = os.environ.get("BENCH_SPY_STARTUP")
    prefix = ["py-spy", "record", "--rate", "500", "--format", "raw", "--output", spy,
              "--"] if spy else []
    proc = subprocess.Popen(  # noqa: ASYNC220 (returns at once; waiting is off the loop)
        [*prefix, sys.executable, "-m", "bot"], cwd=workdir, env=_env(db, model_url, extra),
        stdout=subprocess.DEVNULL, stderr=open(workdir / "bot.log", "wb"))  # noqa: ASYNC230
    try:
        yield proc
    finally:
        if spy:
            proc.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
            await asyncio.sleep(1.0)
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 15)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 5)


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def _log_tail(workdir: Path) -> str:
    with contextlib.suppress(OSError):
        return (workdir / "bot.log").read_text(errors="replace")[-600:]
    return ""


@contextlib.asynccontextmanager
async def _profiled(pid: int) -> AsyncIterator[None]:
    """With BENCH_PROFILE=<file>: py-spy samples the bot over the measured part
    (collapsed stacks, `--format raw`); the sampler's own CPU is its process's."""
    out = os.environ.get("BENCH_PROFILE")
    if not out:
        yield
        return
    # --gil: only the thread holding the GIL, so samples are CPU, not waiting.
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "250", "--gil",  # noqa: ASYNC220
                            "--format", "raw", "--nonblocking", "--output", out],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await asyncio.sleep(0.5)  # attached before the first measured message
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        await asyncio.to_thread(spy.wait, 30)


async def _model() -> object:
    from tests.fakes.model_server import ModelServer

    server = ModelServer(models=[MODEL])
    server.reply = REPLY_TEXT
    server.chunk_delay = TOKEN_DELAY
    await server.start()
    return server


async def telegram_cpu(users: int = USERS, messages: int = MESSAGES) -> Cpu:
    from tests.fakes.telegram_api import TelegramApiEmulator

    ids = [str(TELEGRAM_USER0 + i) for i in range(users)]
    with tempfile.TemporaryDirectory(prefix="bench-proc-") as tmp:
        work = Path(tmp)
        db = await asyncio.to_thread(dbseed.fresh_db, work / "bot.db", ids, 100, "telegram")
        model = await _model()
        try:
            async with TelegramApiEmulator() as tg, _bot(
                    db, model.url, {"TELEGRAM_TOKEN": tg.bot_token,  # type: ignore[attr-defined]
                                    "TELEGRAM_BASE_URL": tg.base_url}, work) as proc:
                try:
                    await tg.wait_for_call("getUpdates", 1, 30)
                except TimeoutError:
                    raise RuntimeError(f"no getUpdates: {_log_tail(work)}") from None

                async def one(uid: int, n: int) -> None:
                    before = len(tg.bot_messages(uid))
                    tg.user_says(uid, f"Question {n}: what should I do about the plan?")

                    def done() -> bool:
                        new = tg.bot_messages(uid)[before:]
                        return bool(new) and new[-1].text == REPLY_TEXT

                    await tg.wait_for(done, 60)

                async def user(uid: int, count: int, start: int) -> None:
                    for n in range(count):
                        await one(uid, start + n)

                await asyncio.gather(*(user(int(u), 1, 0) for u in ids))  # warm-up
                async with _profiled(proc.pid):
                    ps = psutil.Process(proc.pid)
                    seen = len(tg.calls())
                    c0, t0 = _cpu_s(ps), time.monotonic()
                    await asyncio.gather(*(user(int(u), messages, 1) for u in ids))
                    c1, t1 = _cpu_s(ps), time.monotonic()
                    calls = collections.Counter(c.method for c in tg.calls()[seen:])
        finally:
            await model.close()  # type: ignore[attr-defined]
    n = users * messages
    return Cpu((c1 - c0) / n * 1000, n, t1 - t0, {k: v / n for k, v in calls.items()})


async def discord_cpu(users: int = USERS, messages: int = MESSAGES) -> Cpu:
    from tests.fakes.discord_api import DiscordEmulator

    ids = [str(DISCORD_USER0 + i) for i in range(users)]
    with tempfile.TemporaryDirectory(prefix="bench-proc-") as tmp:
        work = Path(tmp)
        db = await asyncio.to_thread(dbseed.fresh_db, work / "bot.db", ids, 100, "discord")
        model = await _model()
        try:
            async with DiscordEmulator(token=DISCORD_TOKEN) as api, _bot(
                    db, model.url, {"DISCORD_TOKEN": DISCORD_TOKEN,  # type: ignore[attr-defined]
                                    "DISCORD_API_BASE": api.api_base}, work) as proc:
                try:
                    await api.wait_ready(1, 30)
                except TimeoutError:
                    raise RuntimeError(f"gateway not ready: {_log_tail(work)}") from None

                async def one(uid: int, n: int) -> None:
                    channel = api.dm_channel(uid)
                    before = len(api.bot_messages(channel))
                    await api.user_says(uid, f"Question {n}: what should I do about the plan?")

                    def done() -> bool:
                        new = api.bot_messages(channel)[before:]
                        return bool(new) and new[-1].content == REPLY_TEXT

                    await api.wait_for(done, 60)

                async def user(uid: int, count: int, start: int) -> None:
                    for n in range(count):
                        await one(uid, start + n)

                await asyncio.gather(*(user(int(u), 1, 0) for u in ids))
                async with _profiled(proc.pid):
                    ps = psutil.Process(proc.pid)
                    seen = len(api.calls())
                    c0, t0 = _cpu_s(ps), time.monotonic()
                    await asyncio.gather(*(user(int(u), messages, 1) for u in ids))
                    c1, t1 = _cpu_s(ps), time.monotonic()
                    calls = collections.Counter(f"{c.method} {c.path.split('/')[1]}"
                                                for c in api.calls()[seen:])
        finally:
            await model.close()  # type: ignore[attr-defined]
    n = users * messages
    return Cpu((c1 - c0) / n * 1000, n, t1 - t0, {k: v / n for k, v in calls.items()})


async def startup(platform: str, db: Path) -> float:
    """Seconds from spawning the bot on `db` to its first getUpdates / IDENTIFY."""
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        work = Path(tmp)
        model = await _model()
        try:
            if platform == "telegram":
                from tests.fakes.telegram_api import TelegramApiEmulator

                async with TelegramApiEmulator() as tg:
                    t0 = time.monotonic()
                    async with _bot(db, model.url, {"TELEGRAM_TOKEN": tg.bot_token,  # type: ignore[attr-defined]
                                                    "TELEGRAM_BASE_URL": tg.base_url}, work):
                        try:
                            await tg.wait_for_call("getUpdates", 1, 60)
                        except TimeoutError:
                            raise RuntimeError(f"no getUpdates: {_log_tail(work)}") from None
                        return tg.calls("getUpdates")[0].at - t0
            from tests.fakes.discord_api import DiscordEmulator

            async with DiscordEmulator(token=DISCORD_TOKEN) as api:
                t0 = time.monotonic()
                async with _bot(db, model.url, {"DISCORD_TOKEN": DISCORD_TOKEN,  # type: ignore[attr-defined]
                                                "DISCORD_API_BASE": api.api_base}, work):
                    try:
                        await api.wait_for(lambda: bool(api.identifies), 60)
                    except TimeoutError:
                        raise RuntimeError(f"no IDENTIFY: {_log_tail(work)}") from None
                    return time.monotonic() - t0
        finally:
            await model.close()  # type: ignore[attr-defined]
    raise AssertionError("unreachable")


def measure_startup(tmp: Path, runs: int = 3) -> dict[str, float]:
    """Median start-up seconds per platform with the 1,000,000-message database."""
    out: dict[str, float] = {}
    for platform in ("telegram", "discord"):
        times = []
        for _ in range(runs):
            db, _cached = dbseed.big_db(tmp / "startup-1m.db")
            times.append(asyncio.run(startup(platform, db)))
        times.sort()
        out[f"startup_s_{platform}_1m"] = times[len(times) // 2]
    return out


if __name__ == "__main__":
    from benchmarks.core import quiet_logging

    quiet_logging()
    for name, fn in (("telegram", telegram_cpu), ("discord", discord_cpu)):
        got = asyncio.run(fn())
        print(f"{name}: {got.ms_per_exchange:.2f} ms CPU per exchange "
              f"({got.exchanges} in {got.seconds:.1f} s)", flush=True)
    with tempfile.TemporaryDirectory() as d:
        print(measure_startup(Path(d), 1))
