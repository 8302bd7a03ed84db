"""Pictures users send: Telegram photos and image files, Discord image attachments.

End to end against the emulators (the real python-telegram-bot and discord.py) and
the model stand-in: what the user saw, what reached the model (exactly the bytes
served, in Ollama's and OpenAI's forms), what was downloaded (or not), and what the
database kept (a text stand-in, never the bytes; the audit's `images`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.discord.testing import StartBot, said
from adapters.telegram.testing import bot_says, telegram_bot
from bot.images import (
    Image,
    ImageRef,
    ImageTooLarge,
    attach,
    download,
    human_bytes,
    ollama_messages,
    openai_messages,
    stand_in,
)
from bot.messages import Incoming
from bot.records import ConversationRef
from bot.service import ChatService
from tests.conftest import SettingsFactory
from tests.fakes.discord_api import TEXT_CHANNEL_ID, DiscordEmulator
from tests.fakes.model_server import ModelServer
from tests.fakes.telegram_api import TelegramApiEmulator

ALICE, BOB = 1001, 1002
D_ALICE = 2_100_000_000_000_000_001
CAN_ONLY = "I can only read text and pictures."


def picture(seed: str, size: int) -> bytes:
    """`size` known bytes, different for each seed."""
    block = hashlib.sha256(seed.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def tg_settings(make_settings: SettingsFactory, tg: TelegramApiEmulator,
                **overrides: Any) -> Any:
    return make_settings(TELEGRAM_TOKEN=tg.bot_token, TELEGRAM_BASE_URL=tg.base_url,
                         **overrides)


async def audit_rows(service: ChatService, user: str) -> list[dict[str, Any]]:
    return await service.store.audit_log(50, user)


async def history(service: ChatService, platform: str, user: int) -> list[str]:
    ref = ConversationRef(f"{platform}:{user}@dm", platform, str(user), "dm")
    conv = await service.store.conversation_id(ref)
    return [m.content for m in await service.store.recent_messages(conv, 50, after_id=0)]


# ----------------------------------------------------------------------------- Telegram


async def test_telegram_photo_reaches_ollama_as_the_bytes_served(
        tg: TelegramApiEmulator, make_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    model_server.vision_models = ["llama3.2"]
    small, medium, large = (picture("s", 900), picture("m", 6_000), picture("l", 40_000))
    sizes = [tg.photo_size(small, 90, 90), tg.photo_size(medium, 320, 320),
             tg.photo_size(large, 1280, 1280)]
    async with telegram_bot(tg, tg_settings(make_settings, tg, MAX_IMAGE_BYTES=10_000)) as bot:
        tg.user_says(ALICE, "what is this?", photo=sizes)
        await bot_says(tg, ALICE, ["You said: what is this?"])
        tg.user_says(ALICE, "and its colour?")
        await bot_says(tg, ALICE, ["You said: what is this?", "You said: and its colour?"])

        # The largest size within MAX_IMAGE_BYTES, fetched through getFile and the
        # file path python-telegram-bot builds from TELEGRAM_BASE_URL's …/file/bot.
        assert [p["file_id"] for p in tg.params("getFile")] == [sizes[1]["file_id"]]
        assert [f.downloads for f in (tg.file_by_id(s["file_id"]) for s in sizes)] == [0, 1, 0]
        assert [c.params["file_path"] for c in tg.calls("file")] == [
            tg.file_by_id(sizes[1]["file_id"]).file_path]
        first, second = model_server.requests
        assert first.images == [("", medium)]
        assert first.messages[-1]["images"] == [base64.b64encode(medium).decode()]
        assert first.messages[-1]["content"] == "what is this?"
        # History holds the stand-in, not the bytes: the next turn sends no image.
        assert second.images == []
        assert [m["content"] for m in second.messages if m["role"] == "user"] == [
            "[image: what is this?]", "and its colour?"]
        assert await history(bot.service, "telegram", ALICE) == [
            "[image: what is this?]", "You said: what is this?",
            "and its colour?", "You said: and its colour?"]
        rows = await audit_rows(bot.service, f"telegram:{ALICE}")
        assert [(r["images"], r["status"], r["user_input"]) for r in rows] == [
            (1, "ok", "[image: what is this?]"), (0, "ok", "and its colour?")]


async def test_telegram_image_file_and_photo_reach_openai_as_data_urls(
        tg: TelegramApiEmulator, make_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    png = picture("png", 3_000)
    photo = picture("jpeg", 2_000)
    settings = tg_settings(make_settings, tg, LLM_PROVIDER="openai",
                           VISION_MODELS="qwen2.5,llama3.2")
    async with telegram_bot(tg, settings) as bot:
        tg.user_says(ALICE, "", document=tg.document(png, "image/png", "diagram.png"))
        await bot_says(tg, ALICE, ["You said: "[:-1]])
    [request] = model_server.requests
    assert request.api == "openai"
    assert request.images == [("image/png", png)]
    # No caption: the message is the image alone.
    assert request.messages[-1]["content"] == [
        {"type": "image_url",
         "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}]
    async with telegram_bot(tg, settings) as bot:
        tg.user_says(ALICE, "and this?", photo=[tg.photo_size(photo, 64, 64)])
        await tg.wait_for(lambda: len(model_server.requests) == 2)
        await bot_says(tg, ALICE, ["You said:", "You said: and this?"])
        second = model_server.requests[1]
        assert second.images == [("image/jpeg", photo)]
        assert second.messages[-1]["content"][0] == {"type": "text", "text": "and this?"}
        assert await history(bot.service, "telegram", ALICE) == [
            "[image]", "You said: ", "[image: and this?]", "You said: and this?"]
        assert [r["images"] for r in await audit_rows(bot.service, f"telegram:{ALICE}")] == [1, 1]


async def test_telegram_model_that_cannot_see_names_one_that_can(
        tg: TelegramApiEmulator, make_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    settings = tg_settings(make_settings, tg)
    async with telegram_bot(tg, settings):
        tg.user_says(ALICE, "look", photo=[tg.photo_size(picture("a", 500), 10, 10)])
        await bot_says(tg, ALICE, ["The model llama3.2 can't see images, and no model here "
                                   "can."])
    model_server.vision_models = ["qwen2.5"]  # what /api/show says, asked once per model
    async with telegram_bot(tg, settings) as bot:
        tg.user_says(ALICE, "look again", photo=[tg.photo_size(picture("b", 500), 10, 10)])
        await bot_says(tg, ALICE, [
            "The model llama3.2 can't see images, and no model here can.",
            "The model llama3.2 can't see images. qwen2.5 can: switch with /model qwen2.5"])
        # Nothing was downloaded for a model that can't see it; nothing reached a model.
        assert tg.params("getFile") == [] and model_server.requests == []
        rows = await audit_rows(bot.service, f"telegram:{ALICE}")
        assert [(r["status"], r["error"], r["images"]) for r in rows] == [
            ("rejected", "model llama3.2 can't see images", 0)] * 2
        assert await history(bot.service, "telegram", ALICE) == []


async def test_telegram_image_over_the_limit_is_refused_before_and_while_reading(
        tg: TelegramApiEmulator, make_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    model_server.vision_models = ["llama3.2"]
    limit = 100_000
    refusal = "That image is too large: the limit is 100 KB."
    big = tg.photo_size(picture("big", 150_000), 2000, 2000)
    # Announced as 5 KB; served as 32 MB, chunked: only reading can tell.
    liar = tg.photo_size(picture("liar", 5_000), 100, 100, chunked=True, pad_to=32_000_000,
                         announced=5_000)
    # Announced as 5 KB; its Content-Length says 32 MB.
    liar_cl = tg.photo_size(picture("liar2", 5_000), 100, 100, pad_to=32_000_000,
                            announced=5_000)
    async with telegram_bot(tg, tg_settings(make_settings, tg, MAX_IMAGE_BYTES=limit)) as bot:
        tg.user_says(ALICE, "huge", photo=[big])
        await bot_says(tg, ALICE, [refusal])
        assert tg.params("getFile") == []  # refused by the size Telegram announced
        tg.user_says(ALICE, "small, it says", photo=[liar])
        await bot_says(tg, ALICE, [refusal] * 2)
        tg.user_says(ALICE, "small, it says again", photo=[liar_cl])
        await bot_says(tg, ALICE, [refusal] * 3)
        rows = await audit_rows(bot.service, f"telegram:{ALICE}")
    stored = tg.file_by_id(liar["file_id"])
    assert stored.downloads == 1 and stored.sent < stored.served_size  # stopped, not read out
    assert model_server.requests == []
    assert [(r["status"], r["images"]) for r in rows] == [("rejected", 0)] * 3
    assert "150000 bytes > MAX_IMAGE_BYTES 100000" in rows[0]["error"]
    assert "while reading" in rows[1]["error"] and "while reading" in rows[2]["error"]


async def test_telegram_stickers_voice_and_video_get_one_short_answer(
        tg: TelegramApiEmulator, make_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    model_server.vision_models = ["llama3.2"]
    async with telegram_bot(tg, tg_settings(make_settings, tg)) as bot:
        for n, kind in enumerate(("sticker", "voice", "video"), 1):
            tg.user_says(ALICE, "", **{kind: True})
            await bot_says(tg, ALICE, [CAN_ONLY] * n)
        tg.user_says(ALICE, "a file", document=tg.document(b"%PDF-1.4", "application/pdf",
                                                            "notes.pdf"))
        await bot_says(tg, ALICE, [CAN_ONLY] * 4)
        assert model_server.requests == [] and tg.params("getFile") == []
        assert await history(bot.service, "telegram", ALICE) == []


async def test_telegram_download_failure_and_timeout(
        tg: TelegramApiEmulator, make_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    model_server.vision_models = ["llama3.2"]
    sorry = "I couldn't download that image. Please send it again."
    async with telegram_bot(tg, tg_settings(make_settings, tg)) as bot:
        tg.fail_next("getFile", 400, "Bad Request: wrong file_id or the file is temporarily "
                                     "unavailable")
        tg.user_says(ALICE, "one", photo=[tg.photo_size(picture("1", 100), 8, 8)])
        await bot_says(tg, ALICE, [sorry])
        bot.service.image_timeout = 0.3
        stuck = tg.photo_size(picture("2", 100), 8, 8)
        tg.file_by_id(stuck["file_id"]).gate = asyncio.Event()  # never opened
        tg.user_says(ALICE, "two", photo=[stuck])
        await bot_says(tg, ALICE, [sorry, sorry])
        rows = await audit_rows(bot.service, f"telegram:{ALICE}")
    assert [r["status"] for r in rows] == ["error", "error"]
    assert "getFile" in rows[0]["error"] and "timed out" in rows[1]["error"]
    assert model_server.requests == []


async def test_telegram_a_slow_download_blocks_no_one_else(
        tg: TelegramApiEmulator, make_settings: SettingsFactory,
        model_server: ModelServer) -> None:
    model_server.vision_models = ["llama3.2"]
    slow = tg.photo_size(picture("slow", 2_000), 50, 50)
    gate = tg.file_by_id(slow["file_id"]).gate = asyncio.Event()
    # One model call at a time: a download holding the slot would stop Bob.
    async with telegram_bot(tg, tg_settings(make_settings, tg, LLM_CONCURRENCY=1)):
        tg.user_says(ALICE, "what is it?", photo=[slow])
        await tg.wait_for(lambda: tg.file_by_id(slow["file_id"]).downloads == 1)
        tg.user_says(ALICE, "and?")  # Alice's next message keeps its place after the photo
        tg.user_says(BOB, "hello")
        await bot_says(tg, BOB, ["You said: hello"])
        assert tg.bot_texts(ALICE) == []
        gate.set()
        await bot_says(tg, ALICE, ["You said: what is it?", "You said: and?"])
    assert [r.last_user_message for r in model_server.requests] == [
        "hello", "what is it?", "and?"]
    assert model_server.requests[1].images == [("", picture("slow", 2_000))]
    assert [m["content"] for m in model_server.requests[2].messages if m["role"] == "user"] \
        == ["[image: what is it?]", "and?"]


# ----------------------------------------------------------------------------- Discord


@pytest.mark.parametrize("provider", ["ollama", "openai"])
async def test_discord_image_attachment_reaches_the_model(
        provider: str, discord_api: DiscordEmulator, run_bot: StartBot,
        model_server: ModelServer) -> None:
    model_server.vision_models = ["llama3.2"]
    data = picture("discord", 12_345)
    bot = await run_bot(LLM_PROVIDER=provider, VISION_MODELS="llama3.2")
    dm = discord_api.dm_channel(D_ALICE)
    att = discord_api.attachment(data, "cat.webp", "image/webp", channel_id=dm)
    await discord_api.user_says(D_ALICE, "what cat is this?", attachments=[att])
    await said(discord_api, dm, "You said: what cat is this?")
    [request] = model_server.requests
    assert request.images == [("" if provider == "ollama" else "image/webp", data)]
    stored = discord_api.attachments[int(att["id"])]
    assert stored.downloads == 1 and stored.sent == len(data)
    assert await history(bot.service, "discord", D_ALICE) == [
        "[image: what cat is this?]", "You said: what cat is this?"]
    [row] = await audit_rows(bot.service, f"discord:{D_ALICE}")
    assert (row["images"], row["status"]) == (1, "ok")


async def test_discord_server_channel_image_with_a_mention(
        discord_api: DiscordEmulator, run_bot: StartBot, model_server: ModelServer) -> None:
    model_server.vision_models = ["llama3.2"]
    await run_bot()
    data = picture("guild", 4_096)
    # Without the mention it is not for the bot: not downloaded, not answered.
    quiet = discord_api.attachment(picture("quiet", 100), "quiet.png")
    await discord_api.user_says(D_ALICE, "", channel_id=TEXT_CHANNEL_ID, attachments=[quiet])
    att = discord_api.attachment(data, "chart.jpg", "image/jpeg")
    await discord_api.user_says(D_ALICE, "", channel_id=TEXT_CHANNEL_ID, mentions_bot=True,
                                attachments=[att])
    await discord_api.wait_for(lambda: discord_api.bot_messages(TEXT_CHANNEL_ID))
    [answer] = discord_api.bot_messages(TEXT_CHANNEL_ID)
    assert answer.content == "You said: "  # the image alone: no words to echo
    [request] = model_server.requests
    assert request.images == [("", data)]
    assert discord_api.attachments[int(quiet["id"])].downloads == 0


async def test_discord_limits_and_what_it_cannot_read(
        discord_api: DiscordEmulator, run_bot: StartBot, model_server: ModelServer) -> None:
    model_server.vision_models = ["llama3.2"]
    bot = await run_bot(MAX_IMAGE_BYTES=50_000)
    dm = discord_api.dm_channel(D_ALICE)
    refusal = "That image is too large: the limit is 50 KB."
    big = discord_api.attachment(picture("big", 60_000), "big.png", channel_id=dm)
    await discord_api.user_says(D_ALICE, "", attachments=[big])
    await said(discord_api, dm, refusal)
    liar = discord_api.attachment(picture("liar", 1_000), "liar.png", size=1_000,
                                  chunked=True, pad_to=32_000_000, channel_id=dm)
    await discord_api.user_says(D_ALICE, "tiny", attachments=[liar])
    await discord_api.wait_for(lambda: len(discord_api.bot_messages(dm)) == 2)
    pdf = discord_api.attachment(b"%PDF-1.4", "notes.pdf", "application/pdf", channel_id=dm)
    await discord_api.user_says(D_ALICE, "read this", attachments=[pdf])
    await discord_api.wait_for(lambda: len(discord_api.bot_messages(dm)) == 3)
    voice = discord_api.attachment(b"OggS", "voice-message.ogg", "audio/ogg", flags=8192,
                                   channel_id=dm)
    await discord_api.user_says(D_ALICE, "", attachments=[voice])
    await discord_api.wait_for(lambda: len(discord_api.bot_messages(dm)) == 4)
    assert [m.content for m in discord_api.bot_messages(dm)] == [
        refusal, refusal, CAN_ONLY, CAN_ONLY]
    stored = {a.filename: a for a in discord_api.attachments.values()}
    assert stored["big.png"].downloads == 0  # refused by the size Discord announced
    assert stored["liar.png"].downloads == 1
    assert stored["liar.png"].sent < 32_000_000  # stopped while reading
    assert stored["notes.pdf"].downloads == stored["voice-message.ogg"].downloads == 0
    assert model_server.requests == []
    rows = await audit_rows(bot.service, f"discord:{D_ALICE}")
    assert [r["status"] for r in rows] == ["rejected", "rejected"]


# ----------------------------------------------------------------------------- the core


def message_with(images: list[bytes], text: str = "", *, mime: str = "image/png",
                 announced: int | None = None) -> Incoming:
    def ref(data: bytes) -> ImageRef:
        async def fetch(max_bytes: int) -> bytes:
            return data
        return ImageRef(len(data) if announced is None else announced, mime, fetch)

    return Incoming(platform="console", user_id="1", display_name="T", chat_id="dm-1",
                    place_id=None, text=text, images=tuple(ref(d) for d in images))


async def test_history_keeps_a_stand_in_never_the_bytes(
        make_settings: SettingsFactory, model_server: ModelServer) -> None:
    from bot.app import open_service

    model_server.vision_models = ["llama3.2"]
    two = [picture("x", 300_000), picture("y", 200_000)]
    async with open_service(make_settings()) as service:
        reply = await service.handle(message_with(two, "compare these"))
        assert await reply.text() == "You said: compare these"
        [request] = model_server.requests
        assert request.images == [("", two[0]), ("", two[1])]
        ref = service.conversation_ref(message_with([]))
        conv = await service.store.conversation_id(ref)
        stored = await service.store.recent_messages(conv, 10, after_id=0)
        assert [m.content for m in stored] == ["[2 images: compare these]",
                                               "You said: compare these"]
        [row] = await service.store.audit_log(5, "console:1")
        assert row["images"] == 2 and len(row["user_input"]) < 100


# ----------------------------------------------------------------------------- units


async def test_ollama_model_info_carries_the_capabilities(model_server: ModelServer) -> None:
    from bot.providers.ollama_provider import OllamaProvider

    model_server.vision_models = ["qwen2.5"]
    provider = OllamaProvider(model_server.url)
    try:
        seeing, blind = (await provider.model_info("qwen2.5"),
                         await provider.model_info("llama3.2"))
        missing = await provider.model_info("no-such-model")
    finally:
        await provider.close()
    assert seeing.capabilities == ("completion", "vision")
    assert blind.capabilities == ("completion",)
    assert missing.capabilities is None  # the server said nothing


def test_formats_and_stand_ins() -> None:
    image = Image(b"\x89PNG\r\n", "image/png")
    messages = attach([{"role": "system", "content": "s"},
                       {"role": "user", "content": "hi"}], [image])
    assert ollama_messages(messages)[-1] == {"role": "user", "content": "hi",
                                             "images": ["iVBORw0K"]}
    assert openai_messages(messages)[-1] == {"role": "user", "content": [
        {"type": "text", "text": "hi"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]}
    assert ollama_messages(messages)[0] == openai_messages(messages)[0] == messages[0]
    assert stand_in("a cat", 1) == "[image: a cat]" and stand_in(" ", 3) == "[3 images]"
    assert [human_bytes(n) for n in (10_000_000, 1_500_000, 250_000, 999)] == [
        "10 MB", "1.5 MB", "250 KB", "999 bytes"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(0, 300_000), limit=st.integers(1, 200_000), chunked=st.booleans())
def test_download_reads_at_most_the_limit(size: int, limit: int, chunked: bool) -> None:
    body = picture("p", size)
    sent = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal sent
        for start in range(0, len(body), 16_384):
            sent += len(body[start:start + 16_384])
            yield body[start:start + 16_384]

    def respond(request: httpx.Request) -> httpx.Response:
        headers = {} if chunked else {"Content-Length": str(size)}
        return httpx.Response(200, headers=headers, content=stream())

    async def run() -> bytes:
        async with httpx.AsyncClient(transport=httpx.MockTransport(respond)) as client:
            return await download(client, "http://files.test/x", limit)

    if size <= limit:
        assert asyncio.run(run()) == body
    else:
        with pytest.raises(ImageTooLarge):
            asyncio.run(run())
        # Refused by its length before reading, or stopped within one piece of the limit.
        assert sent <= limit + 2 * 65_536
