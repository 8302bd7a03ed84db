"""Secrets never shown, and `forget` erases a user.

`python -m bot` runs as operators run it, with TELEGRAM_TOKEN, DISCORD_TOKEN,
OPENAI_API_KEY and TELEGRAM_WEBHOOK_SECRET set to distinctive values: --help,
failing start-ups, both platforms answering while the model server refuses
the API key, the console, logs and stats. Everything each run printed (stdout
and stderr), every reply users saw, and what the platforms received is
scanned for those values and for any 8-character piece of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

import tests.fakes.model_server as fake_models
from bot.app import open_service
from bot.settings import load_settings
from bot.store import TABLES
from tests.conftest import ask, incoming
from tests.fakes.discord_api import DiscordEmulator
from tests.fakes.model_server import ModelServer, closed_port_url
from tests.fakes.telegram_api import TelegramApiEmulator

ROOT = Path(__file__).resolve().parent.parent
SECRETS = {  # random-looking: no 8-character piece of them occurs anywhere by chance
    "TELEGRAM_TOKEN": "7000042:AAq9Zx4Wm2Lk8Rt5Yp3Vn7Bc1Hd6Fg0Js",
    "DISCORD_TOKEN": "Zq8Xw2Vb5Nm1Qa.Lk3Jh7.Gf4Ds6Aa9Pp0Oo2Ii8Uu5Yy1Tt",
    "OPENAI_API_KEY": "sk-Qx7Wv2Lm9Kp4Zr8Ty1Nb6Hc3Jd5Fg0",
    "TELEGRAM_WEBHOOK_SECRET": "Hk_9Qw2Er7Ty4Ui1Op6As3Df8Gh5Jk0",
}
WINDOW = 8  # no piece this long of a secret may show (a masked "sk-…7890" is fine)


def leaks(text: str) -> list[str]:
    """The secrets of which some WINDOW-character piece appears in `text`."""
    return [name for name, value in SECRETS.items()
            if any(value[i:i + WINDOW] in text for i in range(len(value) - WINDOW + 1))]


def bot_env(tmp_path: Path, model_server: ModelServer, **extra: str) -> dict[str, str]:
    """Only what the bot needs, plus every secret; a cwd without .env is used."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update({
        "PYTHONPATH": str(ROOT), "DATABASE_URL": f"sqlite:///{tmp_path / 'bot.db'}",
        "OLLAMA_HOST": model_server.url, "OPENAI_BASE_URL": model_server.url + "/v1",
        "LLM_RETRIES": "0", "RATE_LIMIT_PER_MINUTE": "0", "LOG_LEVEL": "DEBUG",
        "SHUTDOWN_GRACE": "1", "STREAM_EDIT_INTERVAL": "0.05", **SECRETS,
    })
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}  # "" removes a variable


async def run(args: list[str], env: dict[str, str], cwd: Path,
              stdin: str = "") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, cwd=cwd, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(errors="replace") + err.decode(errors="replace")


async def test_no_secret_in_help_or_failing_startups(
    tmp_path: Path, model_server: ModelServer
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    async with TelegramApiEmulator(token="7000042:AAanotherTokenTheApiKnows_abcdefgh") as tg, \
            DiscordEmulator(token="MTEwMDAwMDAwMDAwMDAwMDA0Mw.GoTheR.another-discord-token") \
            as dc:
        only_telegram = {"DISCORD_TOKEN": "", "TELEGRAM_BASE_URL": tg.base_url}
        only_discord = {"TELEGRAM_TOKEN": "", "DISCORD_API_BASE": dc.api_base}
        cases = {
            "--help": (["--help"], {}, 0),
            "bad setting": (["console"], {"CONTEXT_TOKENS": "abc"}, 2),
            "bad rule": (["console"], {"REPLY_TOKENS": "5000"}, 2),
            "bad id list": ([], {"ALLOWED_USERS": "telegram"}, 2),
            "unusable database": ([], {"DATABASE_URL": f"sqlite:///{blocker}/x/bot.db"}, 1),
            "telegram refuses the token": ([], only_telegram, 1),
            "telegram unreachable": ([], {"DISCORD_TOKEN": "",
                                          "TELEGRAM_BASE_URL": await closed_port_url() + "/bot"},
                                     1),
            "discord refuses the token": ([], only_discord, 1),
            "webhook secret malformed": ([], {
                "DISCORD_TOKEN": "", "TELEGRAM_WEBHOOK_URL": "https://bot.example.org/tg",
                "TELEGRAM_WEBHOOK_SECRET": "bad secret! " + SECRETS["TELEGRAM_WEBHOOK_SECRET"]},
                                          2),
        }
        # Two at a time, one per core: nine start-ups at once on a busy machine each get
        # too little CPU to finish within run()'s bound, and are no quicker in total.
        cores = asyncio.Semaphore(2)

        async def run_case(args: list[str], extra: dict[str, str]) -> tuple[int, str]:
            async with cores:
                return await run(args, bot_env(tmp_path, model_server, **extra), tmp_path)

        results = await asyncio.gather(*(run_case(args, extra)
                                         for args, extra, _ in cases.values()))
    for (what, (_, _, expected_code)), (code, output) in zip(cases.items(), results,
                                                             strict=True):
        assert leaks(output) == [], (what, output[-2000:])
        assert code == expected_code, (what, output[-2000:])
        if code:
            errors = [ln for ln in output.splitlines() if "error" in ln.lower()]
            assert errors, (what, output)  # it failed, and said so
    assert "TELEGRAM_TOKEN" in results[0][1]  # --help lists the setting, not its value
    # Start-up says once that access is open (no ALLOWED_USERS / ALLOWED_PLACES).
    refused = results[list(cases).index("telegram refuses the token")][1]
    assert refused.count("access: open to everyone") == 1, refused
    assert tg.calls("getMe") and tg.calls("getMe")[0].status == 401  # the token was tried
    assert model_server.requests == []


async def test_no_secret_while_both_platforms_answer_with_a_refused_api_key(
    tmp_path: Path, model_server: ModelServer
) -> None:
    # The model server knows another key: every chat fails with 401, whose
    # message quotes the key (masked, as OpenAI does).
    model_server.api_key = "sk-proj-theKeyTheServerExpects0000000000"
    async with TelegramApiEmulator(token=SECRETS["TELEGRAM_TOKEN"]) as tg, \
            DiscordEmulator(token=SECRETS["DISCORD_TOKEN"]) as dc:
        env = bot_env(tmp_path, model_server, LLM_PROVIDER="openai",
                      TELEGRAM_BASE_URL=tg.base_url, DISCORD_API_BASE=dc.api_base,
                      LOG_FORMAT="json")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert proc.stdout is not None
        output = asyncio.create_task(proc.stdout.read())
        try:
            await tg.wait_for(lambda: bool(tg.calls("getUpdates")) or proc.returncode is not None,
                              20, "polling")
            await dc.wait_ready(timeout=20)
            tg.user_says(1001, "hello from telegram")
            dm = dc.dm_channel(2_100_000_000_000_000_001)
            await dc.user_says(2_100_000_000_000_000_001, "hello from discord")
            await tg.wait_for(lambda: bool(tg.bot_texts(1001)), 10, "the telegram reply")
            await dc.wait_for(lambda: bool(dc.bot_messages(dm)), 10)
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        log_text = (await output).decode(errors="replace")
        replies = tg.bot_texts(1001) + [m.content for m in dc.bot_messages(dm)]
        # What the platforms received: every body the bot sent them.
        sent = json.dumps([c.params for c in tg.calls()] + [c.body for c in dc.calls()],
                          default=str)
    assert code == 0, log_text[-3000:]
    assert replies == ["⚠️ The model server refused the bot's credentials. Please tell the "
                       "operator."] * 2
    assert leaks(log_text) == [], log_text[-3000:]
    assert leaks("\n".join(replies)) == []
    assert leaks(sent) == []
    # The log did record the failure, with the key masked as the server sent it.
    assert "openai 401" in log_text and "Incorrect API key provided" in log_text
    # The key crossed the wire only where it belongs: the Authorization header.
    assert [r.headers["Authorization"] for r in model_server.requests] == [
        f"Bearer {SECRETS['OPENAI_API_KEY']}"] * 2
    assert leaks(json.dumps([r.body for r in model_server.requests])) == []
    # Nor is it in the audit log, which `logs` prints.
    with sqlite3.connect(tmp_path / "bot.db") as con:
        audit = con.execute("SELECT * FROM audit").fetchall()
    con.close()
    assert len(audit) == 2 and leaks(repr(audit)) == []


async def test_no_secret_in_console_logs_stats_and_forget(
    tmp_path: Path, model_server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Some OpenAI-compatible proxies quote the whole key they were sent in their 401
    # (OpenAI masks it: the test above): the bot's log lines, its audit records and
    # every operator command's output must not show it.
    monkeypatch.setattr(fake_models, "_bad_key_message", lambda key: f"Invalid API key: {key}")
    model_server.api_key = "sk-proj-theKeyTheServerExpects0000000000"
    env = bot_env(tmp_path, model_server, LLM_PROVIDER="openai", TELEGRAM_TOKEN="",
                  DISCORD_TOKEN="")
    outputs: dict[str, str] = {}
    consoles = await asyncio.gather(*(
        run(["console"], env | {"LOG_FORMAT": log_format}, tmp_path, "hello\n/model\n")
        for log_format in ("text", "json")))
    for log_format, (code, output) in zip(("text", "json"), consoles, strict=True):
        assert code == 0, output
        assert "refused the bot's credentials" in output
        outputs[f"console {log_format}"] = output
    operator = [["logs"], ["logs", "--json", "-n", "50"], ["stats"], ["stats", "--json"],
                ["migrate"]]
    results = await asyncio.gather(*(run(args, env, tmp_path) for args in operator))
    for args, (code, output) in zip(operator, results, strict=True):
        assert code == 0, (args, output)
        outputs[" ".join(args)] = output
    assert "openai 401" in outputs["logs"]  # the failure is there to see, redacted
    # One audit record per console's exchange, the quoted key replaced.
    records = [json.loads(line) for line in outputs["logs --json -n 50"].splitlines()]
    assert [r["status"] for r in records] == ["error", "error"], records
    for record in records:
        assert record["error"].endswith("Invalid API key: <redacted>"), record["error"]
    code, outputs["forget"] = await run(["forget", f"console:{_console_user(tmp_path)}"], env,
                                        tmp_path)
    assert code == 0
    for what, output in outputs.items():
        assert leaks(output) == [], (what, output[-2000:])


def test_log_lines_and_logged_errors_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    """The last line of defence: whatever a library logs, the secret is replaced."""
    import logging

    from bot.logging_setup import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    # setup_logging also quietens client libraries: put every level back after.
    names = [*logging.Logger.manager.loggerDict, "httpx", "httpcore", "telegram.ext",
             "discord", "aiosqlite", "asyncio"]
    levels = {name: logging.getLogger(name).level for name in names}
    key, token = SECRETS["OPENAI_API_KEY"], SECRETS["TELEGRAM_TOKEN"]
    try:
        for fmt in ("text", "json"):
            setup_logging("DEBUG", fmt, [key, token])
            log = logging.getLogger("some.library")
            log.info("POST https://api.telegram.org/bot%s/getUpdates", token)
            try:
                raise RuntimeError(f"refused key {key}")
            except RuntimeError:
                log.exception("call failed")
            err = capsys.readouterr().err
            assert leaks(err) == [], err
            assert err.count("<redacted>") == 2, err  # in the URL and in the traceback
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, old_level in levels.items():
            logging.getLogger(name).setLevel(old_level)


def _console_user(tmp_path: Path) -> str:
    with sqlite3.connect(tmp_path / "bot.db") as con:
        (user,) = con.execute("SELECT DISTINCT user_id FROM audit").fetchone()
    con.close()
    return str(user)


# -- erasure ------------------------------------------------------------------------------


async def test_forget_erases_history_summaries_settings_and_audit_of_one_user_only(
    tmp_path: Path, model_server: ModelServer
) -> None:
    db = tmp_path / "bot.db"
    settings = load_settings(None, DATABASE_URL=f"sqlite:///{db}", OLLAMA_HOST=model_server.url,
                             LLM_RETRIES=0, RATE_LIMIT_PER_MINUTE=0)
    async with open_service(settings) as svc:
        for user in ("1", "2"):
            for place in (None, "-100"):  # a DM and a group: two conversations each
                await ask(svc, f"my name is U{user}", user=user, place=place,
                          platform="telegram")
            await ask(svc, "/model qwen2.5", user=user, platform="telegram")
            await ask(svc, "x" * 4001, user=user, platform="telegram")  # refused: audited
            for place in (None, "-100"):
                ref = svc.conversation_ref(incoming("x", user=user, place=place,
                                                    platform="telegram"))
                conv = await svc.store.conversation_id(ref)
                newest = (await svc.store.recent_messages(conv, 1))[0].id
                assert await svc.store.save_summary(conv, f"U{user} likes tea", newest)
                await svc.store.set_conversation_persona(ref, "teacher")  # /persona
    before = _rows_by_user(db)
    assert before["2"] == before["1"] and before["1"]["summaries"] == 2

    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env |= {"PYTHONPATH": str(ROOT), "DATABASE_URL": f"sqlite:///{db}"}
    code, output = await run(["forget", "telegram:1"], env, tmp_path)
    assert code == 0, output
    assert "forgot telegram:1" in output
    for table in ("messages 4", "summaries 2", "conversations 2", "user_settings 1", "audit 3"):
        assert table in output, output
    after = _rows_by_user(db)
    # model_info holds what was learned about models, place_settings a server's or
    # group's default persona: nobody's data.
    assert after["1"] == {table: 0 for table in TABLES
                          if table not in ("model_info", "place_settings")}
    assert after["2"] == before["2"]  # nobody else's data is touched

    # The user starts from nothing: no memory, the default model.
    async with open_service(settings) as svc:
        reply = await ask(svc, "who am I?", user="1", platform="telegram")
    assert reply == "You said: who am I?"
    assert model_server.requests[-1].model == "llama3.2"
    assert len(model_server.requests[-1].messages) == 2


def _rows_by_user(db: Path) -> dict[str, dict[str, int]]:
    """Rows per table that belong to telegram user 1 and 2."""
    queries = {
        "conversations": "SELECT count(*) FROM conversations WHERE platform = 'telegram'"
                         " AND user_id = ?",
        "messages": "SELECT count(*) FROM messages WHERE conversation_id IN (SELECT id FROM"
                    " conversations WHERE platform = 'telegram' AND user_id = ?)",
        "summaries": "SELECT count(*) FROM summaries WHERE conversation_id IN (SELECT id FROM"
                     " conversations WHERE platform = 'telegram' AND user_id = ?)",
        "user_settings": "SELECT count(*) FROM user_settings WHERE platform = 'telegram'"
                         " AND user_id = ?",
        "audit": "SELECT count(*) FROM audit WHERE platform = 'telegram' AND user_id = ?",
        "notes": "SELECT count(*) FROM notes WHERE conversation_id IN (SELECT id FROM"
                 " conversations WHERE platform = 'telegram' AND user_id = ?)",
        "conversation_settings": "SELECT count(*) FROM conversation_settings WHERE"
                                 " platform = 'telegram' AND user_id = ?",
    }
    with sqlite3.connect(db) as con:
        out = {user: {table: con.execute(sql, (user,)).fetchone()[0]
                      for table, sql in queries.items()} for user in ("1", "2")}
    con.close()
    return out
