"""Commands declared once: a new one reaches every platform's menu with no adapter change."""

from __future__ import annotations

import asyncio
import io

import pytest

from adapters.console import ConsoleAdapter
from adapters.discord.testing import ALICE, StartBot
from bot.app import open_service
from bot.commands import Arg, Command, Commands, command, help_text, parse_command
from bot.messages import Incoming
from bot.reply import Kind, Outcome, Reply
from bot.service import ChatService
from tests.conftest import SettingsFactory, incoming
from tests.fakes.discord_api import DiscordEmulator
from tests.fakes.model_server import ModelServer
from tests.fakes.telegram_api import TelegramApiEmulator

PING_CALLS: list[tuple[str, str]] = []


async def ping(service: ChatService, msg: Incoming, args: str) -> Reply:
    PING_CALLS.append((msg.user_key, args))
    return Reply.notice(f"pong {args}".strip())


# The fixture's whole declaration: one entry plus its handler.
PING = Command("ping", "Check that the bot answers", ping,
               args=(Arg("text", "what to echo"),), private=True)


def with_ping(service: ChatService) -> ChatService:
    service.commands = service.commands.adding(PING)
    return service


@pytest.fixture(autouse=True)
def _forget_pings() -> None:
    PING_CALLS.clear()


async def test_ping_is_in_telegrams_menu(tg: TelegramApiEmulator, tg_settings: SettingsFactory,
                                         model_server: ModelServer) -> None:
    settings = tg_settings()
    async with open_service(settings) as service:
        with_ping(service)
        # telegram_bot opens its own service; run the adapter on this one instead.
        from adapters.telegram.adapter import TelegramAdapter

        adapter = TelegramAdapter(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(adapter.run(service, stop))
        try:
            await tg.wait_for(lambda: bool(tg.calls("getUpdates")), 10, "polling")
            assert adapter.connected
            menu = [(c["command"], c["description"]) for c in tg.commands()]
            assert menu[-1] == ("ping", "Check that the bot answers")
            assert [name for name, _ in menu] == [
                "start", "help", "reset", "model", "memory", "remember", "forget", "stats",
                "language", "persona", "stop", "ping"]
            tg.user_says(1001, "/ping hello")
            await tg.wait_for(lambda: len(tg.bot_messages(1001)) == 1)
            assert tg.bot_texts(1001) == ["pong hello"]
        finally:
            stop.set()
            await service.shutdown(settings.SHUTDOWN_GRACE)
            await asyncio.wait_for(task, settings.SHUTDOWN_GRACE + 10)
    assert not adapter.connected
    assert PING_CALLS == [("telegram:1001", "hello")]
    assert model_server.requests == []  # a command never reaches the model


async def test_ping_is_synced_to_discord_and_its_answer_is_ephemeral(
        discord_api: DiscordEmulator, run_bot: StartBot, model_server: ModelServer) -> None:
    bot = await run_bot(wrap=with_ping)
    assert bot.adapter.client is not None
    async with asyncio.timeout(5):
        await bot.adapter.client.wait_until_ready()
    assert bot.adapter.connected
    await discord_api.wait_for(lambda: "ping" in discord_api.commands_synced())
    synced = {c["name"]: c for c in discord_api.commands.get(None, [])}
    assert list(synced) == ["help", "reset", "model", "memory", "remember", "forget", "stats",
                            "language", "persona", "stop", "ping"]
    assert synced["ping"]["description"] == "Check that the bot answers"
    [option] = synced["ping"]["options"]
    assert option["name"] == "text" and not option.get("required", False)
    assert not option.get("autocomplete", False)  # it offers no choices
    assert synced["model"]["options"][0]["autocomplete"] is True

    pong = await discord_api.slash(ALICE, "ping", {"text": "hi"})
    await discord_api.wait_for(lambda: pong.answered)
    assert pong.texts == ["pong hi"]
    assert all(m.ephemeral and m.visible_to == ALICE for m in pong.messages)
    assert PING_CALLS == [(f"discord:{ALICE}", "hi")]
    assert model_server.requests == []
    await bot.stop()
    assert not bot.adapter.connected


async def test_ping_is_in_the_consoles_help(make_settings: SettingsFactory,
                                            model_server: ModelServer) -> None:
    settings = make_settings()
    out = io.StringIO()
    async with open_service(settings) as service:
        adapter = ConsoleAdapter(settings, stdin=io.StringIO("/help\n/ping there\n"),
                                 stdout=out, user_id="ana")
        async with asyncio.timeout(10):
            await adapter.run(with_ping(service), asyncio.Event())
    shown = out.getvalue()
    assert "/ping — Check that the bot answers" in shown.splitlines()
    assert shown.rstrip().endswith("pong there")
    assert PING_CALLS == [("console:ana", "there")]


# -- the declaration itself


def test_declared_commands_and_their_flags() -> None:
    commands = Commands.of(ChatService)
    assert [c.name for c in commands.menu("telegram")] == [
        "start", "help", "reset", "model", "memory", "remember", "forget", "stats", "language",
        "persona", "stop"]
    assert [c.name for c in commands.menu("discord")] == [
        "help", "reset", "model", "memory", "remember", "forget", "stats", "language",
        "persona", "stop"]
    assert {c.name for c in commands if c.private} == {
        "reset", "model", "memory", "remember", "forget", "stats", "language", "persona"}
    assert [c.name for c in commands if c.admin] == ["stats"]
    assert commands.names == {"start", "help", "reset", "model", "memory", "remember",
                              "forget", "stats", "language", "persona", "stop"}
    text = help_text("llama3.2", commands)
    assert "/start" not in text and "/stats — Usage figures (admins only)" in text
    with pytest.raises(ValueError, match="twice"):
        commands.adding(PING, PING)


def test_a_subclass_declares_a_command_with_the_decorator() -> None:
    class Pinging(ChatService):
        @command("ping", "Check that the bot answers", private=True)
        async def _ping(self, msg: Incoming, args: str) -> Reply:
            return Reply.notice("pong")

    commands = Commands.of(Pinging)
    assert [c.name for c in commands][-1] == "ping" and commands.private("ping")
    assert "help" in commands  # the base's commands stay


@pytest.mark.parametrize(("text", "parsed"), [
    ("/ping", ("ping", "")), ("/Ping@my_bot a b", ("ping", "a b")),
    ("/model\nqwen", ("model", "qwen")), ("/", None), ("hi", None), ("/a-b", None)])
def test_parse_command(text: str, parsed: tuple[str, str] | None) -> None:
    assert parse_command(text) == parsed


# -- replies say what they are


async def test_replies_carry_kind_privacy_choices_and_outcome(
        service: ChatService, model_server: ModelServer) -> None:
    listing = await service.handle(incoming("/model"))
    assert listing.kind is Kind.NOTICE and listing.private and listing.outcome is Outcome.OK
    assert listing.choices is not None and listing.choices.command == "model"
    assert [(c.key, c.current) for c in listing.choices.options] == [
        ("llama3.2", True), ("qwen2.5", False)]
    assert "Your model: `llama3.2`" in await listing.text()

    unknown = await service.handle(incoming("/model gpt-99"))
    assert unknown.kind is Kind.REFUSAL and unknown.private and unknown.choices is None

    helped = await service.handle(incoming("/help"))
    assert helped.kind is Kind.NOTICE and not helped.private

    answer = await service.handle(incoming("hello"))
    assert answer.kind is Kind.ANSWER and answer.streaming and not answer.private
    assert answer.outcome is Outcome.PENDING
    assert await answer.text() == "You said: hello"
    assert answer.outcome is Outcome.OK
    [row] = [r for r in await service.store.audit_log(10) if r["user_input"] == "hello"]
    assert row["status"] == "ok"
    with pytest.raises(RuntimeError):
        await answer.text()  # read once


async def test_a_stats_refusal_is_private_and_says_so(make_settings: SettingsFactory,
                                                      model_server: ModelServer) -> None:
    async with open_service(make_settings()) as service:
        reply = await service.handle(incoming("/stats", platform="telegram"))
    assert reply.kind is Kind.REFUSAL and reply.private
    assert await reply.text() == "Only the bot's admins can see /stats."


async def test_a_failed_answer_ends_as_error(make_settings: SettingsFactory,
                                             model_server: ModelServer) -> None:
    async with open_service(make_settings(LLM_RETRIES=0)) as service:
        model_server.fault = "auth"
        reply = await service.handle(incoming("hello"))
        text = await reply.text()
        rows = await service.store.audit_log(5)
    assert reply.kind is Kind.ANSWER and reply.outcome is Outcome.ERROR
    assert text.startswith("⚠️") and rows[-1]["status"] == "error"


async def test_a_cancelled_answer_stops_and_is_recorded_cancelled(
        service: ChatService, model_server: ModelServer) -> None:
    model_server.reply = "word " * 50
    model_server.chunk_delay = 0.01
    reply = await service.handle(incoming("tell me a story"))
    seen: list[str] = []
    async with asyncio.timeout(10):
        async for delta in reply:
            seen.append(delta)
            reply.cancel()  # what a /stop will do
    rows = await service.store.audit_log(5)
    # The turn ends itself at once: the text so far, then the stopped mark.
    assert seen[1:] == ["\n\n⏹ stopped"] and reply.outcome is Outcome.CANCELLED
    assert rows[-1]["status"] == "cancelled"
    assert rows[-1]["model_response"] == seen[0]


async def test_silent_refusal_has_no_text(make_settings: SettingsFactory,
                                          model_server: ModelServer) -> None:
    settings = make_settings(ALLOWED_USERS="telegram:1")
    async with open_service(settings) as service:
        group = await service.handle(incoming("hi", user="2", place="-5", platform="telegram"))
        direct = await service.handle(incoming("hi", user="2", platform="telegram"))
    assert group.kind is Kind.REFUSAL and group.silent and await group.text() == ""
    assert direct.kind is Kind.REFUSAL and await direct.text() == "Sorry, this bot is private."
    assert model_server.requests == []


def test_reply_ids_are_distinct() -> None:
    first, second = Reply.notice("a"), Reply.notice("b")
    assert first.id != second.id


async def test_console_numbers_the_choices_and_a_number_picks(
        make_settings: SettingsFactory, model_server: ModelServer) -> None:
    settings = make_settings()
    out = io.StringIO()
    async with open_service(settings) as service:
        adapter = ConsoleAdapter(settings, stdin=io.StringIO("/model\n2\nhi\n"), stdout=out,
                                 user_id="ana")
        async with asyncio.timeout(10):
            await adapter.run(service, asyncio.Event())
        chosen = await service.catalog.current("console", "ana")
    lines = out.getvalue().splitlines()
    assert "  1. llama3.2 (yours)" in lines and "  2. qwen2.5" in lines
    assert "Done: your model is now `qwen2.5`." in lines
    assert lines[-1] == "You said: hi"
    assert chosen == "qwen2.5"
    assert [r.model for r in model_server.requests] == ["qwen2.5"]


async def test_a_streaming_answer_is_found_by_its_conversation_and_stopped(
        service: ChatService, model_server: ModelServer) -> None:
    model_server.reply = "word " * 50
    model_server.chunk_delay = 0.01
    reply = await service.handle(incoming("tell me a story", user="7"))
    assert service.answers_in(incoming("/stop", user="7")) == [reply]
    assert service.answers_in(incoming("/stop", user="8")) == []  # someone else's
    seen: list[str] = []
    async with asyncio.timeout(10):
        async for delta in reply:
            seen.append(delta)
            if len(seen) == 3:
                for running in service.answers_in(incoming("/stop", user="7")):
                    running.cancel()
    rows = await service.store.audit_log(5)
    assert len(seen) == 4 and seen[-1] == "\n\n⏹ stopped"
    assert reply.outcome is Outcome.CANCELLED
    assert rows[-1]["status"] == "cancelled"
    assert rows[-1]["model_response"] == "".join(seen[:3])
    assert service.answers_in(incoming("/stop", user="7")) == []
