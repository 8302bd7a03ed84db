"""Keep the bot token out of every log line while the Telegram adapter runs.

python-telegram-bot and httpx put the token in request URLs ("HTTP Request:
POST https://…/bot<TOKEN>/getUpdates", "Set Bot API URL: …"). httpx is
quietened to WARNING, and a redacting filter is put on the root handlers and
on the client libraries' loggers (a filter on a logger does not see its
children's records, so each existing one gets it). bot.logging_setup
redacts too; this also covers handlers set up by others, such as pytest's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from bot.logging_setup import RedactSecrets

_CHATTY = ("httpx", "httpcore")
_LIBRARIES = ("telegram", "httpx", "httpcore")


@contextlib.contextmanager
def secrets_kept_out_of_logs(secrets: Sequence[str]) -> Iterator[None]:
    redactor = RedactSecrets(secrets)
    targets: list[logging.Filterer] = list(logging.getLogger().handlers)
    manager = logging.Logger.manager
    targets += [logging.getLogger(name) for name in list(manager.loggerDict)
                if name.split(".")[0] in _LIBRARIES]
    targets += [logging.getLogger(name) for name in _LIBRARIES]
    levels = {name: logging.getLogger(name).level for name in _CHATTY}
    for name in _CHATTY:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    for target in targets:
        target.addFilter(redactor)
    try:
        yield
    finally:
        for target in targets:
            target.removeFilter(redactor)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
