"""Personas: loading and strict validation, Modelfiles, provider mapping, defaults, reload."""

from __future__ import annotations

import logging
from pathlib import Path

import ollama
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.personas import (
    PersonaBook,
    PersonaError,
    load_personas,
    ollama_options,
    openai_fields,
    parse_modelfile,
    parse_persona_defaults,
    reply_tokens,
)
from bot.settings import SettingsError, load_settings
from tests.fakes.model_server import ModelServer

FIXTURES = Path(__file__).parent / "fixtures" / "personas"
TEACHER_SYSTEM = "你是一位專業的老師，擅長用淺顯例子解釋複雜概念。"


def write(tmp_path: Path, text: str, name: str = "personas.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def one_line_error(path: Path) -> str:
    with pytest.raises(PersonaError) as info:
        load_personas(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ the seed's example


def test_the_seeds_traditional_chinese_modelfile_works_unchanged(
        caplog: pytest.LogCaptureFixture) -> None:
    """The Modelfile from the seed notes: inline comments, triple-quoted SYSTEM, MESSAGE."""
    with caplog.at_level(logging.WARNING, logger="bot.personas"):
        personas = load_personas(FIXTURES / "personas.toml")
    assert [r.getMessage() for r in caplog.records] == [
        f"{FIXTURES / 'teacher.Modelfile'} line 20: MESSAGE without a role (system, user or "
        "assistant); skipped"]
    teacher = personas.get("teacher")
    assert teacher is not None
    assert teacher.system == TEACHER_SYSTEM
    assert teacher.model == "llama3.2:latest"
    # `PARAMETER temperature 0.3 # 創意程度`: the trailing comment is not the value.
    assert dict(teacher.parameters) == {
        "temperature": 0.3, "top_p": 0.9, "num_predict": 1024, "repeat_penalty": 1.2}
    # `MESSAGE "..."` has no role: skipped, not kept as an example.
    assert teacher.messages == ()
    assert teacher.description == "用淺顯例子解釋複雜概念的老師"


def test_toml_keys_override_the_modelfile(tmp_path: Path) -> None:
    (tmp_path / "teacher.Modelfile").write_text(
        (FIXTURES / "teacher.Modelfile").read_text(encoding="utf-8"), encoding="utf-8")
    path = write(tmp_path, '[teacher]\nmodelfile = "teacher.Modelfile"\n'
                           'model = "qwen2.5"\ntemperature = 0.7\nsystem = "Be brief."\n')
    teacher = load_personas(path).get("TEACHER")  # names compare ignoring case
    assert teacher is not None
    assert teacher.model == "qwen2.5"
    assert teacher.system == "Be brief."
    assert teacher.parameters["temperature"] == 0.7
    assert teacher.parameters["num_predict"] == 1024  # still from the Modelfile


def test_modelfile_syntax_like_ollamas() -> None:
    parsed = parse_modelfile(
        'from llama3.2\n'
        'parameter stop "<|eot_id|>"\n'
        'PARAMETER stop "User:" # a comment after the quotes\n'
        'PARAMETER stop "He said "hi""\n'
        'PARAMETER\tseed 42\n'
        'SYSTEM first\n'
        'SYSTEM """Line one\n'
        'Line "two" # not a comment\n'
        '"""\n'
        'TEMPLATE """{{ .System }}\n{{ .Prompt }}"""\n'
        'MESSAGE user Is Toronto in Canada?\n'
        'MESSAGE assistant yes\n'
        'LICENSE """\nMIT\n"""\n'
        'ADAPTER ./lora.gguf\n'
        'PARAMETER mirostat 2\n')
    assert parsed.model == "llama3.2"
    assert parsed.system == 'Line one\nLine "two" # not a comment'  # the last SYSTEM wins
    assert parsed.parameters == {"stop": ["<|eot_id|>", "User:", 'He said "hi"'], "seed": 42}
    assert parsed.messages == (("user", "Is Toronto in Canada?"), ("assistant", "yes"))


def test_modelfile_messages_become_examples(tmp_path: Path) -> None:
    (tmp_path / "geo.Modelfile").write_text(
        "FROM llama3.2\nSYSTEM Answer yes or no.\nMESSAGE user Is Paris in France?\n"
        "MESSAGE assistant yes\n", encoding="utf-8")
    persona = load_personas(write(tmp_path, '[geo]\nmodelfile = "geo.Modelfile"\n')).get("geo")
    assert persona is not None
    assert persona.example_messages() == [
        {"role": "user", "content": "Is Paris in France?"},
        {"role": "assistant", "content": "yes"}]


@pytest.mark.parametrize(("modelfile", "expected"), [
    ("FROM x\nPARAMETER temperature warm\n", "line 2: PARAMETER temperature 'warm' is not a"),
    ("FROM x\nPARAMETER num_predict 1.5\n", "line 2: PARAMETER num_predict '1.5' is not a"),
    ("FROM x\nPARAMETER colour 3\n", "line 2: unknown PARAMETER 'colour'"),
    ("FROM x\nSHOUT loud\n", "line 2: unknown instruction 'SHOUT'"),
    ('FROM x\nSYSTEM """never closed\n', 'line 2: """ is never closed'),
    ("FROM x\nPARAMETER top_p 1.5\n", "field 'top_p' (from m.Modelfile): 1.5: Input should be"),
    ("FROM ./weights.gguf\nSYSTEM hi\n", "is a file (./weights.gguf)"),
])
def test_a_bad_modelfile_is_one_line_naming_file_persona_and_line(
        tmp_path: Path, modelfile: str, expected: str) -> None:
    (tmp_path / "m.Modelfile").write_text(modelfile, encoding="utf-8")
    path = write(tmp_path, '[tutor]\nmodelfile = "m.Modelfile"\nsystem = "s"\n'
                 if "SYSTEM" not in modelfile else '[tutor]\nmodelfile = "m.Modelfile"\n')
    message = one_line_error(path)
    assert message.startswith(f"{path}: persona 'tutor': field '")
    assert "m.Modelfile" in message and expected in message


def test_a_missing_modelfile_names_it(tmp_path: Path) -> None:
    path = write(tmp_path, '[tutor]\nmodelfile = "gone.Modelfile"\n')
    assert one_line_error(path) == (
        f"{path}: persona 'tutor': field 'modelfile': gone.Modelfile: no such file")


# ------------------------------------------------------------------ bad TOML files


@pytest.mark.parametrize(("toml", "expected"), [
    ('[coach]\nsystem = "s"\ntemprature = 0.5\n',
     "persona 'coach': field 'temprature': unknown field; allowed: description, system"),
    ('[coach]\nsystem = "s"\ntemperature = "hot"\n',
     "persona 'coach': field 'temperature': 'hot': Input should be a valid number"),
    ('[coach]\nsystem = "s"\nnum_predict = 10.5\n',
     "persona 'coach': field 'num_predict': 10.5: Input should be a valid integer"),
    ('[coach]\nsystem = "s"\nseed = true\n',
     "persona 'coach': field 'seed': True: Input should be a valid integer"),
    ('[coach]\nsystem = "s"\nstop = [1]\n',
     "persona 'coach': field 'stop': 1: Input should be a valid string"),
    ('[coach]\nsystem = "s"\ntop_p = 2\n',
     "persona 'coach': field 'top_p': 2: Input should be less than or equal to 1"),
    ('[coach]\nsystem = "s"\nnum_predict = 0\n',
     "persona 'coach': field 'num_predict': 0: must be at least 1"),
    ('[coach]\ndescription = "no prompt"\n',
     "persona 'coach': field 'system': missing"),
    ('[off]\nsystem = "s"\n', "persona 'off': the name must be"),
    ('[Coach]\nsystem = "a"\n[coach]\nsystem = "b"\n',
     "persona 'coach': the same name as 'Coach'"),
    ('coach = "s"\n', "'coach' is not a persona table"),
    ('', "no personas in the file"),
    ('[coach\nsystem = "s"\n', "not valid TOML: "),
])
def test_a_bad_file_is_one_line_naming_file_persona_and_field(
        tmp_path: Path, toml: str, expected: str) -> None:
    path = write(tmp_path, toml)
    message = one_line_error(path)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_a_missing_file_names_it(tmp_path: Path) -> None:
    assert one_line_error(tmp_path / "nope.toml") == f"{tmp_path / 'nope.toml'}: no such file"


def test_a_bad_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[coach]\nsystem = "s"\ntemperature = "hot"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(env_file=None, PERSONAS_FILE=str(path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("bad setting PERSONAS_FILE=")
    assert f"{path}: persona 'coach': field 'temperature'" in message


def test_good_settings_load_and_defaults_are_checked_against_the_file(tmp_path: Path) -> None:
    settings = load_settings(env_file=None, PERSONAS_FILE=str(FIXTURES / "personas.toml"),
                             PERSONA_DEFAULTS="discord:42=teacher")
    assert settings.PERSONAS_FILE.endswith("personas.toml")
    with pytest.raises(SettingsError) as info:
        load_settings(env_file=None, PERSONAS_FILE=str(FIXTURES / "personas.toml"),
                      PERSONA_DEFAULTS="discord:42=pirate")
    assert "PERSONA_DEFAULTS: 'discord:42=pirate': no persona 'pirate'" in str(info.value)
    with pytest.raises(SettingsError) as info:
        load_settings(env_file=None, PERSONA_DEFAULTS="discord:42=teacher")
    assert "PERSONA_DEFAULTS needs PERSONAS_FILE" in str(info.value)


# ------------------------------------------------------------------ provider mapping


async def test_ollama_gets_every_parameter_in_options(model_server: ModelServer) -> None:
    teacher = load_personas(FIXTURES / "personas.toml").get("teacher")
    options = ollama_options(teacher, num_ctx=2048, num_predict=teacher.reply_tokens(512, 900))
    client = ollama.AsyncClient(host=model_server.url)
    reply = await client.chat(model="llama3.2", messages=[
        {"role": "system", "content": teacher.system}, {"role": "user", "content": "hi"}],
        options=options)
    assert reply.message.content  # the stand-in answered
    sent = model_server.requests[-1]
    assert sent.options == {"temperature": 0.3, "top_p": 0.9, "num_predict": 900,
                            "repeat_penalty": 1.2, "num_ctx": 2048}
    assert sent.messages[0] == {"role": "system", "content": TEACHER_SYSTEM}


async def test_openai_gets_only_the_fields_it_has(model_server: ModelServer) -> None:
    personas = load_personas(FIXTURES / "personas.toml")
    coach = personas.get("coach")
    assert coach is not None
    fields = openai_fields(coach, max_tokens=coach.reply_tokens(512, 10_000))
    client = openai.AsyncOpenAI(base_url=model_server.url + "/v1", api_key="k", max_retries=0)
    try:
        reply = await client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], **fields)
    finally:
        await client.close()
    assert reply.choices[0].message.content
    body = model_server.requests[-1].body
    sent = {k: v for k, v in body.items() if k not in ("model", "messages")}
    # repeat_penalty, top_k and min_p have no OpenAI field: not sent (see OPENAI_UNSUPPORTED).
    assert sent == {"temperature": 0.6, "top_p": 0.95, "seed": 7,
                    "stop": ["Student:", "\n\n\n"], "max_tokens": 300}


def test_openai_reasoning_models_take_max_completion_tokens() -> None:
    fields = openai_fields(None, max_tokens=200, token_field="max_completion_tokens")
    assert fields == {"max_completion_tokens": 200}


def test_no_persona_sends_only_the_window() -> None:
    assert ollama_options(None, num_ctx=4096, num_predict=512) == {
        "num_ctx": 4096, "num_predict": 512}


def test_a_personas_num_ctx_only_lowers_the_window(tmp_path: Path) -> None:
    personas = load_personas(write(tmp_path, '[a]\nsystem = "s"\nnum_ctx = 1024\n'
                                             '[b]\nsystem = "s"\nnum_ctx = 99999\n'))
    assert ollama_options(personas.get("a"), num_ctx=4096, num_predict=100)["num_ctx"] == 1024
    assert ollama_options(personas.get("b"), num_ctx=4096, num_predict=100)["num_ctx"] == 4096


@settings(deadline=None)  # a loaded machine must not fail a pure function
@given(num_predict=st.one_of(st.none(), st.integers(min_value=-2, max_value=10**7)),
       default=st.integers(min_value=1, max_value=10**6),
       available=st.integers(min_value=1, max_value=10**6))
def test_the_reply_limit_never_exceeds_what_the_window_leaves(
        num_predict: int | None, default: int, available: int) -> None:
    if num_predict == 0:
        return
    limit = reply_tokens(num_predict, default, available)
    assert 1 <= limit <= available
    wanted = default if num_predict is None else num_predict
    if 0 < wanted <= available:
        assert limit == wanted
    else:  # unlimited (-1), fill (-2), or more than fits: all that fits
        assert limit == available


# ------------------------------------------------------------------ PERSONA_DEFAULTS


def test_persona_defaults_parse() -> None:
    personas = load_personas(FIXTURES / "personas.toml")
    assert parse_persona_defaults(" discord:123=Teacher , telegram:-100456=coach,", personas) \
        == {("discord", "123"): "teacher", ("telegram", "-100456"): "coach"}
    assert parse_persona_defaults("") == {}


@pytest.mark.parametrize(("value", "expected"), [
    ("discord:123", "'discord:123' is not platform:place=persona"),
    ("slack:1=teacher", "'slack:1=teacher' is not platform:place=persona"),
    ("discord:=teacher", "is not platform:place=persona"),
    ("discord:1=teacher,discord:1=coach", "discord:1 is given twice"),
    ("telegram:5=pirate", "no persona 'pirate'"),
])
def test_bad_persona_defaults_are_one_line(value: str, expected: str) -> None:
    with pytest.raises(PersonaError) as info:
        parse_persona_defaults(value, load_personas(FIXTURES / "personas.toml"))
    assert str(info.value).startswith("PERSONA_DEFAULTS: ")
    assert expected in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ reload


async def test_reload_swaps_in_the_new_file_and_a_bad_edit_keeps_the_old(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, '[coach]\nsystem = "old"\n[poet]\nsystem = "p"\n')
    book = PersonaBook(path, "telegram:-1=poet")
    assert book.get("coach").system == "old"
    assert book.default_for("telegram", "-1").name == "poet"
    assert book.default_for("telegram", None) is None

    write(tmp_path, '[coach]\nsystem = "new"\ntemperature = 0.2\n[poet]\nsystem = "p2"\n')
    assert await book.reload_async() is True
    assert book.get("coach").system == "new"
    assert book.get("coach").parameters["temperature"] == 0.2
    assert book.default_for("telegram", "-1").system == "p2"

    before = book.current
    write(tmp_path, '[coach]\nsystem = "broken"\ntemperature = "hot"\n[poet]\nsystem = "p"\n')
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="bot.personas"):
        assert await book.reload_async() is False
    assert book.current is before and book.get("coach").system == "new"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith("personas not reloaded, keeping the 2 loaded: ")
    assert "persona 'coach': field 'temperature'" in errors[0]

    # A file that drops a persona a default names is refused too.
    write(tmp_path, '[coach]\nsystem = "c"\n')
    assert book.reload() is False and book.get("poet") is not None

    path.unlink()
    assert book.reload() is False and book.get("coach").system == "new"


def test_no_file_no_personas() -> None:
    book = PersonaBook(None)
    assert len(book.current) == 0 and book.get("teacher") is None and book.reload() is False
