"""Telegram: python-telegram-bot in, the core's replies out."""
