"""kill -9 at any moment under load, then start again.

`python -m tests.crash_driver --zygote` forks, for every run, a real process
that drives the core and SQLite with many conversations at once against the
model stand-in (itself in another process, so the load never waits on this
one), and prints `ACK <conversation> <turn>` once a turn's reply has fully
streamed, which is after its exchange was committed. The test SIGKILLs each
run at a different moment, from start-up (migrations, first turns) to deep in
the load, always on the same database file, and checks after every kill: the
file is intact, every stored exchange is whole with its one audit record,
turns are in order, and nothing acknowledged is missing. At the end a new
core on the same file answers, with its memory.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
from collections import Counter, defaultdict
from pathlib import Path

from bot.app import open_service
from storage.migrations import MIGRATIONS
from tests.conftest import SettingsFactory, ask
from tests.crash_driver import turn_text
from tests.fakes.model_server import ModelServer
from tests.test_load import remote_model_server

ROOT = Path(__file__).resolve().parent.parent
KILLS = 8
STARTUP_KILLS = (0.005, 0.015, 0.1)  # seconds after the fork
LOAD_KILLS = (0.2, 0.6)  # seconds after the first ACK: the others die in the load
CONVERSATIONS = 32

Acked = set[tuple[int, int, int]]  # (run, conversation, turn)


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _check_database(db: Path, acked: Acked) -> dict[int, int]:
    """Integrity, whole exchanges in order, every ACK kept; → messages per conversation."""
    if not db.exists():  # killed before the store created its file
        assert not acked
        return {}
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        applied = {r[0] for r in con.execute("SELECT name FROM _migrations")} \
            if "_migrations" in tables else set()
        if applied != {name for name, _ in MIGRATIONS}:
            # Killed while migrating: each step is whole or absent, and nothing
            # was served (READY comes after the migrations).
            assert applied <= {name for name, _ in MIGRATIONS}
            assert not acked
            return {}
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = con.execute(
            "SELECT c.user_id, m.role, m.content FROM messages m"
            " JOIN conversations c ON c.id = m.conversation_id ORDER BY m.id").fetchall()
        audit = con.execute(
            "SELECT conversation, user_input, model_response FROM audit"
            " WHERE kind = 'chat' AND status = 'ok'").fetchall()
    finally:
        con.close()
    by_conv: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for user_id, role, content in rows:
        by_conv[int(user_id)].append((role, content))
    stored: dict[tuple[int, int], list[int]] = defaultdict(list)  # (run, conv) → turns
    exchanges: Counter[tuple[str, str, str]] = Counter()
    for conv, messages in by_conv.items():
        # A user message always with its reply, and nothing else in between.
        assert len(messages) % 2 == 0, (conv, messages[-3:])
        for (role_u, text), (role_a, reply) in zip(messages[::2], messages[1::2], strict=True):
            assert (role_u, role_a) == ("user", "assistant"), (conv, text)
            assert reply == f"You said: {text}", (conv, text, reply)
            run, c, turn = (int(part[1:]) for part in text.split())
            assert c == conv and turn_text(run, c, turn) == text
            stored[(run, conv)].append(turn)
            exchanges[(f"telegram:{conv}@dm", text, reply)] += 1
    for (run, conv), turns in stored.items():
        # Each conversation's turns are stored once each, in order, with no gap.
        assert turns == list(range(len(turns))), (run, conv, turns)
        # Only the newest may lack its ACK (killed between commit and print).
        assert {(run, conv, t) for t in turns[:-1]} <= acked, (run, conv)
    missing = {a for a in acked if a[2] not in stored.get((a[0], a[1]), [])}
    assert not missing, f"acknowledged but lost: {sorted(missing)[:5]}"
    # The audit record is written with its exchange: exactly one each.
    assert Counter(audit) == exchanges
    return {conv: len(messages) for conv, messages in by_conv.items()}


async def _run_and_kill(zygote: asyncio.subprocess.Process, run: int, after: float,
                        stderr_file: Path, *, once_serving: bool = False) -> Acked:
    """Start run `run` in a fresh child; SIGKILL it `after` seconds later.

    With `once_serving`, the `after` seconds count from the child's first ACK,
    so the kill lands in the load however slowly a loaded machine starts it.
    """
    assert zygote.stdin is not None and zygote.stdout is not None
    zygote.stdin.write(f"RUN {run}\n".encode())
    await zygote.stdin.drain()
    lines: list[str] = []
    async with asyncio.timeout(30):
        while not lines or not lines[-1].startswith("CHILD "):
            line = (await zygote.stdout.readline()).decode()
            assert line.endswith("\n"), ("the driver ended", _text(stderr_file))
            lines.append(line)
        pid = int(lines[-1].split()[1])
        while once_serving and not lines[-1].startswith(("ACK ", "ERR ", "EXIT ")):
            line = (await zygote.stdout.readline()).decode()
            assert line.endswith("\n"), ("the driver ended", _text(stderr_file))
            lines.append(line)
        try:
            # This sleep picks the moment of the kill; it waits for nothing.
            await asyncio.sleep(after)
        finally:
            os.kill(pid, signal.SIGKILL)  # whatever happens, no child outlives its run
        while not lines[-1].startswith(f"EXIT {pid} "):
            line = (await zygote.stdout.readline()).decode()
            assert line.endswith("\n"), ("the driver ended", _text(stderr_file))
            lines.append(line)
    assert lines[-1] == f"EXIT {pid} {-signal.SIGKILL}\n", (lines[-1], _text(stderr_file))
    acked: Acked = set()
    for line in lines:
        assert not line.startswith("ERR "), f"a turn failed: {line!r}"
        if line.startswith("ACK "):
            _, conversation, turn = line.split()
            acked.add((run, int(conversation), int(turn)))
    return acked


async def test_kill_9_at_any_moment_under_load_loses_nothing_acknowledged(
    tmp_path: Path, model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    db = tmp_path / "crash.db"
    stderr_file = tmp_path / "driver-stderr.txt"
    moments = random.Random(20261129)  # a fixed seed: the same moments every time
    acked: Acked = set()
    served_runs = 0  # runs killed after serving, not only in start-up
    async with remote_model_server() as fast:
        with stderr_file.open("ab") as err:
            zygote = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.crash_driver", "--zygote", "--db", str(db),
                "--model-url", fast.url, "--conversations", str(CONVERSATIONS),
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err)
        try:
            for run in range(1, KILLS + 1):
                # The first runs die in start-up (creating the file, migrating, the
                # first turns), the others anywhere in the load.
                after = STARTUP_KILLS[run - 1] if run <= len(STARTUP_KILLS) \
                    else moments.uniform(*LOAD_KILLS)
                this_run = await _run_and_kill(zygote, run, after, stderr_file,
                                               once_serving=run > len(STARTUP_KILLS))
                served_runs += bool(this_run)
                acked |= this_run
                counts = _check_database(db, acked)
        finally:
            assert zygote.stdin is not None
            zygote.stdin.close()
            try:
                await asyncio.wait_for(zygote.wait(), 10)
            finally:
                if zygote.returncode is None:
                    zygote.kill()
                    await zygote.wait()
    assert zygote.returncode == 0
    assert "Traceback" not in _text(stderr_file)
    # Kills did land in the middle of the load, not only before it (loose
    # bounds: a slow machine serves less before each kill).
    assert served_runs >= 3, served_runs
    assert len(acked) > 4 * CONVERSATIONS, len(acked)

    # Start again, in this process: the same file serves, with its memory.
    requests_before = len(model_server.requests)
    conv = max(counts, key=lambda c: counts[c])
    async with open_service(make_settings(DATABASE_URL=f"sqlite:///{db}",
                                          MEMORY_STRATEGY="truncate")) as svc:
        reply = await asyncio.wait_for(
            ask(svc, "still there?", user=str(conv), platform="telegram"), 10)
    assert reply == "You said: still there?"
    (request,) = model_server.requests[requests_before:]
    assert request.messages[-1] == {"role": "user", "content": "still there?"}
    assert request.messages[-2]["role"] == "assistant"  # the stored history came along
    assert request.messages[-2]["content"].startswith("You said: r")
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        (stored,) = con.execute(
            "SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id"
            " WHERE c.key = ?", (f"telegram:{conv}@dm",)).fetchone()
    finally:
        con.close()
    assert stored == counts[conv] + 2
