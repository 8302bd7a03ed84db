"""Chat commands, implemented once for every platform."""

from __future__ import annotations

COMMANDS: list[tuple[str, str]] = [
    ("help", "What the bot does and its commands"),
    ("reset", "Forget this conversation"),
    ("model", "Show your model, or pick one: /model NAME"),
    ("memory", "What the bot remembers of this conversation"),
    ("stats", "Usage figures (admins only)"),
]
# /start is Telegram's greeting; it answers like /help.
KNOWN = {name for name, _ in COMMANDS} | {"start"}


def parse_command(text: str) -> tuple[str, str] | None:
    """`/name@bot args` → ("name", "args"); None if `text` is not a command."""
    if not text.startswith("/") or len(text) < 2:
        return None
    head, _, args = text[1:].partition(" ")
    if "\n" in head:
        head, _, more = head.partition("\n")
        args = f"{more} {args}".strip()
    name = head.split("@", 1)[0].lower()
    if not name or not all(ch.isalnum() or ch == "_" for ch in name):
        return None
    return name, args.strip()


def help_text(model: str) -> str:
    lines = [
        "I'm a chat assistant that remembers our conversation, here and across restarts "
        "(each person has their own memory). 我也能用中文聊天。",
        "",
        "Commands:",
    ]
    lines += [f"/{name} — {desc}" for name, desc in COMMANDS]
    lines += ["", f"Your model: `{model}`"]
    return "\n".join(lines)
