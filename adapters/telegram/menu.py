"""The /model inline keyboard: buttons, their callback data, and reading a press.

callback_data is `m:<owner user id>:<model>` (or `m:<owner>:#<hash>` when a
model name would not fit Telegram's 64 bytes). It is untrusted input: a press
is only acted on when the presser is the owner and the model is one the core
offers that user right now, so a forged or stale button can do nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from bot.messages import ModelChoices

PREFIX = "m"
MAX_CALLBACK_BYTES = 64
MAX_BUTTONS = 60  # a keyboard longer than this is unusable on a phone


@dataclass(frozen=True, slots=True)
class ModelPress:
    owner_id: int  # who asked for the menu
    key: str  # a model name, or "#<hash>" of one


def _digest(model: str) -> str:
    return "#" + hashlib.sha256(model.encode("utf-8")).hexdigest()[:20]


def encode_choice(owner_id: int, model: str) -> str:
    data = f"{PREFIX}:{owner_id}:{model}"
    if len(data.encode("utf-8")) <= MAX_CALLBACK_BYTES and not model.startswith("#"):
        return data
    return f"{PREFIX}:{owner_id}:{_digest(model)}"


def decode_choice(data: str | None) -> ModelPress | None:
    """The press, or None for data this menu never produced."""
    if not data:
        return None
    prefix, _, rest = data.partition(":")
    owner, _, key = rest.partition(":")
    if prefix != PREFIX or not owner.isdigit() or not key:
        return None
    return ModelPress(int(owner), key)


def resolve_choice(key: str, available: Sequence[str]) -> str | None:
    """The model a button's key names, if it is still on offer."""
    for model in available:
        if key == model or key == _digest(model):
            return model
    return None


def model_keyboard(owner_id: int, choices: ModelChoices) -> InlineKeyboardMarkup | None:
    models = list(choices.available)[:MAX_BUTTONS]
    if not models:
        return None
    per_row = 1 if len(models) <= 6 else 2
    buttons = [
        InlineKeyboardButton(("✓ " if model == choices.current else "") + model,
                             callback_data=encode_choice(owner_id, model))
        for model in models
    ]
    return InlineKeyboardMarkup([buttons[i:i + per_row] for i in range(0, len(buttons), per_row)])
