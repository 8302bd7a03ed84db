"""The core end to end through the real ollama and openai clients."""

from __future__ import annotations

import asyncio

import pytest

from bot.app import open_service
from bot.tokens import count_messages, count_tokens
from tests.backends import db_url_both_backends  # noqa: F401  (SQLite and PostgreSQL)
from tests.conftest import SettingsFactory, ask, incoming
from tests.fakes.model_server import ModelServer, closed_port_url, prompt_tokens

PROVIDERS = ["ollama", "openai"]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_reply_streams_and_server_gets_window_settings(
    provider: str, model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.reply = "Hello there, friend."
    model_server.tokens_per_chunk = 1
    async with open_service(make_settings(LLM_PROVIDER=provider, CONTEXT_TOKENS=2048,
                                          REPLY_TOKENS=300)) as svc:
        deltas = [d async for d in await svc.handle(incoming("hi"))]
        rows = await svc.store.audit_log(10)
    assert "".join(deltas) == "Hello there, friend."
    assert len(deltas) > 1  # streamed, not one block
    req = model_server.requests[-1]
    assert req.model == "llama3.2"
    assert req.messages[-1] == {"role": "user", "content": "hi"}
    assert req.messages[0]["role"] == "system"
    if provider == "ollama":
        assert req.options["num_ctx"] == 2048
        assert req.options["num_predict"] == 300
    else:
        assert req.body["max_tokens"] == 300
        assert req.body["stream_options"] == {"include_usage": True}
    (row,) = rows
    assert row["status"] == "ok" and row["provider"] == provider
    assert row["model_response"] == "Hello there, friend."
    assert row["prompt_tokens"] == req.prompt_tokens
    assert row["completion_tokens"] and row["completion_tokens"] > 1
    assert row["first_token_time"] is not None and row["response_time"] is not None


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_memory_survives_restart_and_reset_forgets(
    provider: str, model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    settings = make_settings(LLM_PROVIDER=provider)
    async with open_service(settings) as svc:
        await ask(svc, "my name is Ana")
    async with open_service(settings) as svc:  # a new core on the same file
        assert "Your name is Ana" in await ask(svc, "what is my name?")
        assert "forgot" in await ask(svc, "/reset")
        assert "Ana" not in await ask(svc, "what is my name?")
        rows = await svc.store.audit_log(10)
    # The audit log keeps what /reset removed from memory.
    assert any(r["user_input"] == "my name is Ana" for r in rows)


async def test_users_and_places_are_isolated(
    service: object, model_server: ModelServer
) -> None:
    svc = service
    await ask(svc, "my name is Ana", user="1", place="g1", platform="telegram")
    assert "Ana" not in await ask(svc, "who am I?", user="2", place="g1", platform="telegram")
    assert "Ana" not in await ask(svc, "who am I?", user="1", place="g2", platform="telegram")
    assert "Ana" not in await ask(svc, "who am I?", user="1", platform="discord")
    assert "Your name is Ana" in await ask(svc, "who?", user="1", place="g1",
                                           platform="telegram")
    for req in model_server.requests[1:4]:
        assert not any("Ana" in m["content"] for m in req.messages)


async def test_memory_scope_user_shares_across_places(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    async with open_service(make_settings(MEMORY_SCOPE="user")) as svc:
        await ask(svc, "my name is Bo", user="1", place="g1", platform="telegram")
        assert "Your name is Bo" in await ask(svc, "who?", user="1", place="g2",
                                              platform="telegram")
        assert "Bo" not in await ask(svc, "who?", user="2", place="g1", platform="telegram")


async def test_model_choice_is_per_user_and_survives_restart(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    settings = make_settings()
    async with open_service(settings) as svc:
        listing = await ask(svc, "/model", user="1")
        assert "llama3.2" in listing and "qwen2.5" in listing
        assert "qwen2.5" in await ask(svc, "/model qwen2.5", user="1")
        refused = await ask(svc, "/model x'; DROP TABLE messages;--", user="2")
        assert "no model called" in refused and "qwen2.5" in refused
    async with open_service(settings) as svc:
        await ask(svc, "hi", user="1")
        await ask(svc, "hi", user="2")
        assert await svc.store.count_messages(
            await svc.store.conversation_id(svc.conversation_ref(incoming("x", user="1")))) == 2
    assert [r.model for r in model_server.requests] == ["qwen2.5", "llama3.2"]


async def test_llm_models_limits_the_choice(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    async with open_service(make_settings(LLM_MODELS="llama3.2")) as svc:
        assert "no model called" in await ask(svc, "/model qwen2.5")
        choices = await svc.model_choices(incoming("x"))
    assert choices.available == ("llama3.2",)


async def test_trimming_sends_newest_whole_messages_within_budget(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.reply = "ok " * 20
    settings = make_settings(CONTEXT_TOKENS=400, REPLY_TOKENS=100, MEMORY_STRATEGY="truncate",
                             SYSTEM_PROMPT="Be brief.")
    async with open_service(settings) as svc:
        for i in range(30):
            await ask(svc, f"message number {i} " + "word " * 20)
    budget = 300
    last = model_server.requests[-1]
    assert last.messages[0] == {"role": "system", "content": "Be brief."}
    assert last.messages[-1]["content"].startswith("message number 29")
    kept = [m["content"] for m in last.messages[1:-1]]
    assert kept and len(kept) < 58  # older messages were dropped...
    assert last.messages[1]["role"] == "user"  # ...whole exchanges, oldest first
    numbers = [int(c.split()[2]) for c in kept if c.startswith("message number")]
    assert numbers == list(range(29 - len(numbers), 29))  # the newest, in order
    assert count_messages(last.messages) <= budget
    assert prompt_tokens(last.messages) <= budget * 1.15


async def test_message_too_long_for_window_is_refused_without_model_call(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    async with open_service(make_settings(CONTEXT_TOKENS=300, REPLY_TOKENS=100,
                                          MAX_INPUT_CHARS=100_000)) as svc:
        reply = await ask(svc, "word " * 400)
        rows = await svc.store.audit_log(5)
    assert "tokens long" in reply and "most I can take" in reply
    assert model_server.requests == []
    assert rows[-1]["status"] == "rejected"


async def test_input_over_max_chars_is_refused(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    async with open_service(make_settings(MAX_INPUT_CHARS=50)) as svc:
        reply = await ask(svc, "x" * 51)
    assert "51 characters" in reply and "limit is 50" in reply
    assert model_server.requests == []


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog while the programmer writes documentation "
    "for transformers, tokenizers and context windows in version 3.11 of Python.",
    "大型語言模型透過預測下一個詞來生成句子，可以進行問答、翻譯、摘要與寫作等任務。",
])
def test_token_estimate_learns_the_server_count_from_above(text: str) -> None:
    from bot.tokens import Calibration
    from tests.fakes.model_server import count_tokens as server_count

    real = server_count(text)
    assert count_tokens(text) >= 0.9 * real  # at most 10% under before anything is learned
    calibration = Calibration()
    messages = [{"role": "user", "content": text}]
    for _ in range(10):  # the counts the server reports after each call
        calibration.observe("m", messages, prompt_tokens(messages))
    learned = calibration.factors("m").count(text)
    assert real * 0.97 <= learned <= real * 1.15


async def test_audit_records_history_messages(service: object,
                                              model_server: ModelServer) -> None:
    svc = service
    await ask(svc, "one")
    await ask(svc, "two")
    rows = await svc.store.audit_log(5)
    assert [r["history_messages"] for r in rows] == [0, 2]
    assert [len(r.messages) for r in model_server.requests] == [2, 4]


# -- failures: one clear reply, history unchanged, an error record, the bot keeps serving
FAILURES = [
    ("http500", "model server had an error"),
    ("not_found", "is not installed"),
    ("cut", "stopped in the middle"),
    ("malformed", "couldn't read"),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("fault", "says"), FAILURES)
async def test_model_failures(provider: str, fault: str, says: str, model_server: ModelServer,
                              make_settings: SettingsFactory) -> None:
    if provider == "openai" and fault == "not_found":
        says = "is not available"
    model_server.reply = "a reply long enough to be cut in the middle of it"
    async with open_service(make_settings(LLM_PROVIDER=provider)) as svc:
        model_server.fault = fault
        reply = await ask(svc, "hello")
        model_server.fault = None
        assert says in reply
        assert "Traceback" not in reply and "http" not in reply.lower()
        conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x")))
        assert await svc.store.count_messages(conv) == 0
        assert await ask(svc, "again") == model_server.reply
        rows = await svc.store.audit_log(5)
    assert [r["status"] for r in rows] == ["error", "ok"]
    assert rows[0]["error"]
    if fault == "not_found":
        assert "`llama3.2`" in reply and "/model" in reply


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_server_unreachable(provider: str, make_settings: SettingsFactory) -> None:
    url = await closed_port_url()
    async with open_service(make_settings(LLM_PROVIDER=provider, OLLAMA_HOST=url,
                                          OPENAI_BASE_URL=url + "/v1")) as svc:
        reply = await ask(svc, "hello")
        rows = await svc.store.audit_log(5)
    assert "can't be reached" in reply
    assert rows[-1]["status"] == "error" and "unreachable" in rows[-1]["error"]


@pytest.mark.parametrize(("fault", "says"), [("auth", "credentials"),
                                             ("rate_limit", "rate-limiting")])
async def test_openai_auth_and_rate_limit(fault: str, says: str, model_server: ModelServer,
                                          make_settings: SettingsFactory) -> None:
    model_server.fault = fault
    async with open_service(make_settings(LLM_PROVIDER="openai")) as svc:
        assert says in await ask(svc, "hello")


async def test_openai_sends_api_key(model_server: ModelServer,
                                    make_settings: SettingsFactory) -> None:
    model_server.api_key = "sk-test-123456"
    async with open_service(make_settings(LLM_PROVIDER="openai",
                                          OPENAI_API_KEY="sk-test-123456")) as svc:
        assert await ask(svc, "hi") == "You said: hi"
    assert model_server.requests[-1].headers["Authorization"] == "Bearer sk-test-123456"


async def test_no_first_token_within_timeout(model_server: ModelServer,
                                             make_settings: SettingsFactory) -> None:
    model_server.fault = "hang"
    async with open_service(make_settings(LLM_TIMEOUT=0.3)) as svc:
        reply = await asyncio.wait_for(ask(svc, "hello"), 5)
        rows = await svc.store.audit_log(5)
    assert "didn't start replying within 0.3 seconds" in reply
    assert rows[-1]["status"] == "error"


async def test_stream_that_stalls_ends_with_what_was_shown(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.fault = "stall"
    async with open_service(make_settings(LLM_STALL_TIMEOUT=0.3)) as svc:
        reply = await asyncio.wait_for(ask(svc, "hello"), 5)
        conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x")))
        assert await svc.store.count_messages(conv) == 0
    assert reply.startswith("You") and "stopped responding" in reply


async def test_retry_before_any_text(model_server: ModelServer,
                                     make_settings: SettingsFactory) -> None:
    model_server.faults = ["http500"]
    async with open_service(make_settings(LLM_RETRIES=2)) as svc:
        svc_reply = await ask(svc, "hello")
    assert svc_reply == "You said: hello"
    assert len(model_server.requests) == 2


async def test_turns_of_one_conversation_run_in_order_and_concurrency_is_capped(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.gate = asyncio.Event()
    async with open_service(make_settings(LLM_CONCURRENCY=2)) as svc:
        same = [asyncio.create_task(ask(svc, f"m{i}", user="A")) for i in range(3)]
        others = [asyncio.create_task(ask(svc, f"o{i}", user=f"B{i}")) for i in range(3)]
        await model_server.wait_for_requests(2)
        # Two calls held at the gate; the cap keeps the rest waiting.
        assert len(model_server.requests) == 2
        model_server.gate.set()
        # Let the rest run; the server counts how many it ever handled at once.
        replies = await asyncio.wait_for(asyncio.gather(*same, *others), 10)
        conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x", user="A")))
        stored = await svc.store.recent_messages(conv, 10)
    assert replies[:3] == ["You said: m0", "You said: m1", "You said: m2"]
    assert [m.content for m in stored if m.role == "user"] == ["m0", "m1", "m2"]
    assert len(model_server.requests) == 6
    assert model_server.peak_active == 2  # never more at the server, however they were queued
    a_requests = [r for r in model_server.requests if r.last_user_message.startswith("m")]
    # Each turn of A saw exactly the history before it.
    assert [len(r.messages) for r in a_requests] == [2, 4, 6]


async def test_shutdown_cancels_a_reply_in_flight(model_server: ModelServer,
                                                  make_settings: SettingsFactory) -> None:
    model_server.gate = asyncio.Event()
    async with open_service(make_settings()) as svc:
        pending = asyncio.create_task(ask(svc, "hello"))
        await model_server.wait_for_requests(1)
        await asyncio.wait_for(svc.shutdown(0.05), 10)
        reply = await asyncio.wait_for(pending, 5)
        rows = await svc.store.audit_log(5)
        conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x")))
        assert await svc.store.count_messages(conv) == 0
    assert "restarting" in reply
    assert rows[-1]["status"] == "cancelled"


async def test_abandoned_reply_is_recorded_cancelled(model_server: ModelServer,
                                                     service: object) -> None:
    svc = service
    model_server.reply = "word " * 50
    model_server.chunk_delay = 0.01
    stream = (await svc.handle(incoming("hello"))).deltas()
    first = await anext(stream)
    await stream.aclose()
    rows = await svc.store.audit_log(5)
    assert first and rows[-1]["status"] == "cancelled"


async def test_model_output_with_nul_is_stored(model_server: ModelServer,
                                               service: object) -> None:
    svc = service
    model_server.reply = "nul\x00 in the reply"
    await ask(svc, "hi")
    conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x")))
    stored = await svc.store.recent_messages(conv, 10)
    assert [m.content for m in stored] == ["hi", "nul in the reply"]
