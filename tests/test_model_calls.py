"""What real model servers do to a call, through the real ollama and openai clients.

Each model's own window, too-long prompts in each server's form, the reply
limit's name, servers without usage, chat templates that take one system
message, replies cut at the length limit or by LLM_REPLY_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from bot.app import open_service
from bot.logging_setup import setup_logging
from bot.providers.openai_provider import OpenAIProvider
from bot.settings import load_settings
from bot.stats import compute_stats, format_stats
from tests.conftest import SettingsFactory, ask, incoming
from tests.fakes.model_server import ModelServer

PROVIDERS = ["ollama", "openai"]
MIXED = ["tell me about the number 31415926535 and 大型語言模型 please",
         "word " * 30, "我叫小明，我喜歡吃拉麵，週末常常去台北的夜市。" * 2, "🎉🔥 ok 12 34"]


def _limit(req: object) -> int:
    body = req.body  # type: ignore[attr-defined]
    opts = req.options  # type: ignore[attr-defined]
    return int(opts.get("num_predict") or body.get("max_tokens")
               or body.get("max_completion_tokens") or 0)


# -- 11.14, 11.15: time limits
async def test_reply_timeout_cuts_a_trickling_reply(model_server: ModelServer,
                                                    make_settings: SettingsFactory) -> None:
    model_server.reply = "word " * 200
    model_server.chunk_delay = 0.05  # a token well inside the stall limit, forever
    async with open_service(make_settings(LLM_REPLY_TIMEOUT=0.6, LLM_STALL_TIMEOUT=5)) as svc:
        reply = await asyncio.wait_for(ask(svc, "hello"), 5)
        rows = await svc.store.audit_log(5)
        conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x")))
        stored = await svc.store.count_messages(conv)
    assert reply.startswith("word") and "took longer than 0.6 seconds" in reply
    assert rows[-1]["status"] == "error" and "LLM_REPLY_TIMEOUT" in rows[-1]["error"]
    assert rows[-1]["model_response"].startswith("word")
    assert stored == 0  # a cut reply is not history


async def test_a_slow_reader_is_not_a_stalled_model(model_server: ModelServer,
                                                    make_settings: SettingsFactory) -> None:
    # The reader reads the model's stream itself: while it is busy elsewhere (here it
    # waits past the stall limit twice) the model's text waits in the socket; neither
    # the stall limit nor its interruption may touch that other wait.
    model_server.reply = "one two three four five six"
    async with open_service(make_settings(LLM_TIMEOUT=5, LLM_STALL_TIMEOUT=0.1)) as svc:
        reply = await svc.handle(incoming("hello"))
        shown: list[str] = []
        async for delta in reply.deltas():
            shown.append(delta)
            if len(shown) <= 2:
                await asyncio.sleep(0.15)  # the slow reader itself, not a synchronisation
        rows = await svc.store.audit_log(5)
    assert "".join(shown) == "one two three four five six"
    assert rows[-1]["status"] == "ok"


async def test_stall_timeout_defaults_to_llm_timeout(model_server: ModelServer,
                                                     make_settings: SettingsFactory) -> None:
    assert load_settings(None, LLM_TIMEOUT=7).LLM_STALL_TIMEOUT == 7
    assert load_settings(None, LLM_TIMEOUT=7, LLM_STALL_TIMEOUT=3).LLM_STALL_TIMEOUT == 3
    model_server.fault = "stall"
    async with open_service(make_settings(LLM_TIMEOUT=0.4, LLM_STALL_TIMEOUT=None)) as svc:
        reply = await asyncio.wait_for(ask(svc, "hello"), 5)
        rows = await svc.store.audit_log(5)
    assert "stopped responding" in reply
    assert "no new token for 0.4 s" in rows[-1]["error"]


# -- 11.16: the reply limit's name
async def test_reasoning_model_gets_max_completion_tokens_after_one_refusal(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.reject_param = "max_tokens"  # what o-series and GPT-5 say
    async with open_service(make_settings(LLM_PROVIDER="openai", REPLY_TOKENS=200)) as svc:
        first = await ask(svc, "hello")
        second = await ask(svc, "again")
        rows = await svc.store.audit_log(5)
    assert first == "You said: hello" and second == "You said: again"
    sent = [("max_tokens" in r.body, r.body.get("max_completion_tokens")) for r in
            model_server.requests]
    # Refused once, retried with the other name, which is kept for that model.
    assert sent == [(True, None), (False, 200), (False, 200)]
    assert [r["status"] for r in rows] == ["ok", "ok"]


async def test_other_servers_get_max_tokens_and_openai_gets_max_completion_tokens() -> None:
    official = OpenAIProvider(base_url=None, api_key="sk-x")
    local = OpenAIProvider(base_url="http://127.0.0.1:8000/v1", api_key=None)
    try:
        assert official._limit_for("gpt-5") == "max_completion_tokens"
        assert local._limit_for("qwen") == "max_tokens"
    finally:
        await official.close()
        await local.close()


# -- 14.3, 11.17: each model's own window, prompt + reply within it by the server's count
async def test_ollama_window_from_api_show_caps_num_ctx_and_the_prompt(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.context_lengths = {"llama3.2": 2048}
    model_server.reply = "ok"
    async with open_service(make_settings(CONTEXT_TOKENS=8192, REPLY_TOKENS=512,
                                          MEMORY_STRATEGY="truncate")) as svc:
        for i in range(40):
            await ask(svc, f"message {i} " + "some words here " * 20)
        listing = await ask(svc, "/model")
        memory = await ask(svc, "/memory")
    for req in model_server.requests:
        assert req.options["num_ctx"] <= 2048
        assert req.prompt_tokens + req.options["num_predict"] <= 2048
    assert model_server.requests[-1].messages[-1]["content"].startswith("message 39")
    assert "`llama3.2`: window 2,048 tokens, 3.2B, Q4_K_M" in listing
    assert "`qwen2.5`: window 8,192 tokens" in listing  # its own 131,072 capped at ours
    assert "2,048 tokens" in memory


@pytest.mark.parametrize("where", ["models", "props"])
async def test_openai_window_from_v1_models_or_props(
    where: str, model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.context_lengths = {"llama3.2": 1024, "qwen2.5": 1024}
    model_server.report_window = where == "models"  # vLLM's max_model_len
    model_server.llamacpp_routes = where == "props"  # llama.cpp /props n_ctx
    model_server.overflow = "openai"
    model_server.reply = "ok"
    async with open_service(make_settings(LLM_PROVIDER="openai", CONTEXT_TOKENS=8192,
                                          REPLY_TOKENS=200, MEMORY_STRATEGY="truncate")) as svc:
        for i in range(15):
            assert await ask(svc, f"message {i} " + "some words here " * 20) == "ok"
        listing = await ask(svc, "/model")
    assert all(r.prompt_tokens + _limit(r) <= 1024 for r in model_server.requests)
    assert len(model_server.requests) == 15  # never refused, never retried
    assert "`llama3.2`: window 1,024 tokens" in listing


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_prompt_and_reply_stay_within_the_window_by_the_server_count(
    provider: str, model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.reply = "fine " * 10
    model_server.llamacpp_routes = provider == "openai"  # a server with /tokenize
    settings = make_settings(LLM_PROVIDER=provider, CONTEXT_TOKENS=600, REPLY_TOKENS=100,
                             MEMORY_STRATEGY="truncate")
    async with open_service(settings) as svc:
        for i in range(24):
            await ask(svc, f"{i}: {MIXED[i % len(MIXED)]}")
    async with open_service(settings) as svc:  # a restart keeps the correction
        stored = await svc.store.model_info("llama3.2")
        for i in range(8):
            await ask(svc, f"again {i}: {MIXED[i % len(MIXED)]}")
    assert all(r.prompt_tokens + _limit(r) <= 600 for r in model_server.requests)
    assert stored is not None and stored["token_factor"] is not None
    # Filled, not starved: the later prompts use most of the budget.
    assert max(r.prompt_tokens for r in model_server.requests[-8:]) > 500 * 0.7
    if provider == "openai":
        assert model_server.tokenize_calls > 0


# -- 17.1: too-long prompts in each server's form
@pytest.mark.parametrize("form", ["openai", "llamacpp", "vllm", "llama_cpp_python"])
async def test_too_long_prompt_is_learned_refitted_and_retried_once(
    form: str, model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.context_lengths = {"llama3.2": 800}
    model_server.overflow = form
    model_server.reply = "ok"
    settings = make_settings(LLM_PROVIDER="openai", CONTEXT_TOKENS=4096, REPLY_TOKENS=100,
                             MEMORY_STRATEGY="truncate", LLM_RETRIES=2)
    async with open_service(settings) as svc:
        replies = [await ask(svc, f"message {i} " + "some words here " * 15) for i in range(20)]
        rows = await svc.store.audit_log(50)
        learned = await svc.store.model_info("llama3.2")
    assert replies == ["ok"] * 20  # the user never saw the overflow
    assert [r["status"] for r in rows] == ["ok"] * 20
    fitted = [r for r in model_server.requests if r.prompt_tokens + _limit(r) <= 800]
    refused = [r for r in model_server.requests if r.prompt_tokens + _limit(r) > 800]
    # One refusal (llama-cpp-python: the empty stream and its diagnosis), then it fits.
    assert 1 <= len(refused) <= (2 if form == "llama_cpp_python" else 1)
    assert len(fitted) == 20
    assert learned is not None and learned["learned_window"] <= 800
    async with open_service(settings) as svc:  # remembered across a restart
        assert await ask(svc, "one more " + "some words here " * 15) == "ok"
    last = model_server.requests[-1]
    assert last.prompt_tokens + _limit(last) <= 800


async def test_too_long_even_alone_says_so_in_plain_words(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.context_lengths = {"llama3.2": 300}
    model_server.overflow = "openai"
    async with open_service(make_settings(LLM_PROVIDER="openai", CONTEXT_TOKENS=4096,
                                          REPLY_TOKENS=100, MAX_INPUT_CHARS=100_000)) as svc:
        reply = await ask(svc, "word " * 400)
        rows = await svc.store.audit_log(5)
    assert "more than the model `llama3.2` can read at once" in reply
    assert "300 tokens" in reply and "/reset" in reply
    assert "Traceback" not in reply and "400" not in reply
    assert len(model_server.requests) == 1  # refused once; alone it can't fit: no retry
    assert rows[-1]["status"] in ("error", "rejected")


# -- 17.1: after a 200 with an empty stream, every answer to the re-ask
def _kinds(srv: ModelServer) -> list[str]:
    return ["stream" if r.body.get("stream") else "whole" for r in srv.requests]


@pytest.mark.parametrize("form", ["eof", "drop", "hangup"])
async def test_empty_stream_then_a_reply_shows_that_reply(
    form: str, model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    # An interrupted stream (ended, its connection dropped after the 200, or the
    # server hung up before answering): the re-ask without streaming is answered.
    model_server.reply = "Hello Ana, nice to meet you."
    model_server.empty_streams, model_server.probe_replies = 1, ["reply"]
    model_server.empty_stream_form = form
    async with open_service(make_settings(LLM_PROVIDER="openai")) as svc:
        reply = await ask(svc, "hi, I am Ana")
        rows = await svc.store.audit_log(5)
        conv = await svc.store.conversation_id(svc.conversation_ref(incoming("x")))
        stored = await svc.store.count_messages(conv)
    assert reply == "Hello Ana, nice to meet you."
    assert _kinds(model_server) == ["stream", "whole"]
    assert rows[-1]["status"] == "ok" and rows[-1]["prompt_tokens"] is not None
    assert stored == 2  # a reply like any other: it is history


async def test_empty_stream_then_an_empty_reply_says_empty(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.empty_streams, model_server.probe_replies = 1, ["empty"]
    async with open_service(make_settings(LLM_PROVIDER="openai")) as svc:
        reply = await ask(svc, "hello")
        rows = await svc.store.audit_log(5)
    assert reply == "⚠️ The model returned an empty reply. Please try again."
    assert _kinds(model_server) == ["stream", "whole"]
    assert rows[-1]["status"] == "error" and rows[-1]["error"] == "empty reply"


async def test_empty_stream_then_a_server_error_says_server_error(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.empty_streams, model_server.probe_replies = 10, ["http500"] * 10
    async with open_service(make_settings(LLM_PROVIDER="openai", LLM_RETRIES=2)) as svc:
        reply = await ask(svc, "hello")
        rows = await svc.store.audit_log(5)
    assert reply == "⚠️ The model server had an error. Please try again in a moment."
    assert "stopped in the middle" not in reply
    assert _kinds(model_server) == ["stream", "whole"] * 3  # retried twice, as a 500 is
    assert rows[-1]["status"] == "error" and "openai 500" in rows[-1]["error"]


@pytest.mark.parametrize(("probe", "form"), [
    ("too_long", "eof"), ("too_long", "drop"), ("too_long", "hangup"),
    ("http500_too_long", "eof"), ("length_empty", "eof")])
async def test_empty_stream_then_too_long_in_any_form_is_refitted(
    probe: str, form: str, model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.empty_stream_form = form
    # llama-cpp-python leaves the broken stream's pooled connection to hang up.
    hangup = ["hangup"] if form == "drop" else []
    model_server.context_lengths = {"llama3.2": 800}
    model_server.reply = "ok"
    settings = make_settings(LLM_PROVIDER="openai", CONTEXT_TOKENS=4096, REPLY_TOKENS=100,
                             MEMORY_STRATEGY="truncate", LLM_RETRIES=2)
    async with open_service(settings) as svc:
        for i in range(6):
            await ask(svc, f"message {i} " + "some words here " * 40)
        model_server.requests.clear()
        model_server.empty_streams, model_server.probe_replies = 1, [*hangup, probe]
        reply = await ask(svc, "and now? " + "some words here " * 40)
        rows = await svc.store.audit_log(50)
        learned = await svc.store.model_info("llama3.2")
    assert reply == "ok"
    assert _kinds(model_server) == ["stream", *["whole"] * (1 + len(hangup)), "stream"]
    first, retried = model_server.requests[0], model_server.requests[-1]
    assert retried.prompt_tokens < first.prompt_tokens  # refitted: older messages left out
    assert rows[-1]["status"] == "ok"
    window = learned["learned_window"] if learned else None
    assert window is not None and window <= (800 if probe != "length_empty" else 4095)


async def test_thousands_of_digits_on_llama_cpp_python_are_refused_in_words(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.context_lengths = {"llama3.2": 1024}
    model_server.overflow = "llama_cpp_python"
    settings = make_settings(LLM_PROVIDER="openai", CONTEXT_TOKENS=4096, REPLY_TOKENS=96,
                             MAX_INPUT_CHARS=100_000, LLM_RETRIES=2)
    async with open_service(settings) as svc:
        reply = await ask(svc, "1" * 3500)
        again = await ask(svc, "1" * 3500)  # the window is known now: refused up front
        rows = await svc.store.audit_log(5)
    assert "more than the model `llama3.2` can read at once" in reply
    assert "stopped in the middle" not in reply + again
    assert "Please send something shorter" in again or "can read at once" in again
    assert [r["status"] for r in rows][-1] in ("rejected", "error")
    assert all(r.prompt_tokens + _limit(r) > 1024 for r in model_server.requests)
    assert len(model_server.requests) <= 3  # stream, re-ask; then refused before sending


# -- 17.3: servers that send no usage
async def test_no_usage_is_unknown_with_a_marked_estimate(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.send_usage = False  # llama-cpp-python ignores include_usage
    async with open_service(make_settings(LLM_PROVIDER="openai")) as svc:
        await ask(svc, "hello there")
        rows = await svc.store.audit_log(5)
        stats = await svc.store.audit_rows_for_stats()
    (row,) = rows
    assert row["prompt_tokens"] is None and row["completion_tokens"] is None
    assert row["est_prompt_tokens"] and row["est_completion_tokens"]
    table = format_stats(compute_stats(stats))
    assert f"~{row['est_prompt_tokens']} (est.)" in table
    assert " 0 " not in table
    bare = [{**r, "est_prompt_tokens": None, "est_completion_tokens": None} for r in stats]
    assert "unknown" in format_stats(compute_stats(bare))
    assert "error rate" in table.splitlines()[0]


# -- 17.4: one system message, alternating turns, SYSTEM_AS_USER
async def test_a_strict_template_gets_one_system_message_and_alternating_turns(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.strict_roles = True  # Mistral's template raises otherwise
    async with open_service(make_settings(LLM_PROVIDER="openai", CONTEXT_TOKENS=512,
                                          REPLY_TOKENS=100)) as svc:
        for i in range(25):
            reply = await ask(svc, f"my name is Ana, message {i} " + "words " * 10)
            assert reply.startswith("You said"), reply
            await asyncio.wait_for(svc.memory.wait_idle(), 5)
    chats = [r for r in model_server.requests if "memory" not in r.messages[0]["content"]]
    assert any("Summary of the earlier" in r.messages[0]["content"] for r in chats)
    for req in model_server.requests:
        roles = [m["role"] for m in req.messages]
        assert roles.count("system") == 1 and roles[0] == "system"


async def test_system_as_user_sends_no_system_role(model_server: ModelServer,
                                                   make_settings: SettingsFactory) -> None:
    async with open_service(make_settings(SYSTEM_AS_USER=True, SYSTEM_PROMPT="Be brief.")) as svc:
        await ask(svc, "hi")
        await ask(svc, "again")
    last = model_server.requests[-1]
    assert [m["role"] for m in last.messages] == ["user", "assistant", "user"]
    assert last.messages[0]["content"] == "Be brief.\n\nhi"


# -- 17.7: length limit, a server that is not Ollama, quiet client logs
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_reply_cut_at_the_length_limit_says_so(
    provider: str, model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    model_server.reply = "word " * 100
    async with open_service(make_settings(LLM_PROVIDER=provider, REPLY_TOKENS=16)) as svc:
        reply = await ask(svc, "hello")
        rows = await svc.store.audit_log(5)
    assert reply.endswith("_(reply cut off at the length limit)_")
    assert rows[-1]["status"] == "ok"
    assert "length limit" not in rows[-1]["model_response"]
    assert _limit(model_server.requests[-1]) == 16


async def test_a_server_that_is_not_ollama_says_set_llm_provider(
    model_server: ModelServer, make_settings: SettingsFactory
) -> None:
    async with open_service(make_settings(OLLAMA_HOST=model_server.url + "/v1")) as svc:
        reply = await ask(svc, "hello")
        rows = await svc.store.audit_log(5)
    assert "does not speak Ollama's API; set LLM_PROVIDER=openai" in reply
    assert "not installed" not in reply
    assert "404" in rows[-1]["error"]


async def test_httpx_request_logs_stay_out_of_the_console(
    model_server: ModelServer, make_settings: SettingsFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    # setup_logging sets these; other tests in this process need them back.
    noisy = {name: logging.getLogger(name).level for name in
             ("httpx", "httpcore", "telegram.ext", "discord", "aiosqlite", "asyncio")}
    try:
        setup_logging("INFO", "text", [])
        async with open_service(make_settings()) as svc:
            await ask(svc, "hello")
        err = capsys.readouterr().err
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, old in noisy.items():
            logging.getLogger(name).setLevel(old)
    assert model_server.requests
    assert "HTTP Request" not in err and "/api/chat" not in err


async def test_ollama_chat_carries_the_library_headers_and_the_environment_proxy(
        model_server: ModelServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The text chat is sent on aiohttp directly (bot.providers.ollama_stream): still with
    # the ollama library's headers, and through a proxy the environment names, as the
    # library's httpx client would (the model server stands in for the proxy here).
    from bot.providers.ollama_provider import OllamaProvider

    monkeypatch.setenv("OLLAMA_API_KEY", "sk-ollama-test")
    monkeypatch.setenv("HTTP_PROXY", model_server.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    model_server.reply = "proxied hello"
    provider = OllamaProvider("http://ollama.invalid:11434")
    try:
        got = [item async for item in provider.stream(
            "llama3.2", [{"role": "user", "content": "hi"}], num_ctx=2048, max_tokens=32)]
    finally:
        await provider.close()
    assert "".join(t for t in got if isinstance(t, str)) == "proxied hello"
    headers = model_server.requests[-1].headers
    assert headers["Authorization"] == "Bearer sk-ollama-test"
    assert headers["User-Agent"].startswith("ollama-python/")
