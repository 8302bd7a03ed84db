"""Two bot processes, one PostgreSQL database: one bot, as a deployment runs it.

Two `python -m bot` processes run as Telegram webhook workers against the Bot
API emulator; the test plays the load balancer and posts each user's messages
alternately to one process and the other.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.conftest import free_port
from tests.fakes.model_server import ModelServer
from tests.fakes.telegram_api import TelegramApiEmulator
from tests.pg import pg_url  # noqa: F401  (a fresh database per test)

ROOT = Path(__file__).resolve().parent.parent
SECRET = "scale-out-secret"
# Every message alternates between the two processes, so each turn's history was written
# by the other one: 10 users x 6 turns exercises that 60 times, concurrently (the turns
# in order and exactly once); 20 x 10 cost three times the CPU and proved nothing more.
USERS, MESSAGES = 10, 6


@pytest.fixture
async def tg() -> AsyncIterator[TelegramApiEmulator]:
    async with TelegramApiEmulator() as emulator:
        yield emulator


async def start_worker(tg: TelegramApiEmulator, model_server: ModelServer, db: str,
                       port: int) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TELEGRAM_", "DISCORD_", "OPENAI_", "LLM_", "OLLAMA_"))}
    env.update({
        "PYTHONPATH": str(ROOT), "DATABASE_URL": db, "OLLAMA_HOST": model_server.url,
        "TELEGRAM_TOKEN": tg.bot_token, "TELEGRAM_BASE_URL": tg.base_url,
        "TELEGRAM_WEBHOOK_URL": f"http://127.0.0.1:{port}/hook",
        "TELEGRAM_WEBHOOK_PORT": str(port), "TELEGRAM_WEBHOOK_SECRET": SECRET,
        "RATE_LIMIT_PER_MINUTE": "0", "STREAM_EDIT_INTERVAL": "0.05", "LLM_RETRIES": "0",
        "SHUTDOWN_GRACE": "1",
    })
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def wait_listening(port: int) -> None:
    # Bounded, but generous: two start-ups at once on a busy shared machine took over 20 s.
    async with asyncio.timeout(60):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)  # polling a port that is not open yet
                continue
            writer.close()
            return


async def test_two_processes_share_one_database_in_order_exactly_once(
    tg: TelegramApiEmulator, model_server: ModelServer, pg_url: str  # noqa: F811
) -> None:
    ports = [free_port(), free_port()]
    workers = [await start_worker(tg, model_server, pg_url, p) for p in ports]
    update_ids = itertools.count(10_000)
    try:
        for p in ports:
            await wait_listening(p)
        await tg.wait_for(lambda: len(tg.calls("setWebhook")) >= 2, timeout=60)
        tg.webhook_url = ""  # the test is the load balancer now
        async with aiohttp.ClientSession() as http:

            async def send(port: int, message: dict[str, Any]) -> None:
                update = {"update_id": next(update_ids), "message": message}
                async with http.post(f"http://127.0.0.1:{port}/hook", json=update,
                                     headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as r:
                    assert r.status == 200

            async def user(uid: int) -> None:
                for k in range(MESSAGES):
                    text = f"user {uid} message {k}"
                    await send(ports[k % 2], tg.user_says(uid, text))
                    await tg.wait_for(
                        lambda t=text: any(m.text == f"You said: {t}"
                                           for m in tg.bot_messages(uid)), timeout=20)

            await asyncio.wait_for(asyncio.gather(*(user(1000 + u) for u in range(USERS))), 90)
            # A forged update (no secret) is refused by either worker.
            async with http.post(f"http://127.0.0.1:{ports[0]}/hook",
                                 json={"update_id": 1}) as r:
                assert r.status == 403
    finally:
        outputs = []
        for w in workers:
            if w.returncode is None:
                w.send_signal(signal.SIGTERM)
            _out, err = await asyncio.wait_for(w.communicate(), 20)
            outputs.append((w.returncode, err.decode()))
    assert [code for code, _ in outputs] == [0, 0], outputs
    # Each worker served its half: every other message of every user.
    served = [err.count("bot.exchange: exchange ok") for _, err in outputs]
    assert served == [USERS * MESSAGES // 2] * 2, served

    conn = await asyncpg.connect(pg_url)
    try:
        for u in range(USERS):
            rows = await conn.fetch(
                "SELECT m.role, m.content FROM messages m JOIN conversations c"
                " ON c.id = m.conversation_id WHERE c.user_id = $1 ORDER BY m.id",
                str(1000 + u))
            expected = []
            for k in range(MESSAGES):
                text = f"user {1000 + u} message {k}"
                expected += [("user", text), ("assistant", f"You said: {text}")]
            assert [(r["role"], r["content"]) for r in rows] == expected  # once, in order
        audit = await conn.fetch("SELECT status FROM audit WHERE kind = 'chat'")
        assert len(audit) == USERS * MESSAGES and {r["status"] for r in audit} == {"ok"}
    finally:
        await conn.close()
    # Each reply saw exactly the history before it, whichever process served it.
    for u in range(USERS):
        mine = [r for r in model_server.requests
                if r.last_user_message.startswith(f"user {1000 + u} ")]
        assert [len(r.messages) for r in mine] == [2 + 2 * k for k in range(MESSAGES)]
