"""Inline keyboards for a Reply's choices: buttons, their callback data, and reading a press.

callback_data is `<prefix>:<owner user id>:<key>` (or `<prefix>:<owner>:#<hash>`
when a key would not fit Telegram's 64 bytes); the prefix names the command the
choices belong to (`m` for /model). It is untrusted input: a press is only acted
on when the presser is the owner and the key is one the core offers that user
right now, so a forged or stale button can do nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from bot.i18n import N_
from bot.reply import Choices, key_ref, refers_to

PREFIX = "m"  # /model's choices
# Short prefixes keep the key's room in 64 bytes; a command not listed uses its name.
PREFIXES = {"model": PREFIX, "persona": "p", "language": "l"}
STOP_PREFIX = "x"  # the Stop button of a streaming answer: x:<owner>:<reply id>
STOP_LABEL = N_("⏹ Stop")
MAX_CALLBACK_BYTES = 64
MAX_BUTTONS = 60  # a keyboard longer than this is unusable on a phone


@dataclass(frozen=True, slots=True)
class ChoicePress:
    owner_id: int  # who asked for the menu
    key: str  # an option's key, or "#<hash>" of one
    command: str = "model"  # the command whose choices these are



def _prefix(command: str) -> str:
    return PREFIXES.get(command, command)


def encode_choice(owner_id: int, key: str, command: str = "model") -> str:
    head = f"{_prefix(command)}:{owner_id}:"
    return head + key_ref(key, MAX_CALLBACK_BYTES - len(head.encode("utf-8")))


def decode_choice(data: str | None) -> ChoicePress | None:
    """The press, or None for data these menus never produced."""
    if not data:
        return None
    prefix, _, rest = data.partition(":")
    owner, _, key = rest.partition(":")
    commands = {p: c for c, p in PREFIXES.items()}
    if prefix not in commands or not owner.isdigit() or not key:
        return None
    return ChoicePress(int(owner), key, commands[prefix])


def resolve_choice(key: str, available: Sequence[str]) -> str | None:
    """The option a button's key names, if it is still on offer."""
    return next((option for option in available if refers_to(key, option)), None)


def choices_keyboard(owner_id: int, choices: Choices) -> InlineKeyboardMarkup | None:
    options = list(choices.options)[:MAX_BUTTONS]
    if not options:
        return None
    per_row = 1 if len(options) <= 6 else 2
    buttons = [
        InlineKeyboardButton(("✓ " if option.current else "") + option.label,
                             callback_data=encode_choice(owner_id, option.key, choices.command))
        for option in options
    ]
    return InlineKeyboardMarkup([buttons[i:i + per_row] for i in range(0, len(buttons), per_row)])


def stop_keyboard(owner_id: int, reply_id: int,
                  label: str = STOP_LABEL) -> InlineKeyboardMarkup:
    """The one-button keyboard a reply carries while it streams (`label`: STOP_LABEL in
    the asker's language)."""
    return InlineKeyboardMarkup([[InlineKeyboardButton(
        label, callback_data=f"{STOP_PREFIX}:{owner_id}:{reply_id}")]])


def decode_stop(data: str | None) -> tuple[int, int] | None:
    """(owner id, reply id) of a Stop press, or None for any other data."""
    prefix, _, rest = (data or "").partition(":")
    owner, _, reply = rest.partition(":")
    if prefix != STOP_PREFIX or not owner.isdigit() or not reply.isdigit():
        return None
    return int(owner), int(reply)
