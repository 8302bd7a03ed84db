"""A quick follow-up in one Telegram chat: added latency to its first visible text.

Pairs of messages from one user in one chat: the second is sent the moment the
reply to the first is complete, then the user reads for `--pause` seconds.
Measured for the second of each pair: from the update leaving the emulator to
the emulator holding the bot's first message with text, minus the stand-in's
own time to first token. STREAM_EDIT_INTERVAL is the default (1 s), so this is
what the per-chat pacer costs a quick follow-up. `python -m benchmarks.telegram_followup`
prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from benchmarks import platforms
from benchmarks.core import quantile, quiet_logging
from benchmarks.standin import first_token_s


async def measure(pairs: int, pause: float, gap: float = 0.0) -> dict[str, Any]:
    """`gap`: seconds between the first reply's last edit and the follow-up."""
    from adapters.telegram.adapter import TelegramAdapter
    from tests.fakes.telegram_api import TelegramApiEmulator

    ttft = await first_token_s()
    users = [str(platforms.TELEGRAM_USER0 + i) for i in range(platforms.USERS)]
    async with TelegramApiEmulator() as tg, platforms._service(
            {"TELEGRAM_TOKEN": tg.bot_token, "TELEGRAM_BASE_URL": tg.base_url},
            "telegram", users) as service:
        stop = asyncio.Event()
        task = asyncio.create_task(TelegramAdapter(service.settings).run(service, stop))
        await platforms._bounded("getUpdates", tg.wait_for_call("getUpdates", 1, 10), task)
        uid = int(users[0])
        added: list[float] = []
        try:
            for i in range(2 * pairs):
                polls = len(tg.calls("getUpdates"))
                before = len(tg.bot_messages(uid))
                t0 = time.monotonic()
                tg.user_says(uid, f"Question {i}?")

                def done(before: int = before) -> bool:
                    new = tg.bot_messages(uid)[before:]
                    return bool(new) and new[-1].text == platforms.REPLY_TEXT

                await platforms._bounded("the reply", tg.wait_for(done, 10), task)
                first = next(m for m in tg.bot_messages(uid)[before:] if m.text.strip())
                await platforms._bounded(
                    "the next getUpdates",
                    tg.wait_for(lambda polls=polls: len(tg.calls("getUpdates")) > polls, 10),
                    task)
                if i % 2 == 0 and gap:
                    await asyncio.sleep(gap)  # the user reads the reply, then asks again
                if i % 2 == 1:
                    added.append(max(0.0, first.sent_at - t0 - ttft))
                    await asyncio.sleep(pause)  # the user reads
        finally:
            stop.set()
            await service.shutdown(1.0)
            await asyncio.wait({task}, timeout=15)
    return {"followup_p50_ms": round(quantile(added, 0.5) * 1000, 1),
            "followup_p99_ms": round(quantile(added, 0.99) * 1000, 1),
            "pairs": pairs, "pause_s": pause, "gap_s": gap, "stream_edit_interval_s": 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.telegram_followup")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--pause", type=float, default=3.0)
    parser.add_argument("--gap", type=float, default=0.0,
                        help="seconds after the first reply's last edit before the follow-up")
    args = parser.parse_args()
    quiet_logging()
    print(json.dumps(asyncio.run(measure(args.pairs, args.pause, args.gap))), flush=True)


if __name__ == "__main__":
    main()
