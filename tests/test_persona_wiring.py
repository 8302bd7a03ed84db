"""/persona end to end: what reaches the model server per provider, per user, across restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bot.app import open_service, reload_on_sighup
from bot.personas import PersonaError
from bot.reply import Kind
from tests.conftest import SettingsFactory, ask, incoming
from tests.fakes.model_server import ModelServer

FIXTURES = Path(__file__).parent / "fixtures" / "personas"
TEACHER_SYSTEM = "你是一位專業的老師，擅長用淺顯例子解釋複雜概念。"
COACH_SYSTEM = "You are a patient study coach. Ask one question at a time."
PROVIDERS = ["ollama", "openai"]


def personas_file(tmp_path: Path) -> Path:
    """The fixture file (a Modelfile persona and a TOML one) copied where a test may edit it."""
    for name in ("personas.toml", "teacher.Modelfile"):
        (tmp_path / name).write_text((FIXTURES / name).read_text(encoding="utf-8"),
                                     encoding="utf-8")
    return tmp_path / "personas.toml"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_personas_system_and_parameters_reach_the_server_exactly(
        provider: str, tmp_path: Path, model_server: ModelServer,
        make_settings: SettingsFactory) -> None:
    settings = make_settings(LLM_PROVIDER=provider, PERSONAS_FILE=str(personas_file(tmp_path)),
                             CONTEXT_TOKENS=4096, REPLY_TOKENS=200)
    async with open_service(settings) as svc:
        assert "now uses the persona `coach`" in await ask(svc, "/persona coach")
        await ask(svc, "hello coach")
        await ask(svc, "hello bot", user="2")  # another user: no persona
        rows = await svc.store.audit_log(10)
    mine, other = model_server.requests[-2:]
    assert mine.messages[0] == {"role": "system", "content": COACH_SYSTEM}
    assert mine.messages[-1] == {"role": "user", "content": "hello coach"}
    assert other.messages[0]["content"] == settings.SYSTEM_PROMPT
    if provider == "ollama":
        assert mine.options == {
            "temperature": 0.6, "top_p": 0.95, "top_k": 30, "min_p": 0.05, "seed": 7,
            "stop": ["Student:", "\n\n\n"], "repeat_penalty": 1.1,
            "num_ctx": 4096, "num_predict": 300}
        assert other.options == {"num_ctx": 4096, "num_predict": 200}
    else:
        sent = {k: v for k, v in mine.body.items() if k not in ("model", "messages", "stream",
                                                                "stream_options")}
        # Only the fields OpenAI's API has; top_k, min_p, repeat_penalty are left out.
        assert sent == {"temperature": 0.6, "top_p": 0.95, "seed": 7,
                        "stop": ["Student:", "\n\n\n"], "max_tokens": 300}
        assert "temperature" not in other.body and other.body["max_tokens"] == 200
    assert [(r["user_id"], r["persona"], r["status"]) for r in rows] == [
        ("1", "coach", "ok"), ("2", "", "ok")]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_modelfile_persona_survives_a_restart_and_off_returns_to_the_default(
        provider: str, tmp_path: Path, model_server: ModelServer,
        make_settings: SettingsFactory) -> None:
    settings = make_settings(LLM_PROVIDER=provider, PERSONAS_FILE=str(personas_file(tmp_path)),
                             LLM_MODEL="qwen2.5")
    async with open_service(settings) as svc:
        listing = await svc.handle(incoming("/persona"))
        text = await listing.text()
        assert "`teacher`: 用淺顯例子解釋複雜概念的老師" in text
        assert listing.choices is not None and listing.choices.command == "persona"
        assert [c.key for c in listing.choices.options] == ["teacher", "coach", "off"]
        await ask(svc, "/persona teacher")
    async with open_service(settings) as svc:  # a new process on the same database
        await ask(svc, "什麼是光合作用？")
        picked = await svc.choices("persona", incoming("/persona"))
        assert picked is not None and picked.current is not None
        assert picked.current.key == "teacher"
        assert "back to the default" in await ask(svc, "/persona off")
        await ask(svc, "and now?")
        rows = await svc.store.audit_log(10)
    teacher, plain = model_server.requests[-2:]
    # The Modelfile's FROM llama3.2:latest, resolved through the catalog.
    assert teacher.model == "llama3.2" and plain.model == "qwen2.5"
    assert teacher.messages[0] == {"role": "system", "content": TEACHER_SYSTEM}
    assert plain.messages[0]["content"] == settings.SYSTEM_PROMPT
    if provider == "ollama":
        assert teacher.options["temperature"] == 0.3
        assert teacher.options["repeat_penalty"] == 1.2
        assert teacher.options["num_predict"] == 1024
        assert "temperature" not in plain.options
    else:
        assert teacher.body["temperature"] == 0.3 and "repeat_penalty" not in teacher.body
        assert teacher.body["max_tokens"] == 1024
    assert [r["persona"] for r in rows] == ["teacher", ""]


async def test_num_predict_never_exceeds_what_the_window_leaves(
        tmp_path: Path, model_server: ModelServer, make_settings: SettingsFactory) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[long]\nsystem = "Write at length."\nnum_predict = 100000\n'
                    '[all]\nsystem = "Fill it."\nnum_predict = -1\n', encoding="utf-8")
    model_server.context_lengths = {"llama3.2": 2048}
    settings = make_settings(PERSONAS_FILE=str(path), CONTEXT_TOKENS=8192)
    async with open_service(settings) as svc:
        await ask(svc, "/persona long")
        await ask(svc, "go")
        await ask(svc, "/persona all")
        await ask(svc, "go")
    for req in model_server.requests[-2:]:
        assert req.options["num_ctx"] == 2048
        assert req.prompt_tokens + req.options["num_predict"] <= 2048
        assert req.options["num_predict"] >= 1024  # what the window leaves, not REPLY_TOKENS


async def test_modelfile_messages_go_into_the_prompt(
        tmp_path: Path, model_server: ModelServer, make_settings: SettingsFactory) -> None:
    (tmp_path / "pirate.Modelfile").write_text(
        'FROM llama3.2\nSYSTEM "Talk like a pirate."\nPARAMETER temperature 0.9\n'
        'MESSAGE user Hello\nMESSAGE assistant "Ahoy, matey!"\n', encoding="utf-8")
    path = tmp_path / "p.toml"
    path.write_text('[pirate]\nmodelfile = "pirate.Modelfile"\n', encoding="utf-8")
    async with open_service(make_settings(PERSONAS_FILE=str(path))) as svc:
        await ask(svc, "/persona pirate")
        await ask(svc, "where is the gold?")
        await ask(svc, "and the map?")
    req = model_server.requests[-1]
    assert req.messages[:3] == [
        {"role": "system", "content": "Talk like a pirate."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Ahoy, matey!"}]
    assert req.messages[3] == {"role": "user", "content": "where is the gold?"}
    assert req.messages[-1] == {"role": "user", "content": "and the map?"}
    assert req.options["temperature"] == 0.9


async def test_place_defaults_from_the_operator_and_from_the_places_admins(
        tmp_path: Path, model_server: ModelServer, make_settings: SettingsFactory) -> None:
    settings = make_settings(PERSONAS_FILE=str(personas_file(tmp_path)),
                             PERSONA_DEFAULTS="telegram:-100=coach")

    async def yes() -> bool:
        return True

    async def no() -> bool:
        return False

    async with open_service(settings) as svc:
        await ask(svc, "hi", user="5", place="-100", platform="telegram")
        assert model_server.requests[-1].messages[0]["content"] == COACH_SYSTEM
        # A member who is not an admin can't set the group's default.
        member = replace(incoming("/persona teacher default", user="6", place="-200",
                                  platform="telegram"), place_admin=no)
        refused = await svc.handle(member)
        assert refused.kind is Kind.REFUSAL and "admins" in await refused.text()
        assert await svc.store.personas_of("x", "telegram", "-200") == (None, None)
        admin = replace(member, user_id="7", place_admin=yes)
        assert "default persona here" in await (await svc.handle(admin)).text()
        assert await svc.store.personas_of("x", "telegram", "-200") == (None, "teacher")
        await ask(svc, "hi", user="8", place="-200", platform="telegram")
        assert model_server.requests[-1].messages[0]["content"] == TEACHER_SYSTEM
        # In a DM there is no place to set a default for.
        dm = await svc.handle(replace(incoming("/persona coach default"), place_admin=yes))
        assert dm.kind is Kind.REFUSAL
        # A user's own pick wins over the place's default.
        await ask(svc, "/persona coach", user="8", place="-200", platform="telegram")
        await ask(svc, "hi again", user="8", place="-200", platform="telegram")
        assert model_server.requests[-1].messages[0]["content"] == COACH_SYSTEM


async def test_unknown_persona_gets_the_list_not_a_change(
        tmp_path: Path, model_server: ModelServer, make_settings: SettingsFactory) -> None:
    async with open_service(make_settings(PERSONAS_FILE=str(personas_file(tmp_path)))) as svc:
        reply = await svc.handle(incoming("/persona nobody"))
        assert reply.kind is Kind.REFUSAL
        assert "`teacher`, `coach`" in await reply.text()
        assert await svc.store.personas_of("console:1@dm", "console", None) == (None, None)


async def test_sighup_reloads_the_file_and_a_bad_edit_keeps_the_old(
        tmp_path: Path, model_server: ModelServer, make_settings: SettingsFactory) -> None:
    path = personas_file(tmp_path)
    async with open_service(make_settings(PERSONAS_FILE=str(path))) as svc:
        with reload_on_sighup(svc) as reloads:
            await ask(svc, "/persona coach")
            path.write_text('[coach]\nsystem = "You are a strict coach."\n', encoding="utf-8")
            os.kill(os.getpid(), signal.SIGHUP)
            async with asyncio.timeout(5):
                assert await reloads.next() is True
            await ask(svc, "hi")
            assert model_server.requests[-1].messages[0]["content"] == "You are a strict coach."
            path.write_text('[coach]\nsystem = "x"\ntemperature = "hot"\n', encoding="utf-8")
            os.kill(os.getpid(), signal.SIGHUP)
            async with asyncio.timeout(5):
                assert await reloads.next() is False
            await ask(svc, "hi")
            assert model_server.requests[-1].messages[0]["content"] == "You are a strict coach."


async def test_a_file_broken_after_the_settings_check_stops_the_service(
        tmp_path: Path, make_settings: SettingsFactory) -> None:
    path = personas_file(tmp_path)
    settings = make_settings(PERSONAS_FILE=str(path))
    path.write_text("[coach]\nsystem = 'x'\nwarmth = 3\n", encoding="utf-8")
    with pytest.raises(PersonaError) as info:
        async with open_service(settings):
            pass
    assert "\n" not in str(info.value) and "'coach'" in str(info.value)
    assert "'warmth'" in str(info.value)


@pytest.mark.parametrize(("content", "expected"), [
    ("[coach]\nsystem = 'x'\nwarmth = 3\n", "field 'warmth': unknown field"),
    ("[coach]\nsystem = 'x'\ntemperature = 'hot'\n", "field 'temperature': 'hot'"),
    (None, "no such file"),
])
def test_bad_files_stop_start_up_with_one_line(tmp_path: Path, content: str | None,
                                               expected: str) -> None:
    path = tmp_path / "personas.toml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM", "DISCORD"))}
    env.update(PERSONAS_FILE=str(path), DATABASE_URL=f"sqlite:///{tmp_path / 'bot.db'}")
    done = subprocess.run([sys.executable, "-m", "bot", "console"], input="", env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          check=False)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bad setting PERSONAS_FILE=")
    assert str(path) in lines[0] and expected in lines[0]


async def test_console_lists_personas_as_numbered_lines_and_help_lists_the_commands(
        tmp_path: Path, model_server: ModelServer) -> None:
    from tests.test_console import bot_env, run_bot

    env = bot_env(tmp_path, model_server, PERSONAS_FILE=str(personas_file(tmp_path)))
    code, out, err = await run_bot(["console"], env, "/help\n/persona\n2\nhello\n")
    assert code == 0, err
    assert "/persona — List the personas" in out and "/stop — Stop the reply" in out
    assert "  1. teacher: 用淺顯例子解釋複雜概念的老師\n  2. coach: a patient study coach\n" \
        "  3. off (the default)\n" in out
    assert "Done: this conversation now uses the persona `coach`." in out
    assert model_server.requests[-1].messages[0] == {"role": "system", "content": COACH_SYSTEM}
    code, out, _ = await run_bot(["logs", "--json", "-n", "1"], env)
    assert '"persona": "coach"' in out
