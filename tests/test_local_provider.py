"""LLM_PROVIDER=local: the in-process model's thread, queue, cancel and counts, with a fake Llama.

The fake stands in for `llama_cpp.Llama` (the suite never needs
llama-cpp-python): one token per UTF-8 byte, so exact counts are checkable,
and it records which thread generated, how many generations ran at once and
when a generation was closed. The console's no-server hint runs through the
real `python -m bot console`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from adapters.console import NO_SERVER_HINT
from bot.providers import make_provider
from bot.providers.base import ProviderError, Usage
from bot.providers.local_provider import LoadedModel, LocalProvider, Rendered
from bot.service import ChatService
from bot.settings import Settings, load_settings
from storage import open_store
from tests.conftest import SettingsFactory, ask, incoming
from tests.fakes.model_server import ModelServer
from tests.test_console import bot_env, run_bot

WAIT = 5.0  # every wait on the worker thread is bounded by this


class FakeLlama:
    """Tokens are UTF-8 bytes; the reply is `reply` split into words, or endless."""

    def __init__(self, *, n_ctx: int = 2048, reply: str = "Hello from the local model",
                 endless: bool = False, pace: threading.Event | None = None) -> None:
        self.metadata = {"general.size_label": "270M", "general.file_type": "15"}
        self._n_ctx = n_ctx
        self.reply = reply
        self.endless = endless
        self.pace = pace  # if set, each token after the first waits for it
        self.prompts: list[list[int]] = []
        self.threads: set[str] = set()
        self.max_tokens: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self.generated = 0
        self.closed = threading.Event()  # the last generation was closed
        self._lock = threading.Lock()

    def n_ctx(self) -> int:
        return self._n_ctx

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return ([0] if add_bos else []) + list(text)

    def create_completion(self, prompt: list[int], **kw: Any) -> Iterator[dict[str, Any]]:
        self.prompts.append(prompt)
        self.max_tokens.append(kw["max_tokens"])
        self.threads.add(threading.current_thread().name)
        self.closed.clear()
        return self._tokens(kw["max_tokens"])

    def _tokens(self, limit: int) -> Iterator[dict[str, Any]]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            words = [w + " " for w in self.reply.split()]
            i = 0
            while self.endless or i < len(words):
                if i >= limit:
                    yield {"choices": [{"text": "", "finish_reason": "length"}]}
                    return
                if i and self.pace is not None:
                    self.pace.wait(WAIT)
                self.generated += 1
                yield {"choices": [{"text": words[i % len(words)], "finish_reason": None}]}
                i += 1
            yield {"choices": [{"text": "", "finish_reason": "stop"}]}
        finally:
            with self._lock:
                self.running -= 1
            self.closed.set()


def render(messages: list[dict[str, Any]]) -> Rendered:
    """A template in the shape of Gemma's: turns marked, the model's turn opened.

    Its markers cost three tokens a turn (Gemma's cost five, which the bot's
    per-message allowance covers as well)."""
    body = "".join(f"<{m['role'][0]}{m['content']}\n" for m in messages)
    return Rendered(prompt="^" + body + "<m", stop=["\n"])


def local(fake: FakeLlama, loads: list[str] | None = None) -> LocalProvider:
    def loader() -> LoadedModel:
        if loads is not None:
            loads.append(threading.current_thread().name)
        return LoadedModel(fake, render)

    return LocalProvider(model="gemma-3-270m", path=None, n_ctx=fake.n_ctx(), threads=None,
                         loader=loader)


@contextlib.asynccontextmanager
async def local_service(settings: Settings, provider: LocalProvider
                        ) -> AsyncIterator[ChatService]:
    store = open_store(settings.DATABASE_URL)
    await store.open()
    svc = ChatService(settings, store, provider)
    try:
        yield svc
    finally:
        await svc.aclose()
        await store.close()


async def collect(provider: LocalProvider, text: str, max_tokens: int = 64
                  ) -> list[str | Usage]:
    return [item async for item in provider.stream(
        "gemma-3-270m", [{"role": "user", "content": text}], num_ctx=0, max_tokens=max_tokens)]


async def test_local_model_answers_with_its_template_and_exact_counts(
    make_settings: SettingsFactory
) -> None:
    fake = FakeLlama(n_ctx=1024)
    loads: list[str] = []
    settings = make_settings(LLM_PROVIDER="local", REPLY_TOKENS=64)
    async with local_service(settings, local(fake, loads)) as svc:
        reply = await ask(svc, "hi there")
        listing = await ask(svc, "/model")
        rows = await svc.store.audit_log(5)
    assert reply == "Hello from the local model "
    assert settings.LLM_MODEL == "gemma-3-270m"  # the model's name, not Ollama's default
    assert "`gemma-3-270m`: window 1,024 tokens, 270M, Q4_K_M" in listing
    # One system message, rendered by the model's template, generated off the loop.
    text = bytes(fake.prompts[0]).decode()
    assert text.startswith("^<s") and text.endswith("\n<uhi there\n<m")
    assert fake.threads == {"local-model_0"} and loads == ["local-model_0"]
    assert threading.current_thread().name not in fake.threads
    # Exact counts: the prompt as the model saw it, the reply by its tokenizer.
    assert rows[-1]["prompt_tokens"] == len(fake.prompts[0])
    assert rows[-1]["completion_tokens"] == len(reply.encode())
    assert rows[-1]["status"] == "ok"


async def test_count_tokens_is_the_models_tokenizer_and_info_its_window() -> None:
    fake = FakeLlama(n_ctx=777)
    provider = local(fake)
    try:
        assert await provider.count_tokens("gemma-3-270m", "1" * 3500) == 3500
        assert await provider.count_tokens("gemma-3-270m", "大型") == 6  # bytes here
        info = await provider.model_info("gemma-3-270m")
        assert await provider.list_models() == ["gemma-3-270m"]
    finally:
        await provider.close()
    assert (info.context_length, info.parameter_size, info.quantization) == (777, "270M",
                                                                           "Q4_K_M")


async def test_generations_run_one_at_a_time_first_come_first_served() -> None:
    fake = FakeLlama()
    provider = local(fake)
    try:
        async with asyncio.timeout(WAIT):
            results = await asyncio.gather(*(collect(provider, f"call {i}") for i in range(4)))
    finally:
        await provider.close()
    assert fake.most_at_once == 1
    assert [bytes(p).decode().split("<u")[1][:6] for p in fake.prompts] == \
        ["call 0", "call 1", "call 2", "call 3"]
    for got in results:
        assert "".join(x for x in got if isinstance(x, str)) == "Hello from the local model "
        assert isinstance(got[-1], Usage) and got[-1].stop_reason == "stop"


async def test_a_stopped_reply_stops_generating_and_frees_the_model(
    make_settings: SettingsFactory
) -> None:
    pace = threading.Event()
    fake = FakeLlama(endless=True, pace=pace)
    provider = local(fake)
    settings = make_settings(LLM_PROVIDER="local")
    async with local_service(settings, provider) as svc:
        reply = await svc.handle(incoming("go on forever"))
        shown = []
        async with asyncio.timeout(WAIT), contextlib.aclosing(reply.deltas()) as deltas:
            async for delta in deltas:
                shown.append(delta)
                reply.cancel()  # what /stop does (the core then adds its stopped mark)
        pace.set()  # let the model run on: only the flag can stop it now
        assert await asyncio.to_thread(fake.closed.wait, WAIT)
        generated = fake.generated
        fake.endless, fake.pace = False, None
        after = await asyncio.wait_for(ask(svc, "next"), WAIT)
        rows = await svc.store.audit_log(5)
    assert shown == ["Hello ", "\n\n⏹ stopped"] and reply.outcome.value == "cancelled"
    assert generated < 50  # stopped within a few tokens, not at the reply limit (512)
    assert after == "Hello from the local model "  # the worker is free again
    assert [r["status"] for r in rows] == ["cancelled", "ok"]


async def test_a_call_stopped_while_it_waits_never_reaches_the_model() -> None:
    pace = threading.Event()
    fake = FakeLlama(pace=pace)
    provider = local(fake)
    try:
        first = provider.stream("m", [{"role": "user", "content": "first"}], num_ctx=0,
                                max_tokens=64)
        async with asyncio.timeout(WAIT):
            assert await anext(first) == "Hello "  # the worker is busy with it now
            second = provider.stream("m", [{"role": "user", "content": "second"}],
                                     num_ctx=0, max_tokens=64)
            waiting = asyncio.create_task(anext(second))
            await asyncio.sleep(0)  # one step: it submits its job, then waits on its queue
            assert len(provider._jobs) == 2  # queued behind the first
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await second.aclose()
            pace.set()
            rest = [x async for x in first]
            third = await collect(provider, "third")
    finally:
        await provider.close()
    asked = [bytes(p).decode() for p in fake.prompts]
    assert len(asked) == 2 and "first" in asked[0] and "third" in asked[1]
    assert "".join(x for x in rest if isinstance(x, str)) == "from the local model "
    assert isinstance(third[-1], Usage)


async def test_reply_timeout_stops_the_local_model(make_settings: SettingsFactory) -> None:
    pace = threading.Event()  # never set: each token after the first waits WAIT
    fake = FakeLlama(endless=True, pace=pace)
    settings = make_settings(LLM_PROVIDER="local", LLM_REPLY_TIMEOUT=0.3)
    async with local_service(settings, local(fake)) as svc:
        reply = await asyncio.wait_for(ask(svc, "hello"), WAIT)
        pace.set()
        assert await asyncio.to_thread(fake.closed.wait, WAIT)
        rows = await svc.store.audit_log(5)
    assert reply.startswith("Hello ") and "took longer than 0.3 seconds" in reply
    assert rows[-1]["status"] == "error" and "LLM_REPLY_TIMEOUT" in rows[-1]["error"]
    assert fake.generated <= 3


async def test_long_conversation_and_3500_digits_never_overflow_the_window(
    make_settings: SettingsFactory
) -> None:
    fake = FakeLlama(n_ctx=600, reply="fine thanks")
    settings = make_settings(LLM_PROVIDER="local", CONTEXT_TOKENS=4096, REPLY_TOKENS=64,
                             MEMORY_STRATEGY="truncate")
    async with local_service(settings, local(fake)) as svc:
        replies = [await ask(svc, f"message {i} " + "some words " * 10) for i in range(12)]
        digits = await ask(svc, "1" * 3500)
        rows = await svc.store.audit_log(20)
    assert replies == ["fine thanks "] * 12
    assert all(len(p) + 64 <= 600 for p in fake.prompts)  # prompt + reply within n_ctx
    assert len(fake.prompts) == 12  # the digits never reached the model
    # Refused up front by the exact count, as too long for the window left.
    assert "send something shorter" in digits and "most I can take is about" in digits
    assert [r["status"] for r in rows] == ["ok"] * 12 + ["rejected"]


async def test_a_prompt_too_long_for_the_model_is_refused_before_any_work() -> None:
    fake = FakeLlama(n_ctx=100)
    provider = local(fake)
    try:
        with pytest.raises(ProviderError) as caught:
            await collect(provider, "x" * 80, max_tokens=40)
        shortened = await collect(provider, "x" * 70, max_tokens=40)
    finally:
        await provider.close()
    assert caught.value.kind == "too_long" and caught.value.window == 100
    assert len(fake.prompts) == 1
    # A little over: answered with the room left (what llama-cpp-python does).
    assert fake.max_tokens == [100 - len(fake.prompts[0])] == [24]
    assert isinstance(shortened[-1], Usage)


async def test_without_llama_cpp_the_user_is_told_how_to_install(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF")
    settings = make_settings(LLM_PROVIDER="local", LOCAL_MODEL=str(model), LOCAL_CONTEXT=2048,
                             LOCAL_THREADS=2)
    provider = make_provider(settings)
    assert isinstance(provider, LocalProvider)
    assert (provider._path, provider._n_ctx, provider._threads) == (str(model), 2048, 2)
    async with local_service(settings, provider) as svc:
        reply = await ask(svc, "hello")
        rows = await svc.store.audit_log(5)
    assert settings.LLM_MODEL == "tiny"
    assert "pip install -e '.[local]'" in reply
    assert rows[-1]["status"] == "error" and "llama_cpp not importable" in rows[-1]["error"]


def test_local_settings_validate() -> None:
    with pytest.raises(Exception, match="LOCAL_CONTEXT"):
        load_settings(None, LLM_PROVIDER="local", LOCAL_CONTEXT=10)
    named = load_settings(None, LLM_PROVIDER="local", LLM_MODEL="mine")
    assert named.LLM_MODEL == "mine"  # a name given is kept
    assert load_settings(None, LLM_PROVIDER="ollama").LLM_MODEL == "llama3.2"


async def test_console_says_how_to_get_a_model_when_no_server_answers(
    tmp_path: Path, model_server: ModelServer
) -> None:
    env = bot_env(tmp_path, model_server, OLLAMA_HOST="http://127.0.0.1:9")
    code, out, err = await run_bot(["console"], env, "hello\n")
    assert code == 0, err
    assert out.splitlines() == [
        "⚠️ The model server can't be reached right now. Please try again in a moment."]
    hint = NO_SERVER_HINT.splitlines()
    assert len(hint) == 3 and all(line in err.splitlines() for line in hint)
    assert "ollama pull llama3.2" in hint[0] and "OPENAI_BASE_URL" in hint[1]
    assert "pip install -e '.[local]'" in hint[2] and "LLM_PROVIDER=local" in hint[2]
    # A server that answers gets no hint: test_console.py's
    # test_env_example_copied_to_env_runs_the_console asserts it on its run.
