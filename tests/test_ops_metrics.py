"""/metrics and /healthz: what a scraper and a supervisor see after real exchanges."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.app import open_service
from bot.health import Health, serve
from bot.service import ChatService
from bot.slots import ModelSlots, Priority
from tests.conftest import SettingsFactory, ask, free_port
from tests.fakes.model_server import ModelServer
from tests.test_console import ROOT, bot_env

USER = "u-8472913"  # must never appear in a label


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by name and sorted labels, via prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def get(url: str) -> tuple[int, str]:
    async with asyncio.timeout(10), aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, await r.text()


@pytest.fixture
async def served(make_settings: SettingsFactory) -> AsyncIterator[tuple[ChatService, str]]:
    async with open_service(make_settings(LLM_RETRIES=0)) as service:
        health = Health(service.store.applied_migrations, service.provider.list_models,
                        lambda: {"console": True}, cache_seconds=0, metrics=service.metrics)
        async with serve(service.metrics, health, "127.0.0.1", 0) as port:
            yield service, f"http://127.0.0.1:{port}"


async def test_metrics_count_what_happened(served: tuple[ChatService, str],
                                           model_server: ModelServer) -> None:
    service, base = served
    replies = [await ask(service, f"hello {i}", user=USER, platform="telegram")
               for i in range(3)]
    model_server.faults = ["http500"]
    failed = await ask(service, "this one fails", user=USER, platform="telegram")
    assert all(r.startswith("You said: hello") for r in replies)
    assert "⚠️" in failed

    status, text = await get(base + "/metrics")
    assert status == 200
    got = samples(text)
    ok = ("memorybot_exchanges_total",
          (("model", "llama3.2"), ("platform", "telegram"), ("status", "ok")))
    err = ("memorybot_exchanges_total",
           (("model", "llama3.2"), ("platform", "telegram"), ("status", "error")))
    assert got[ok] == 3 and got[err] == 1
    # Histograms: three ok replies observed, every bucket cumulative up to +Inf.
    assert got[("memorybot_reply_seconds_count", (("model", "llama3.2"),))] == 3
    assert got[("memorybot_reply_seconds_bucket", (("le", "+Inf"), ("model", "llama3.2")))] == 3
    assert got[("memorybot_first_token_seconds_count", (("model", "llama3.2"),))] == 3
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in got.items()
                     if k[0] == "memorybot_reply_seconds_bucket")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    # Tokens equal what the audit log recorded from the server's own counts.
    rows = await service.store.audit_query(_all(), 10)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error"]
    prompt = sum(r["prompt_tokens"] or 0 for r in rows)
    assert prompt > 0
    assert got[("memorybot_tokens_total", (("kind", "prompt"), ("model", "llama3.2")))] == prompt
    assert got[("memorybot_replies_in_flight", ())] == 0
    assert got[("memorybot_turns_waiting_for_model", ())] == 0
    # No user, chat or conversation id in any label.
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert not any(USER in v for v in s.labels.values()), s


async def test_refusals_and_gauges(make_settings: SettingsFactory,
                                   model_server: ModelServer) -> None:
    async with open_service(make_settings(RATE_LIMIT_PER_MINUTE=1, LLM_CONCURRENCY=1,
                                          ALLOWED_USERS="telegram:1,telegram:2")) as service:
        slots = service._slots = _WatchedSlots(1)
        await ask(service, "first", user="1", platform="telegram")
        assert "too fast" in await ask(service, "second", user="1", platform="telegram")
        assert "private" in await ask(service, "hi", user="9", platform="telegram")
        # One reply holds the only model slot; a second turn waits for it.
        model_server.gate = asyncio.Event()
        held = asyncio.create_task(ask(service, "slow", user="2", platform="telegram"))
        await model_server.wait_for_requests(2)
        waiting = asyncio.create_task(ask(service, "queued", user="3", platform="console"))
        async with asyncio.timeout(5):
            await slots.blocked.wait()  # the second turn waits for the slot
        got = samples(_scrape(service))
        assert got[("memorybot_replies_in_flight", ())] == 2
        assert got[("memorybot_turns_waiting_for_model", ())] == 1
        model_server.gate.set()
        async with asyncio.timeout(10):
            await asyncio.gather(held, waiting)
        got = samples(_scrape(service))
    assert got[("memorybot_refused_messages_total",
                (("kind", "rate_limited"), ("platform", "telegram")))] == 1
    assert got[("memorybot_refused_messages_total",
                (("kind", "not_allowed"), ("platform", "telegram")))] == 1
    assert got[("memorybot_replies_in_flight", ())] == 0


class _WatchedSlots(ModelSlots):
    """The service's model slots, telling when a turn has to wait for one."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.blocked = asyncio.Event()

    async def acquire(self, priority: Priority) -> None:
        if not self._free:
            self.blocked.set()
        await super().acquire(priority)


def _scrape(service: ChatService) -> str:
    from prometheus_client import generate_latest

    return generate_latest(service.metrics.registry).decode()


def _all() -> Any:
    from storage.audit_queries import AuditFilter

    return AuditFilter()


async def test_healthz_ok_then_model_down_then_database_gone(
        served: tuple[ChatService, str], model_server: ModelServer) -> None:
    service, base = served
    status, text = await get(base + "/healthz")
    assert status == 200
    assert json.loads(text) == {"status": "ok", "database": "ok", "model_server": "ok",
                                "adapters": {"console": "connected"}}
    _, text = await get(base + "/metrics")
    assert samples(text)[("memorybot_model_server_up", ())] == 1
    await model_server.close()  # down: reported, still healthy
    status, text = await get(base + "/healthz")
    assert status == 200 and json.loads(text)["model_server"] == "unreachable"
    _, text = await get(base + "/metrics")
    assert samples(text)[("memorybot_model_server_up", ())] == 0
    assert samples(text)[("memorybot_database_up", ())] == 1
    await service.store.close()  # the database is gone
    status, text = await get(base + "/healthz")
    body = json.loads(text)
    assert status == 503 and body["status"] == "unhealthy"
    assert body["database"].startswith("error: ")


async def test_healthz_503_without_a_connected_adapter_and_cached() -> None:
    calls: list[str] = []

    async def database() -> None:
        calls.append("db")

    async def model() -> None:
        raise ConnectionError("refused")

    health = Health(database, model, lambda: {"telegram": False, "discord": False},
                    cache_seconds=60)
    code, body = await health.report()
    assert code == 503 and body["adapters"] == {"telegram": "disconnected",
                                                "discord": "disconnected"}
    assert body["database"] == "ok" and body["model_server"] == "unreachable"
    await asyncio.gather(*(health.report() for _ in range(5)))
    assert calls == ["db"]  # cached: the checks ran once


async def test_running_bot_serves_metrics_and_health(tmp_path: Path,
                                                     model_server: ModelServer) -> None:
    port = free_port()
    env = bot_env(tmp_path, model_server, METRICS_PORT=str(port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "console", cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert proc.stdin and proc.stdout
    try:
        proc.stdin.write(b"hello there\n")
        await proc.stdin.drain()
        async with asyncio.timeout(20):
            line = await proc.stdout.readline()
        assert line.decode().strip() == "You said: hello there"
        status, text = await get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200, text
        assert json.loads(text)["adapters"] == {"console": "connected"}
        status, text = await get(f"http://127.0.0.1:{port}/metrics")
        got = samples(text)
        assert got[("memorybot_exchanges_total",
                    (("model", "llama3.2"), ("platform", "console"), ("status", "ok")))] == 1
    finally:
        proc.stdin.close()
        async with asyncio.timeout(20):
            code = await proc.wait()
    assert code == 0, (await proc.stderr.read()).decode() if proc.stderr else ""


async def test_summary_records_keep_counts_and_timing_but_only_a_prompt_head(
        make_settings: SettingsFactory, model_server: ModelServer) -> None:
    from bot.retention import SUMMARY_INPUT_HEAD
    from tests.test_memory import is_summary_call, reply_or_summary

    model_server.reply = reply_or_summary
    async with open_service(make_settings(CONTEXT_TOKENS=1024, REPLY_TOKENS=128)) as service:
        for i in range(16):
            await ask(service, f"my name is Ana, message {i} about a long topic " * 3)
            async with asyncio.timeout(10):
                await service.memory.wait_idle()
        rows = await service.store.audit_query(_summaries(), 100)
        got = samples(_scrape(service))
    sent = [r for r in model_server.requests if is_summary_call(r)]
    assert rows and len(rows) == len(sent)
    longest_sent = max(len(r.messages[-1]["content"]) for r in sent)
    assert longest_sent > SUMMARY_INPUT_HEAD  # the model got the whole fold prompt
    for r in rows:
        assert len(r["user_input"]) <= SUMMARY_INPUT_HEAD + 60
        assert r["prompt_tokens"] and r["completion_tokens"] and r["response_time"]
    assert any("more characters not kept" in r["user_input"] for r in rows)
    assert got[("memorybot_background_calls_total",
                (("kind", "summary"), ("model", "llama3.2"), ("status", "ok")))] == len(rows)


def _summaries() -> Any:
    from storage.audit_queries import AuditFilter

    return AuditFilter(kind="summary")
