"""Chat commands, declared once: name, description, arguments, who may run them, privacy.

A command is a handler marked with `@command(...)` (like errbot's `@botcmd` or
opsdroid's `@register_event`); `Commands.of(cls)` collects the marked handlers
of a class in the order they are written. The core dispatches them, and every
platform builds its menu from the same declaration: Telegram's setMyCommands,
Discord's app commands (with autocomplete for arguments that offer choices),
the console's /help. Adding a command is one marked handler.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bot.i18n import Catalogs, Translator

if TYPE_CHECKING:
    from bot.messages import Incoming
    from bot.reply import Reply

# handler(service, message, args) → the reply.
Handler = Callable[[Any, "Incoming", str], Awaitable["Reply"]]


@dataclass(frozen=True, slots=True)
class Arg:
    """One optional argument (the rest of the line after the command's name)."""

    name: str
    description: str  # an English msgid (mark it with N_); shown translated
    # The Choices' command whose options complete this argument ("model"), if any.
    choices: str | None = None


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    description: str  # one line, shown in every menu: an English msgid (N_), translated
    handler: Handler
    args: tuple[Arg, ...] = ()
    admin: bool = False  # only ADMIN_USERS (and the console) may run it
    private: bool = False  # the answer is the asker's alone (ephemeral on Discord)
    # The platforms that list it; None: all of them, and /help. (/start is Telegram's.)
    platforms: frozenset[str] | None = None


def command(name: str, description: str, *, args: Iterable[Arg] = (), admin: bool = False,
            private: bool = False,
            platforms: Iterable[str] | None = None) -> Callable[[Handler], Handler]:
    """Mark a handler as the chat command `/name`."""

    def mark(handler: Handler) -> Handler:
        handler.__chat_command__ = Command(  # type: ignore[attr-defined]
            name=name, description=description, handler=handler, args=tuple(args),
            admin=admin, private=private,
            platforms=frozenset(platforms) if platforms is not None else None)
        return handler

    return mark


class Commands:
    """An immutable, ordered set of commands."""

    def __init__(self, commands: Iterable[Command]) -> None:
        self._by_name: dict[str, Command] = {}
        for cmd in commands:
            if cmd.name in self._by_name:
                raise ValueError(f"/{cmd.name} is declared twice")
            self._by_name[cmd.name] = cmd

    @classmethod
    def of(cls, owner: type) -> Commands:
        """The commands marked on `owner` and its bases, bases' first, in source order."""
        found: dict[str, Command] = {}
        for klass in reversed(owner.__mro__):
            for value in vars(klass).values():
                cmd = getattr(value, "__chat_command__", None)
                if isinstance(cmd, Command):
                    found[cmd.name] = cmd
        return cls(found.values())

    def adding(self, *commands: Command) -> Commands:
        return Commands([*self._by_name.values(), *commands])

    def get(self, name: str) -> Command | None:
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[Command]:
        return iter(self._by_name.values())

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> frozenset[str]:
        """Every command the core answers (the menus may list fewer)."""
        return frozenset(self._by_name)

    def menu(self, platform: str) -> list[Command]:
        """What `platform`'s command menu lists, in order."""
        return [c for c in self if c.platforms is None or platform in c.platforms]

    def listed(self) -> list[Command]:
        """What /help lists: the commands of every platform."""
        return [c for c in self if c.platforms is None]

    def private(self, name: str) -> bool:
        cmd = self.get(name)
        return cmd is not None and cmd.private


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


def help_text(model: str, commands: Commands, tr: Translator | None = None) -> str:
    """/help in the reader's language (English without a translator)."""
    if tr is None:
        tr = Catalogs({}).for_language(None)
    lines = [
        tr.gettext("I'm a chat assistant that remembers our conversation, here and across "
                   "restarts (each person has their own memory). 我也能用中文聊天。"),
        "",
        tr.gettext("Commands:"),
    ]
    lines += [f"/{c.name} — {tr.gettext(c.description)}" for c in commands.listed()]
    lines += ["", tr.gettext("Your model: `{model}`", model=model)]
    return "\n".join(lines)
