"""Each user reads the bot's own words in their language, end to end on the emulators.

Telegram users with zh-hant / zh-hans / en apps, a /language choice that the
database keeps across a restart, per-language command menus on the wire
(setMyCommands per language_code, Discord's description_localizations), a
Discord interaction in a zh-TW client, and the order of the signals in the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from adapters.discord.adapter import DiscordAdapter
from adapters.discord.testing import TOKEN as DISCORD_TOKEN
from adapters.telegram.testing import telegram_bot
from bot.app import open_service
from bot.i18n import Catalogs
from bot.providers.base import ProviderError
from bot.providers.ollama_provider import OllamaProvider
from bot.service import ChatService
from bot.settings import Settings
from tests.conftest import SettingsFactory, incoming
from tests.fakes.discord_api import FLAG_EPHEMERAL, GUILD_ID, TEXT_CHANNEL_ID, DiscordEmulator
from tests.fakes.model_server import ModelServer
from tests.fakes.telegram_api import TelegramApiEmulator

TW_USER, CN_USER, EN_USER = 3001, 3002, 3003
DISCORD_USER = 2_100_000_000_000_000_011
WAIT = 10.0

# What each language's /help opens with, and its heading (the catalogues' words).
HELP = {
    "zh-TW": ("我是一個會記住我們對話的聊天助理", "指令："),
    "zh-CN": ("我是一个会记住我们对话的聊天助手", "命令："),
    "en": ("I'm a chat assistant that remembers our conversation", "Commands:"),
}
SERVER_ERROR = {"zh-TW": "⚠️ 模型伺服器發生錯誤，請稍後再試。",
                "zh-CN": "⚠️ 模型服务器出错了，请稍后再试。",
                "en": "⚠️ The model server had an error. Please try again in a moment."}
TOO_FAST = {"zh-TW": re.compile(r"^你傳訊息的速度太快了，請 \d+ 秒後再試。$"),
            "zh-CN": re.compile(r"^你发消息太快了，请 \d+ 秒后再试。$"),
            "en": re.compile(r"^You're sending messages too fast\. Please try again in \d+ "
                             r"seconds?\.$")}


# ------------------------------------------------------------------ harness


def _db_path(settings: Settings) -> Path:
    return Path(settings.DATABASE_URL.removeprefix("sqlite:///"))


async def _user_settings(settings: Settings, platform: str, user_id: int) -> tuple[Any, ...]:
    """The user's row of user_settings as it is in the database file."""
    def read() -> tuple[Any, ...]:
        with contextlib.closing(sqlite3.connect(_db_path(settings))) as db:
            row = db.execute("SELECT model, language FROM user_settings"
                             " WHERE platform = ? AND user_id = ?",
                             (platform, str(user_id))).fetchone()
        return tuple(row) if row else ()
    return await asyncio.to_thread(read)


async def _audit(settings: Settings, user_id: int) -> list[tuple[str, str]]:
    def read() -> list[tuple[str, str]]:
        with contextlib.closing(sqlite3.connect(_db_path(settings))) as db:
            return list(db.execute("SELECT status, error FROM audit WHERE user_id = ?"
                                   " ORDER BY id", (str(user_id),)))
    return await asyncio.to_thread(read)


async def said(tg: TelegramApiEmulator, chat_id: int, count: int) -> str:
    """The bot's `count`-th message in the chat, once it is there and finished."""
    await tg.wait_for(lambda: len(tg.bot_texts(chat_id)) >= count, WAIT,
                      f"bot message {count} in {chat_id}")
    return tg.bot_texts(chat_id)[count - 1]


def sent_texts(tg: TelegramApiEmulator, chat_id: int) -> list[str]:
    """What crossed the wire to that chat (sendMessage bodies)."""
    return [str(c.params.get("text")) for c in tg.calls("sendMessage")
            if str(c.params.get("chat_id")) == str(chat_id)]


# ------------------------------------------------------------------ Telegram


async def test_each_telegram_user_gets_help_errors_and_the_rate_notice_in_their_language(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    users = {TW_USER: ("zh-hant", "zh-TW"), CN_USER: ("zh-hans", "zh-CN"),
             EN_USER: ("en", "en")}
    settings = tg_settings(RATE_LIMIT_PER_MINUTE=2)
    async with telegram_bot(tg, settings):
        for user, (code, lang) in users.items():
            tg.user_says(user, "/help", language_code=code)
            help_text = await said(tg, user, 1)
            opening, heading = HELP[lang]
            assert help_text.startswith(opening) and heading in help_text, (lang, help_text)
            assert sent_texts(tg, user)[0].startswith(opening)
        model_server.fault = "http500"
        for user, (code, lang) in users.items():
            tg.user_says(user, "hello", language_code=code)
            assert await said(tg, user, 2) == SERVER_ERROR[lang]
        model_server.fault = None
        for user, (code, lang) in users.items():
            tg.user_says(user, "one too many", language_code=code)
            notice = await said(tg, user, 3)
            assert TOO_FAST[lang].match(notice), (lang, notice)
    for user in users:
        statuses = await _audit(settings, user)
        assert statuses[0][0] == "error" and "500" in statuses[0][1]
        assert statuses[1] == ("rejected", "rate limited")
    # No model call was made for the refused messages.
    assert [r.last_user_message for r in model_server.requests].count("one too many") == 0


async def test_language_command_switches_and_survives_a_restart(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory) -> None:
    settings = tg_settings()
    async with telegram_bot(tg, settings):
        tg.user_says(EN_USER, "/language", language_code="en")
        shown = await said(tg, EN_USER, 1)
        assert shown.startswith("Your language: English (automatic, from your app's settings).")
        keyboard = tg.bot_messages(EN_USER)[0].reply_markup["inline_keyboard"]
        labels = [b["text"] for row in keyboard for b in row]
        assert labels == ["English", "繁體中文", "简体中文"]  # nothing chosen: no ✓ yet
        tg.user_says(EN_USER, "/language zh-TW", language_code="en")
        assert await said(tg, EN_USER, 2) == "好了，之後我會用繁體中文跟你說話。"
        assert await _user_settings(settings, "telegram", EN_USER) == (None, "zh-TW")
    # A new process on the same database: the choice holds over the app's English.
    async with telegram_bot(tg, settings):
        tg.user_says(EN_USER, "/help", language_code="en")
        assert (await said(tg, EN_USER, 3)).startswith(HELP["zh-TW"][0])
        # A button press picks Simplified; the answer and the edit are in it.
        tg.user_says(EN_USER, "/language", language_code="en")
        await said(tg, EN_USER, 4)
        menu = tg.bot_messages(EN_USER)[3]
        buttons = [b for row in menu.reply_markup["inline_keyboard"] for b in row]
        assert [b["text"] for b in buttons] == ["English", "✓ 繁體中文", "简体中文"]
        press = tg.press_button(EN_USER, menu, buttons[2]["callback_data"])
        await tg.wait_for(lambda: tg.callback_answer(press) is not None, WAIT, "the answer")
        assert tg.callback_answer(press)["text"] == "语言：简体中文"
        assert await _user_settings(settings, "telegram", EN_USER) == (None, "zh-CN")
        tg.user_says(EN_USER, "/language auto", language_code="en")
        assert await said(tg, EN_USER, 5) == "Done: I'll follow your app's language again."
        assert await _user_settings(settings, "telegram", EN_USER) == (None, None)
        tg.user_says(EN_USER, "/language klingon", language_code="zh-hant")
        assert await said(tg, EN_USER, 6) == \
            "我不認得「klingon」這個語言。請從這些選一個：en, zh-TW, zh-CN"


async def test_set_my_commands_is_sent_per_language(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory) -> None:
    async with telegram_bot(tg, tg_settings()):
        await tg.wait_for(lambda: len(tg.calls("setMyCommands")) >= 2, WAIT, "both menus")
    calls = tg.calls("setMyCommands")
    assert sorted(str(c.params.get("language_code") or "") for c in calls) == ["", "zh"]
    default = {c["command"]: c["description"] for c in tg.commands()}
    chinese = {c["command"]: c["description"] for c in tg.commands(language_code="zh")}
    assert default["help"] == "What the bot does and its commands"
    assert chinese["help"] == "機器人能做什麼，以及它的指令"
    assert chinese["reset"] == "忘掉這段對話"
    assert list(default) == list(chinese)


# ------------------------------------------------------------------ Discord


@contextlib.asynccontextmanager
async def discord_bot(api: DiscordEmulator, settings: Settings) -> AsyncIterator[ChatService]:
    async with open_service(settings) as service:
        stop = asyncio.Event()
        task = asyncio.create_task(DiscordAdapter(settings).run(service, stop))
        ready = asyncio.create_task(api.wait_for(lambda: len(api.ready_shards) >= 1))
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await task
            raise AssertionError("the adapter returned before connecting")
        try:
            yield service
        finally:
            stop.set()
            async with asyncio.timeout(15):
                await task


@pytest.fixture
def discord_settings(make_settings: SettingsFactory,
                     discord_api: DiscordEmulator) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return make_settings(**({"DISCORD_TOKEN": DISCORD_TOKEN,
                                 "DISCORD_API_BASE": discord_api.api_base} | overrides))
    return make


async def test_discord_interaction_in_a_zh_tw_client_gets_a_chinese_ephemeral_answer(
        discord_api: DiscordEmulator, discord_settings: Callable[..., Settings]) -> None:
    settings = discord_settings()
    async with discord_bot(discord_api, settings):
        memory = await discord_api.slash(DISCORD_USER, "memory", channel_id=TEXT_CHANNEL_ID,
                                         locale="zh-TW")
        await discord_api.wait_for(lambda: memory.answered)
        [answer] = memory.messages
        assert answer.ephemeral and answer.flags & FLAG_EPHEMERAL
        assert answer.content.startswith("這段對話已儲存的訊息：0 則")
        english = await discord_api.slash(DISCORD_USER, "help", locale="en-US")
        await discord_api.wait_for(lambda: english.answered)
        assert english.texts[0].startswith(HELP["en"][0])
        chosen = await discord_api.slash(DISCORD_USER, "language", {"code": "zh-CN"},
                                         locale="zh-TW")
        await discord_api.wait_for(lambda: chosen.answered)
        assert chosen.texts == ["好了，之后我会用简体中文和你说话。"]
        assert chosen.messages[0].ephemeral
    assert await _user_settings(settings, "discord", DISCORD_USER) == (None, "zh-CN")


async def test_discord_messages_follow_the_servers_preferred_locale(
        discord_api: DiscordEmulator, discord_settings: Callable[..., Settings]) -> None:
    discord_api.guilds[GUILD_ID].preferred_locale = "zh-CN"
    settings = discord_settings(MAX_INPUT_CHARS=20)
    async with discord_bot(discord_api, settings):
        await discord_api.user_says(DISCORD_USER, "x" * 30, channel_id=TEXT_CHANNEL_ID,
                                    mentions_bot=True)
        await discord_api.wait_for(lambda: bool(discord_api.bot_messages(TEXT_CHANNEL_ID)))
        [shown] = discord_api.bot_messages(TEXT_CHANNEL_ID)
        assert shown.content == "这条消息有 30 个字符，上限是 20。请发短一点的内容。"
    assert await _audit(settings, DISCORD_USER) == [("rejected", "input 30 chars")]


async def test_slash_commands_carry_description_localizations(
        discord_api: DiscordEmulator, discord_settings: Callable[..., Settings]) -> None:
    async with discord_bot(discord_api, discord_settings()):
        await discord_api.wait_for(lambda: bool(discord_api.commands.get(None)))
    synced = {c["name"]: c for c in discord_api.commands[None]}
    assert synced["help"]["description"] == "What the bot does and its commands"
    assert synced["help"]["description_localizations"] == {
        "zh-TW": "機器人能做什麼，以及它的指令", "zh-CN": "机器人能做什么，以及它的命令"}
    assert synced["reset"]["description_localizations"]["zh-CN"] == "忘掉这段对话"
    [option] = synced["model"]["options"]
    assert option["name"] == "name"  # names stay as they are: only words are translated
    assert option["description_localizations"] == {
        "zh-TW": "要切換的模型；不填就顯示你目前的模型",
        "zh-CN": "要切换的模型；不填就显示你当前的模型"}
    assert all(not c.get("name_localizations") for c in synced.values())
    assert all(set(c["description_localizations"]) == {"zh-TW", "zh-CN"}
               for c in synced.values())


# ------------------------------------------------------------------ the core's order


async def test_the_order_of_the_signals_in_the_core(make_settings: SettingsFactory) -> None:
    settings = make_settings()
    async with open_service(settings) as service:
        terminal = ChatService(settings, service.store, service.provider,
                               lang_env="zh_TW.UTF-8")
        # No platform signal: the process's LANG.
        reply = await terminal.handle(incoming("/help"))
        assert (await reply.text()).startswith(HELP["zh-TW"][0])
        # The platform's signal beats LANG.
        reply = await terminal.handle(replace(incoming("/help"), language="zh-CN"))
        assert (await reply.text()).startswith(HELP["zh-CN"][0])
    fixed = make_settings(LANGUAGE="zh-CN")
    async with open_service(fixed) as service:
        # LANGUAGE beats the platform; the user's own choice beats LANGUAGE.
        reply = await service.handle(replace(incoming("/help", user="7"), language="en"))
        assert (await reply.text()).startswith(HELP["zh-CN"][0])
        await (await service.handle(incoming("/language en", user="7"))).text()
        reply = await service.handle(replace(incoming("/help", user="7"), language="zh-TW"))
        assert (await reply.text()).startswith(HELP["en"][0])
        assert await service.store.user_language("console", "7") == "en"


async def test_provider_errors_carry_their_message_and_its_parameters(
        model_server: ModelServer) -> None:
    provider = OllamaProvider(model_server.url)
    try:
        with pytest.raises(ProviderError) as info:
            async for _ in provider.stream("no-such-model", [{"role": "user", "content": "hi"}],
                                           num_ctx=2048, max_tokens=64):
                pass
    finally:
        await provider.close()
    exc = info.value
    assert exc.params == {"model": "no-such-model"} and "{model}" in exc.msgid
    catalogs = Catalogs.load()
    assert "`no-such-model`" in exc.message(catalogs.for_language("zh-TW"))
    assert exc.message(catalogs.for_language("zh-TW")) != exc.user_message
    assert exc.message(catalogs.for_language("en")) == exc.user_message
    assert "no-such-model" in exc.detail


async def test_stats_speaks_the_admins_language_and_keeps_its_columns_aligned(
        make_settings: SettingsFactory) -> None:
    from bot.stats import _width

    async with open_service(make_settings()) as service:
        assert await (await service.handle(replace(incoming("/stats"), language="zh-CN"))) \
            .text() == ("```\n还没有任何对话记录。\n"
                        "审计日志：目前为空；不限期保留（AUDIT_RETENTION_DAYS=0）。\n```")
        await (await service.handle(incoming("hello"))).text()
        shown = await (await service.handle(replace(incoming("/stats"),
                                                    language="zh-TW"))).text()
        rows = [await service.store.audit_log(10)]
    lines = shown.strip("`\n").split("\n")
    assert lines[-1].startswith("稽核紀錄：自 ")
    assert lines[-1].endswith(" 筆；不限期保存（AUDIT_RETENTION_DAYS=0）。")
    assert lines[0].split() == ["模型", "對話次數", "錯誤率", "p50", "p95", "首字", "p50",
                                "輸入", "token", "輸出", "token"]
    assert lines[1].split()[1] == "1"  # the one exchange, in the database's audit log
    assert [r["status"] for r in rows[0] if r["kind"] == "chat"] == ["ok"]
    # The value starts where its heading does, CJK characters counting two columns.
    def column_of(line: str, token: str) -> int:
        return _width(line[:line.index(token)])

    assert column_of(lines[1], " 1 ") + 1 == column_of(lines[0], "對話次數")


async def test_a_sticker_is_answered_in_the_senders_language(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    async with telegram_bot(tg, tg_settings()):
        tg.user_says(TW_USER, "", sticker=True, language_code="zh-HK")
        tg.user_says(CN_USER, "", sticker=True, language_code="zh")
        assert await said(tg, TW_USER, 1) == "我只看得懂文字和圖片。"
        assert await said(tg, CN_USER, 1) == "我只能看懂文字和图片。"
    assert sent_texts(tg, TW_USER) == ["我只看得懂文字和圖片。"]
    assert model_server.requests == []  # nothing for the model to read


async def test_the_stop_button_and_the_stopped_mark_are_in_the_askers_language(
        tg: TelegramApiEmulator, tg_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    model_server.reply = " ".join(f"詞{i}" for i in range(400))
    model_server.chunk_delay = 0.03
    async with telegram_bot(tg, tg_settings()) as running:
        service = running.service
        tg.user_says(TW_USER, "講個長故事", language_code="zh-hant")
        await tg.wait_for(lambda: any(m.text.startswith("詞0") for m in tg.bot_messages(TW_USER)),
                          WAIT, "the answer to start")
        answer = next(m for m in tg.bot_messages(TW_USER) if m.text.startswith("詞0"))
        [[button]] = answer.reply_markup["inline_keyboard"]
        assert button["text"] == "⏹ 停止"
        press = tg.press_button(TW_USER, answer, button["callback_data"])
        await tg.wait_for(lambda: answer.text.endswith("⏹ 已停止") and answer.reply_markup is None,
                          WAIT, "the stopped mark")
        assert tg.callback_answer(press)["text"] == "正在停止…"
        tg.user_says(TW_USER, "/stop", language_code="zh-hant")
        assert await said(tg, TW_USER, 2) == "沒有東西可以停止：這裡沒有正在進行的回覆。"
        rows = [r for r in await service.store.audit_log(10, f"telegram:{TW_USER}")
                if r["kind"] == "chat"]
    assert rows[-1]["status"] == "cancelled"
    assert answer.text == rows[-1]["model_response"] + "\n\n⏹ 已停止"
