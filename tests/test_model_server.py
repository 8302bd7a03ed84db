"""Tests for the fake model server, driven through the real ollama and openai clients."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.fakes.model_server import (
    ModelServer,
    Recorded,
    closed_port_url,
    count_tokens,
    prompt_tokens,
    tokenize,
)

ROOT = Path(__file__).resolve().parent.parent
HI = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def srv() -> AsyncIterator[ModelServer]:
    async with ModelServer() as server:
        yield server


@pytest.fixture
async def oc(srv: ModelServer) -> AsyncIterator[ollama.AsyncClient]:
    client = ollama.AsyncClient(host=srv.url, timeout=5)
    yield client
    await client.close()


@pytest.fixture
async def ac(srv: ModelServer) -> AsyncIterator[openai.AsyncOpenAI]:
    # max_retries=0: a retrying client would turn one fault into several recorded requests.
    client = openai.AsyncOpenAI(
        base_url=srv.url + "/v1", api_key="sk-test-key-123456", max_retries=0, timeout=5
    )
    yield client
    await client.close()


async def ollama_stream(
    client: ollama.AsyncClient, messages: list[dict[str, Any]] = HI, **kw: Any
) -> list[ollama.ChatResponse]:
    stream = await client.chat(model="llama3.2", messages=messages, stream=True, **kw)
    return [part async for part in stream]


async def openai_stream(
    client: openai.AsyncOpenAI, messages: list[dict[str, Any]] = HI, **kw: Any
) -> list[Any]:
    stream = await client.chat.completions.create(
        model="llama3.2",
        messages=messages,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        **kw,
    )
    return [chunk async for chunk in stream]


def openai_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", 0),
        ("Hello, world!", 4),
        ("internationalization", 5),  # 6 letters + 4 + 4 + 4 + 2
        ("我叫小明", 4),  # one per ideograph
        ("こんにちは", 5),
        ("café", 2),  # "caf" + "é"
        ("1234567", 3),  # digit groups of up to 3
        ("Wait...", 4),  # "Wait", ".", ".", "." (two chars, then the rest)
        ("a  b", 3),  # the lone extra space costs a token, the attached one does not
    ],
)
def test_count_tokens(text: str, expected: int) -> None:
    assert count_tokens(text) == expected
    assert "".join(tokenize(text)) == text
    assert ModelServer().count_tokens(text) == expected


def test_token_density_is_bpe_like() -> None:
    prose = (
        "Memory is what lets a chat bot feel personal: it should remember your name, your "
        "preferences, and what you talked about last week, without sending the entire history "
        "to the model every single time."
    )
    ratio = count_tokens(prose) / len(prose.split())
    assert 1.1 < ratio < 1.5
    assert count_tokens("今天天气很好") == 6
    # "hello" + " there", 4 for the message, 3 for the prompt: as the stand-in reports it.
    assert prompt_tokens(HI) == 9


# -- Ollama API --------------------------------------------------------------------------------


async def test_ollama_streaming_chat(srv: ModelServer, oc: ollama.AsyncClient) -> None:
    parts = await ollama_stream(oc, options={"num_ctx": 4096, "temperature": 0.2})
    *content, final = parts
    text = "".join(p.message.content or "" for p in content)
    assert text == "You said: hello there"
    assert all(not p.done for p in content) and final.done and final.done_reason == "stop"
    assert final.message.content == ""
    assert final.eval_count == len(content) == count_tokens(text)
    [rec] = srv.requests
    assert final.prompt_eval_count == rec.prompt_tokens == prompt_tokens(HI)
    assert (rec.api, rec.path, rec.model) == ("ollama", "/api/chat", "llama3.2")
    assert rec.messages == HI
    assert rec.options["num_ctx"] == 4096
    assert rec.body["stream"] is True


async def test_ollama_num_predict_and_chunking(srv: ModelServer, oc: ollama.AsyncClient) -> None:
    srv.reply = "one two three four five six seven"
    srv.tokens_per_chunk = 2
    *content, final = await ollama_stream(oc, options={"num_predict": 5})
    assert [p.message.content for p in content] == ["one two", " three four", " five"]
    assert (final.done_reason, final.eval_count) == ("length", 5)
    assert srv.requests[0].options["num_predict"] == 5

    whole = await oc.chat(model="llama3.2:latest", messages=HI, options={"num_predict": 2})
    assert whole.message.content == "one two"
    assert (whole.done, whole.done_reason, whole.eval_count) == (True, "length", 2)
    assert whole.prompt_eval_count == prompt_tokens(HI)


async def test_ollama_list_show_version(srv: ModelServer, oc: ollama.AsyncClient) -> None:
    srv.models.append("qwen2.5:7b")
    listed = await oc.list()
    assert [m.model for m in listed.models] == ["llama3.2:latest", "qwen2.5:latest", "qwen2.5:7b"]
    assert listed.models[0].details is not None
    assert listed.models[0].details.family == "llama"
    shown = await oc.show("llama3.2")
    assert shown.modelinfo is not None and "general.architecture" in shown.modelinfo
    async with httpx.AsyncClient(base_url=srv.url) as http:
        assert (await http.get("/api/version")).json()["version"]


async def test_ollama_unknown_model(oc: ollama.AsyncClient) -> None:
    with pytest.raises(ollama.ResponseError) as err:
        await oc.chat(model="mistral", messages=HI)
    assert err.value.status_code == 404
    assert err.value.error == 'model "mistral" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as err:
        async for _ in await oc.chat(model="mistral", messages=HI, stream=True):
            pass
    assert err.value.status_code == 404


# -- OpenAI API --------------------------------------------------------------------------------


async def test_openai_streaming_chat_with_usage(srv: ModelServer, ac: openai.AsyncOpenAI) -> None:
    chunks = await openai_stream(ac, max_tokens=100)
    assert openai_text(chunks) == "You said: hello there"
    assert chunks[0].id.startswith("chatcmpl-") and chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert (
        usage_chunk.usage.completion_tokens
        == len(content_chunks)
        == count_tokens("You said: hello there")
    )
    [rec] = srv.requests
    assert usage_chunk.usage.prompt_tokens == rec.prompt_tokens == prompt_tokens(HI)
    assert usage_chunk.usage.total_tokens == rec.prompt_tokens + len(content_chunks)
    assert (rec.api, rec.path, rec.options) == ("openai", "/v1/chat/completions", {})
    assert rec.body["max_tokens"] == 100
    assert rec.headers["Authorization"] == "Bearer sk-test-key-123456"


async def test_openai_length_limits(srv: ModelServer, ac: openai.AsyncOpenAI) -> None:
    srv.reply = "one two three four five"
    chunks = await openai_stream(ac, max_completion_tokens=3)
    assert openai_text(chunks) == "one two three"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 3

    done = await ac.chat.completions.create(model="llama3.2", messages=HI, max_tokens=2)  # type: ignore[arg-type]
    assert done.object == "chat.completion"
    assert done.choices[0].message.content == "one two"
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 2


async def test_openai_models(srv: ModelServer, ac: openai.AsyncOpenAI) -> None:
    srv.models.append("qwen2.5:7b")
    page = await ac.models.list()
    assert [m.id for m in page.data] == ["llama3.2", "qwen2.5", "qwen2.5:7b"]
    assert page.data[0].object == "model"


async def test_openai_unknown_model(ac: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        await ac.chat.completions.create(model="gpt-9", messages=HI)  # type: ignore[arg-type]
    assert err.value.code == "model_not_found"
    assert "The model `gpt-9` does not exist" in err.value.message


async def test_openai_api_key(srv: ModelServer, ac: openai.AsyncOpenAI) -> None:
    srv.api_key = "sk-right"
    with pytest.raises(openai.AuthenticationError) as err:
        await ac.models.list()
    assert err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        await openai_stream(ac)
    good = ac.with_options(api_key="sk-right")
    assert openai_text(await openai_stream(good)) == "You said: hello there"


# -- faults ------------------------------------------------------------------------------------

STATUS_FAULTS = [
    ("http500", 500, openai.InternalServerError),
    ("rate_limit", 429, openai.RateLimitError),
    ("auth", 401, openai.AuthenticationError),
    ("not_found", 404, openai.NotFoundError),
]


@pytest.mark.parametrize(("fault", "status", "openai_exc"), STATUS_FAULTS)
async def test_status_faults(
    srv: ModelServer,
    oc: ollama.AsyncClient,
    ac: openai.AsyncOpenAI,
    fault: str,
    status: int,
    openai_exc: type[openai.APIStatusError],
) -> None:
    srv.fault = fault
    with pytest.raises(ollama.ResponseError) as oerr:
        await ollama_stream(oc)
    assert oerr.value.status_code == status and isinstance(oerr.value.error, str)
    with pytest.raises(ollama.ResponseError):
        await oc.chat(model="llama3.2", messages=HI)
    with pytest.raises(openai_exc) as aerr:
        await openai_stream(ac)
    assert aerr.value.status_code == status
    assert isinstance(aerr.value.body, dict) and aerr.value.body["message"]
    if fault == "rate_limit":
        assert aerr.value.response.headers["retry-after"] == "1"
    assert len(srv.requests) == 3  # faulted requests are still recorded
    srv.fault = None
    assert openai_text(await openai_stream(ac)) == "You said: hello there"


async def test_fault_queue_fails_only_next_calls(srv: ModelServer, oc: ollama.AsyncClient) -> None:
    srv.faults = ["http500", "rate_limit"]
    srv.fault = "not_found"  # the queue takes precedence while it lasts
    codes = []
    for _ in range(3):
        with pytest.raises(ollama.ResponseError) as err:
            await oc.chat(model="llama3.2", messages=HI)
        codes.append(err.value.status_code)
    assert codes == [500, 429, 404]
    srv.fault = None
    assert (await oc.chat(model="llama3.2", messages=HI)).message.content


async def test_unknown_fault_rejected(srv: ModelServer, oc: ollama.AsyncClient) -> None:
    with pytest.raises(ValueError, match="closed_port_url"):
        srv.fault = "refuse"
    assert srv.fault is None  # the bad value was not taken: the server still answers
    assert (await oc.chat(model="llama3.2", messages=HI)).message.content == \
        "You said: hello there"


async def test_cut(srv: ModelServer, oc: ollama.AsyncClient, ac: openai.AsyncOpenAI) -> None:
    srv.fault = "cut"
    srv.reply = "one two three four"
    got: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async for part in await oc.chat(model="llama3.2", messages=HI, stream=True):
            got.append(part.message.content or "")
    assert "".join(got) == "one two"  # some content arrived before the connection dropped
    with pytest.raises(httpx.RemoteProtocolError):
        await oc.chat(model="llama3.2", messages=HI)
    with pytest.raises(openai.APIConnectionError):
        await openai_stream(ac)
    with pytest.raises(openai.APIConnectionError):
        await ac.chat.completions.create(model="llama3.2", messages=HI)  # type: ignore[arg-type]


async def test_malformed(srv: ModelServer, oc: ollama.AsyncClient, ac: openai.AsyncOpenAI) -> None:
    srv.fault = "malformed"
    with pytest.raises(json.JSONDecodeError):
        await ollama_stream(oc)
    with pytest.raises(json.JSONDecodeError):
        await oc.chat(model="llama3.2", messages=HI)
    with pytest.raises(json.JSONDecodeError):
        await openai_stream(ac)


@pytest.mark.parametrize("fault", ["stall", "hang"])
async def test_stall_and_hang_time_out(srv: ModelServer, fault: str) -> None:
    srv.fault = fault
    async with ollama.AsyncClient(host=srv.url, timeout=0.2) as oc:
        with pytest.raises(httpx.ReadTimeout):
            await ollama_stream(oc)
    ac = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=0.2)
    async with ac:
        with pytest.raises(openai.APITimeoutError):
            await openai_stream(ac)


async def test_stall_sends_first_chunk_then_close_releases(srv: ModelServer) -> None:
    srv.fault = "stall"
    got: list[str] = []
    first = asyncio.Event()

    async def consume() -> None:
        async with ollama.AsyncClient(host=srv.url, timeout=5) as oc:
            async for part in await oc.chat(model="llama3.2", messages=HI, stream=True):
                got.append(part.message.content or "")
                first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 2)
    started = time.monotonic()
    await srv.close()
    assert time.monotonic() - started < 0.5
    with pytest.raises(httpx.RemoteProtocolError):
        await asyncio.wait_for(task, 2)
    assert got == ["You"]


async def test_refused_connection() -> None:
    url = await closed_port_url()
    async with ollama.AsyncClient(host=url) as oc:
        with pytest.raises(ConnectionError):  # non-streaming: the client wraps ConnectError
            await oc.chat(model="llama3.2", messages=HI)
        with pytest.raises(httpx.ConnectError):  # streaming: it does not
            await ollama_stream(oc)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0) as ac:
        with pytest.raises(openai.APIConnectionError):
            await openai_stream(ac)


# -- timing controls ---------------------------------------------------------------------------


async def test_gate_holds_reply_in_flight(srv: ModelServer, ac: openai.AsyncOpenAI) -> None:
    srv.gate = asyncio.Event()
    task = asyncio.create_task(openai_stream(ac))
    await srv.wait_for_requests(1)
    assert not task.done()
    srv.gate.set()
    chunks = await asyncio.wait_for(task, 2)
    assert openai_text(chunks) == "You said: hello there"


async def test_first_token_delay_times_out(srv: ModelServer) -> None:
    srv.first_token_delay = 30
    async with ollama.AsyncClient(host=srv.url, timeout=0.2) as oc:
        with pytest.raises(httpx.ReadTimeout):
            await ollama_stream(oc)


async def test_wait_for_requests_is_bounded(srv: ModelServer) -> None:
    with pytest.raises(TimeoutError):
        await srv.wait_for_requests(1, timeout=0.05)


# -- replies -----------------------------------------------------------------------------------


async def test_echo_remembers_name(oc: ollama.AsyncClient, ac: openai.AsyncOpenAI) -> None:
    first = await oc.chat(
        model="llama3.2", messages=[{"role": "user", "content": "My name is Ana."}]
    )
    assert first.message.content == "You said: My name is Ana."  # only *earlier* messages count
    history = [
        {"role": "user", "content": "My name is Ana."},
        {"role": "assistant", "content": first.message.content},
        {"role": "user", "content": "What is my name?"},
    ]
    again = await oc.chat(model="llama3.2", messages=history)
    assert again.message.content == "You said: What is my name? Your name is Ana."

    with_memory = [
        {"role": "system", "content": "Facts about the user: 我叫小明。"},
        {"role": "user", "content": "我叫什么名字？"},
    ]
    chunks = await openai_stream(ac, with_memory)
    assert openai_text(chunks) == "You said: 我叫什么名字？ Your name is 小明."


async def test_reply_callables(srv: ModelServer, oc: ollama.AsyncClient) -> None:
    seen: list[Recorded] = []

    def sync_reply(rec: Recorded) -> str:
        seen.append(rec)
        return f"model={rec.model}"

    async def async_reply(rec: Recorded) -> str:
        return rec.last_user_message.upper()

    srv.reply = sync_reply
    assert (await oc.chat(model="qwen2.5", messages=HI)).message.content == "model=qwen2.5"
    assert seen == srv.requests
    srv.reply = async_reply
    assert (await oc.chat(model="qwen2.5", messages=HI)).message.content == "HELLO THERE"


# -- standalone process ------------------------------------------------------------------------


async def test_runs_as_subprocess() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.model_server",
        "--port",
        "0",
        "--reply",
        "pong",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        assert line.startswith("READY http://127.0.0.1:")
        url = line.split()[1]
        async with ollama.AsyncClient(host=url, timeout=5) as oc:
            assert (await oc.chat(model="llama3.2", messages=HI)).message.content == "pong"
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            resp = await http.post("/_fake/config", json={"fault": "http500"})
            assert resp.status_code == 200
            assert (await http.post("/api/chat", json={"model": "llama3.2"})).status_code == 500
            assert len((await http.get("/_fake/requests")).json()) == 2
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 5) is not None
