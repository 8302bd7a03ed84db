"""Shared fixtures: the model stand-in, settings on a temp database, a service."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from bot.app import open_service
from bot.messages import Incoming
from bot.service import ChatService
from bot.settings import Settings, load_settings
from tests.fakes.model_server import ModelServer

SettingsFactory = Callable[..., Settings]

# Each platform's test harness lives beside its adapter; its fixtures serve every test.
pytest_plugins = ("adapters.telegram.testing", "adapters.discord.testing")


@pytest.fixture
async def model_server() -> AsyncIterator[ModelServer]:
    async with ModelServer() as srv:
        yield srv


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'bot.db'}"


@pytest.fixture
def make_settings(
    model_server: ModelServer, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> SettingsFactory:
    """Settings for a test: temp database, provider pointed at the stand-in, no .env."""
    # The machine's own environment must not leak into a test.
    for name in ("TELEGRAM_TOKEN", "DISCORD_TOKEN", "OPENAI_API_KEY", "OPENAI_BASE_URL",
                 "DATABASE_URL", "OLLAMA_HOST", "LLM_PROVIDER", "LLM_MODEL", "LLM_MODELS"):
        monkeypatch.delenv(name, raising=False)

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "DATABASE_URL": db_url,
            "OLLAMA_HOST": model_server.url,
            "OPENAI_BASE_URL": model_server.url + "/v1",
            "LLM_RETRIES": 0,
            "RATE_LIMIT_PER_MINUTE": 0,
            "STREAM_EDIT_INTERVAL": 0.05,
            "SHUTDOWN_GRACE": 1.0,
            "LLM_TIMEOUT": 10.0,
            "LLM_STALL_TIMEOUT": 10.0,
        }
        values.update(overrides)
        return load_settings(None, **values)

    return make


@pytest.fixture
async def service(make_settings: SettingsFactory) -> AsyncIterator[ChatService]:
    async with open_service(make_settings()) as svc:
        yield svc


def free_port() -> int:
    """A port nothing listens on right now, for a server a test starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def incoming(text: str, *, user: str = "1", place: str | None = None,
             platform: str = "console", name: str = "Tester") -> Incoming:
    return Incoming(platform=platform, user_id=user, display_name=name,
                    chat_id=place or f"dm-{user}", place_id=place, text=text)


async def ask(service: ChatService, text: str, **kw: Any) -> str:
    """The whole reply the user would see to `text`."""
    out = []
    reply = await service.handle(incoming(text, **kw))
    async with contextlib.aclosing(reply.deltas()) as deltas:
        async for delta in deltas:
            out.append(delta)
    return "".join(out)
