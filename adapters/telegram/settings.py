"""The Telegram settings' parsing: the token, and the webhook secret's rules."""

from __future__ import annotations

import re

from bot.settings import Settings, SettingsError

_SECRET_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,256}")


def bot_token(settings: Settings) -> str:
    token = settings.TELEGRAM_TOKEN.get_secret_value() if settings.TELEGRAM_TOKEN else ""
    if not token:
        raise SettingsError("TELEGRAM_TOKEN is empty")
    return token


def webhook_secret(settings: Settings) -> str:
    """The webhook's secret token; "" with long polling. Telegram's rules, checked early."""
    if not settings.TELEGRAM_WEBHOOK_URL:
        return ""
    secret = settings.TELEGRAM_WEBHOOK_SECRET
    value = secret.get_secret_value() if secret else ""
    if not value:
        raise SettingsError("TELEGRAM_WEBHOOK_SECRET is required when "
                            "TELEGRAM_WEBHOOK_URL is set (requests without it are "
                            "refused)")
    if not _SECRET_TOKEN.fullmatch(value):
        raise SettingsError("TELEGRAM_WEBHOOK_SECRET=<hidden>: allowed: 1-256 "
                            "characters A-Z, a-z, 0-9, _ and -")
    return value
