"""Load for the crash test: the real core and SQLite, many conversations at once.

    python -m tests.crash_driver --db PATH --model-url URL [--run R] [--conversations N]

Prints `READY <pid>` once the store is open, then `ACK <conversation> <turn>`
each time a turn's reply stream has completed, which is after its exchange
was committed: every ACK is a promise the database must keep after a kill -9.
Each conversation sends `r<run> c<conversation> t<turn>` one turn after the
other, until the process is killed (or `--turns` are done).

With `--zygote` it imports everything once, then for each `RUN <r>` line on
stdin forks a child that runs the load above, prints `CHILD <pid>`, and
`EXIT <pid> <code>` once that child has died (the test SIGKILLs it): a test
can kill a real process many times without paying Python's start-up each time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import sys
import threading

from bot.app import open_service
from bot.messages import Incoming
from bot.service import ChatService
from bot.settings import load_settings


def turn_text(run: int, conversation: int, turn: int) -> str:
    return f"r{run} c{conversation} t{turn}"


def _say(line: str) -> None:
    # One write per line (well under PIPE_BUF): a kill never leaves half a line
    # that looks whole.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _converse(service: ChatService, run: int, conversation: int, turns: int) -> None:
    for turn in range(turns):
        text = turn_text(run, conversation, turn)
        msg = Incoming(platform="telegram", user_id=str(conversation), display_name="load",
                       chat_id=str(conversation), place_id=None, text=text)
        parts = []
        async with contextlib.aclosing((await service.handle(msg)).deltas()) as deltas:
            async for delta in deltas:
                parts.append(delta)
        reply = "".join(parts)
        if reply == f"You said: {text}":
            _say(f"ACK {conversation} {turn}")
        else:
            _say(f"ERR {conversation} {turn} {reply!r}")


async def load(args: argparse.Namespace, run: int) -> None:
    settings = load_settings(
        None, DATABASE_URL=f"sqlite:///{args.db}", OLLAMA_HOST=args.model_url,
        LLM_CONCURRENCY=16, LLM_RETRIES=0, RATE_LIMIT_PER_MINUTE=0, LOG_LEVEL="WARNING",
        # A small window, so that background summaries write too while we are killed.
        CONTEXT_TOKENS=512, REPLY_TOKENS=64,
    )
    if args.zygote:
        # The test writes nothing while a run lasts: stdin readable means it is
        # gone, and so must this child be (it would otherwise run on forever).
        asyncio.get_running_loop().add_reader(0, lambda: os.read(0, 1) or os._exit(1))
    async with open_service(settings) as service:
        _say(f"READY {os.getpid()}")
        await asyncio.gather(*(_converse(service, run, c, args.turns)
                               for c in range(args.conversations)))


def zygote(args: argparse.Namespace) -> int:
    # What the children import lazily, imported once here.
    for module in ("storage.sqlite_store", "bot.providers.ollama_provider"):
        importlib.import_module(module)
    # Nothing may run in other threads at a fork: only the forking one survives.
    assert threading.active_count() == 1
    for line in sys.stdin:
        command, run = line.split()
        assert command == "RUN"
        pid = os.fork()
        if pid == 0:  # the child: a fresh event loop, store and clients
            code = 0
            try:
                asyncio.run(load(args, int(run)))
            except BaseException:
                code = 1
            finally:
                sys.stdout.flush()
                os._exit(code)
        _say(f"CHILD {pid}")
        _, status = os.waitpid(pid, 0)
        _say(f"EXIT {pid} {os.waitstatus_to_exitcode(status)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.crash_driver")
    p.add_argument("--db", required=True)
    p.add_argument("--model-url", required=True)
    p.add_argument("--run", type=int, default=1)
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=10_000)
    p.add_argument("--zygote", action="store_true", help="fork a load per RUN line on stdin")
    args = p.parse_args(argv)
    if args.zygote:
        return zygote(args)
    asyncio.run(load(args, args.run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
