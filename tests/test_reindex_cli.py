"""`python -m bot reindex` as the operator runs it: plain progress lines, --user, errors."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest

from bot import operator_commands
from storage import open_store
from tests.conftest import SettingsFactory
from tests.fakes.model_server import ModelServer

EMBED = "all-minilm"


async def test_reindex_command_prints_plain_progress_when_not_a_terminal(
    model_server: ModelServer, make_settings: SettingsFactory, tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.test_console import bot_env, run_bot

    model_server.models.append(EMBED)
    env = bot_env(tmp_path, model_server, EMBED_MODEL=EMBED)
    code, _, _ = await run_bot(["console"], env, "my sister moved to Tainan\n")
    assert code == 0
    code, _, err = await run_bot(["reindex"], env)
    assert code == 0
    # Words were indexed with the exchange; the console's embeddings may have been
    # cut off at exit: reindex does what is missing, and says so in plain lines.
    assert "words index: 0/0 messages" in err and "embedded with all-minilm" in err
    assert "\r" not in err  # no bar drawn into a file
    settings = make_settings(DATABASE_URL=env["DATABASE_URL"], EMBED_MODEL=EMBED)
    assert await operator_commands.reindex(settings, "bad") == 2
    assert "PLATFORM:USER_ID" in capsys.readouterr().err
    assert await operator_commands.reindex(settings, "console:nobody") == 0
    assert "words index: 0/0 messages" in capsys.readouterr().err
    store = open_store(env["DATABASE_URL"], pool_size=2)
    await store.open()
    try:
        assert await store.count_missing(EMBED) == 0 and await store.count_missing(None) == 0
        assert await store.count_messages(1) == 2
    finally:
        await store.close()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_reindex_draws_the_shared_rich_bar_on_a_terminal(
    model_server: ModelServer, make_settings: SettingsFactory,
) -> None:
    from bot.app import open_service
    from bot.reindex import reindex
    from tests.conftest import ask

    model_server.models.append(EMBED)
    async with open_service(make_settings()) as service:  # no EMBED_MODEL: words only
        for i in range(3):
            await ask(service, f"row {i}")
    settings = make_settings(EMBED_MODEL=EMBED)
    store = open_store(settings.DATABASE_URL)
    await store.open()
    tty = _Terminal()
    try:
        assert await reindex(settings, store, stream=tty) == 0
        assert await store.count_missing(EMBED) == 0
    finally:
        await store.close()
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", tty.getvalue())  # colours off
    # bot.progress's rich bar (the one migrate, copy-db and backup draw), not plain lines.
    assert "━" in shown and "embeddings (all-minilm) ━" in shown and "6/6 messages" in shown
    assert "embeddings (all-minilm): " not in shown  # the plain form is for files
    assert sum(len(r["input"]) for r in model_server.embeddings.requests) == 6
