"""`python -m bot console` and the operator commands as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from adapters.console import NO_SERVER_HINT
from storage.migrations import MIGRATIONS
from tests.fakes.model_server import ModelServer

ROOT = Path(__file__).resolve().parent.parent


async def run_bot(args: list[str], env: dict[str, str], stdin: str = "",
                  cwd: Path | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, cwd=cwd or ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 30)
    return proc.returncode or 0, out.decode(), err.decode()


def bot_env(tmp_path: Path, model_server: ModelServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TELEGRAM_", "DISCORD_", "OPENAI_", "LLM_", "OLLAMA_"))}
    env.update({
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'bot.db'}",
        "OLLAMA_HOST": model_server.url,
        "LLM_RETRIES": "0",
    })
    env.update(extra)
    return env


async def test_console_remembers_across_restart_resets_switches_refuses_and_forgets(
    tmp_path: Path, model_server: ModelServer
) -> None:
    env = bot_env(tmp_path, model_server, MAX_INPUT_CHARS="100")
    code, out, err = await run_bot(["console"], env, "my name is Ana\n")
    assert code == 0, err
    assert out.splitlines() == ["You said: my name is Ana"]

    script = "what is my name?\n/model qwen2.5\n/reset\nwho am I?\n" + "x" * 101 + "\n"
    code, out, err = await run_bot(["console"], env, script)
    assert code == 0, err
    lines = out.splitlines()
    assert "Your name is Ana" in lines[0]
    assert "qwen2.5" in lines[1]
    assert "forgot" in lines[2]
    assert lines[3] == "You said: who am I?"  # the name is gone after /reset
    assert "101 characters" in lines[4] and "limit is 100" in lines[4]
    assert len(lines) == 5  # one reply per input line
    assert [r.model for r in model_server.requests] == ["llama3.2", "llama3.2", "qwen2.5"]

    code, out, _ = await run_bot(["logs", "--json", "-n", "10"], env)
    assert code == 0
    records = [json.loads(line) for line in out.splitlines()]
    fields = {"timestamp", "platform", "user_id", "chat_id", "conversation", "provider",
              "model", "user_input", "model_response", "status", "error", "response_time",
              "first_token_time", "prompt_tokens", "completion_tokens", "history_messages"}
    assert all(fields <= set(r) for r in records)
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "rejected"]
    assert records[0]["user_input"] == "my name is Ana"
    assert records[0]["timestamp"].endswith("Z")
    assert records[1]["history_messages"] == 2

    code, out, _ = await run_bot(["logs", "-n", "1"], env)
    assert code == 0 and "rejected" in out
    code, out, _ = await run_bot(["stats"], env)
    assert code == 0 and "ollama/llama3.2" in out and "ollama/qwen2.5" in out

    # `forget` erases that user, on the same database: nothing left to show.
    code, out, err = await run_bot(["forget", f"console:{records[0]['user_id']}"], env)
    assert code == 0, err
    # The exchange after /reset (the earlier ones went with it), /model's choice, and
    # all four audit records, the refused one included.
    for table in ("messages 2,", "conversations 1,", "user_settings 1,", "audit 4,"):
        assert table in out, out
    code, out, _ = await run_bot(["logs", "--json"], env)
    assert code == 0 and out == ""
    code, out, err = await run_bot(["forget", "nonsense"], env)
    assert code == 2 and "PLATFORM:USER_ID" in err


async def test_bad_setting_stops_startup_with_one_line(tmp_path: Path,
                                                       model_server: ModelServer) -> None:
    for name, value, allowed in [
        ("CONTEXT_TOKENS", "abc", "integer"),
        ("LLM_PROVIDER", "foo", "'ollama', 'openai' or 'local'"),
        ("REPLY_TOKENS", "5000", "must be less than CONTEXT_TOKENS"),
    ]:
        code, _out, err = await run_bot(["console"], bot_env(tmp_path, model_server,
                                                            **{name: value}))
        assert code == 2
        assert len(err.strip().splitlines()) == 1, err
        assert name in err and value in err and allowed in err
        assert "Traceback" not in err


async def test_env_file_is_read_and_environment_wins(tmp_path: Path,
                                                     model_server: ModelServer) -> None:
    (tmp_path / ".env").write_text("LLM_MODEL=qwen2.5\nSYSTEM_PROMPT=from dotenv\n")
    env = bot_env(tmp_path, model_server, SYSTEM_PROMPT="from environment")
    code, _, err = await run_bot(["console"], env, "hi\n", cwd=tmp_path)
    assert code == 0, err
    req = model_server.requests[-1]
    assert req.model == "qwen2.5"
    assert req.messages[0]["content"] == "from environment"


async def test_help_lists_commands_and_every_setting_without_secrets(
    tmp_path: Path, model_server: ModelServer
) -> None:
    from bot.settings import Settings

    env = bot_env(tmp_path, model_server, TELEGRAM_TOKEN="123:SECRET-TOKEN-VALUE",
                  OPENAI_API_KEY="sk-secret-key-value")
    code, out, _ = await run_bot(["--help"], env)
    assert code == 0
    for command in ("console", "logs", "stats", "forget", "migrate", "copy-db"):
        assert command in out
    for name in Settings.model_fields:
        assert name in out
    assert "SECRET-TOKEN-VALUE" not in out and "sk-secret-key-value" not in out


def test_env_example_lists_every_setting_with_its_default() -> None:
    from bot.settings import Settings

    example = (ROOT / ".env.example").read_text()
    lines = dict(
        line.lstrip("# ").split("=", 1) for line in example.splitlines()
        if "=" in line and line.lstrip("# ")[:1].isupper()
    )
    for name, field in Settings.model_fields.items():
        assert name in lines, name
        default = field.default
        if default is not None and name != "SYSTEM_PROMPT":
            assert lines[name] == str(default), name


async def test_migrate_command(tmp_path: Path, model_server: ModelServer) -> None:
    code, out, err = await run_bot(["migrate"], bot_env(tmp_path, model_server))
    assert code == 0, err
    # The newest step, whichever it is: the list grows at its end.
    assert f"at migration {MIGRATIONS[-1].name} ({len(MIGRATIONS)} applied)" in out


async def test_env_example_copied_to_env_runs_the_console(tmp_path: Path,
                                                          model_server: ModelServer) -> None:
    """Empty values in .env mean unset: no adapter starts with an empty token."""
    text = (ROOT / ".env.example").read_text()
    lines = [ln for ln in text.splitlines()
             if not ln.startswith(("OLLAMA_HOST=", "DATABASE_URL="))]
    (tmp_path / ".env").write_text("\n".join(lines))
    code, out, err = await run_bot(["console"], bot_env(tmp_path, model_server), "hi\n",
                                   cwd=tmp_path)
    assert code == 0, err
    assert out == "You said: hi\n"
    # A server that answers gets no "how to get a model" hint (test_local_provider.py).
    assert not set(NO_SERVER_HINT.splitlines()) & set(err.splitlines()), err


async def test_chinese_through_the_console_with_json_logs_one_line_per_exchange(
    tmp_path: Path, model_server: ModelServer
) -> None:
    # One process for both: what the user sees on stdout, the JSON log on stderr.
    env = bot_env(tmp_path, model_server, LOG_FORMAT="json")
    code, out, err = await run_bot(["console"], env, "我叫小明\n我叫什麼名字？\n")
    assert code == 0, err
    first, second = out.splitlines()
    assert first == "You said: 我叫小明"
    assert "小明" in second.split("You said:")[1]  # remembered, in Chinese
    lines = [json.loads(line) for line in err.splitlines()]  # every line is JSON
    exchanges = [r for r in lines if r["logger"] == "bot.exchange"]
    assert [r["user_input"] for r in exchanges] == ["我叫小明", "我叫什麼名字？"]
    # Each record holds the reply as the user saw it.
    assert [r["model_response"] for r in exchanges] == [first, second]
    for r in exchanges:
        assert r["session"] == r["conversation"]
        assert r["timestamp"] and r["response_time"] > 0
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
