"""The /language choice in the database, on SQLite and PostgreSQL: kept, read with
the turn's one context query, independent of the /model pick, erased by forget."""

from __future__ import annotations

from bot.app import open_service
from bot.records import ConversationRef
from storage import open_store
from tests.backends import db_url_both_backends  # noqa: F401  (SQLite and PostgreSQL)
from tests.conftest import SettingsFactory, ask, incoming
from tests.fakes.model_server import ModelServer

REF = ConversationRef(key="telegram:9@dm", platform="telegram", user_id="9", place="dm")


async def test_the_choice_is_kept_beside_the_model_and_read_with_the_turn(db_url: str) -> None:
    store = open_store(db_url, pool_size=2)
    await store.open()
    try:
        conv = await store.conversation_id(REF)
        assert await store.user_language("telegram", "9") is None
        await store.set_user_language("telegram", "9", "zh-TW")
        await store.set_user_model("telegram", "9", "qwen2.5")
        ctx = await store.turn_context(conv, "telegram", "9", 5, True)
        assert (ctx.model_choice, ctx.language_choice) == ("qwen2.5", "zh-TW")
        await store.set_user_language("telegram", "9", None)  # /language auto
        ctx = await store.turn_context(conv, "telegram", "9", 5, False)
        assert (ctx.model_choice, ctx.language_choice) == ("qwen2.5", None)
        await store.set_user_language("telegram", "9", "zh-CN")
        removed = await store.forget_user("telegram", "9")
        assert removed["user_settings"] == 1
        assert await store.user_language("telegram", "9") is None
    finally:
        await store.close()


async def test_a_chat_turn_answers_in_the_chosen_language(
        make_settings: SettingsFactory, model_server: ModelServer) -> None:
    async with open_service(make_settings(MAX_INPUT_CHARS=10)) as service:
        assert await ask(service, "/language zh-CN") == "好了，之后我会用简体中文和你说话。"
        assert await ask(service, "x" * 12) == \
            "这条消息有 12 个字符，上限是 10。请发短一点的内容。"
        model_server.fault = "http500"  # the turn's own error, language from its context query
        assert await ask(service, "hi") == "⚠️ 模型服务器出错了，请稍后再试。"
        assert await service.store.user_language("console", "1") == "zh-CN"
        [row] = [r for r in await service.store.audit_log(10) if r["user_input"] == "hi"]
        assert row["status"] == "error"


async def test_notes_speak_the_chosen_language(make_settings: SettingsFactory) -> None:
    async with open_service(make_settings()) as service:
        await ask(service, "/language zh-TW")
        assert await ask(service, "/remember 我吃素") == (
            "記下了（第 1 則筆記）。這段對話裡我都會記得；/memory 會列出你的筆記，"
            "/forget 編號 可以刪掉一則。")
        assert "筆記（1 則）：\n1. 我吃素" in await ask(service, "/memory")
        assert await ask(service, "/forget 3") == "沒有第 3 則筆記；你目前有 1 則（見 /memory）。"
        conv = await service.store.conversation_id(
            service.conversation_ref(incoming("x")))
        assert [n.text for n in await service.store.notes(conv)] == ["我吃素"]
